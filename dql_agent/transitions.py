"""The checks of a dataset's transition columns, shared by OfflineBuffer and every reader.

Observations are checked in :mod:`dql_agent.observations`; this module checks the rest of a
transition: rows of actions (in their Box's shape or flat), rewards, and the terminal and timeout
flags of each episode end, and it infers or enforces the action Box. Errors name the column, the
expected and the received value, and the first bad row.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from gymnasium import spaces

from dql_agent.observations import as_numeric

REQUIRED_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")


def column(name: str, value: Any, ndim: int | None) -> np.ndarray:
    """A numeric column with a first axis of rows: ``ndim`` None takes any shape, 1 accepts (N, 1)
    as (N,), and 2 accepts (N,) as (N, 1)."""
    array = as_numeric(name, value)
    if ndim is None:  # any shape with a first (row) axis
        if array.ndim == 0:
            raise ValueError(f"{name} must have a first axis of rows, got a scalar")
        return array
    if ndim == 1 and array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]  # (N, 1) rewards/flags are common; accept them
    if ndim == 2 and array.ndim == 1:
        array = array[:, None]  # 1-D observations/actions
    if array.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimension(s) (N{', dim' if ndim == 2 else ''}), got shape {array.shape}"
        )
    return array


def flat_rows(name: str, value: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    """(N, dim) rows of a column whose rows may also come in their space's ``shape``: an (N, 2, 2)
    array for a (2, 2) Box is the same data as its (N, 4) rows. ``shape`` None takes (N, dim)."""
    array = as_numeric(name, value)
    if shape is not None and len(shape) > 1 and array.ndim == len(shape) + 1:
        if array.shape[1:] != tuple(shape):
            in_shape = ", ".join(map(str, shape))
            raise ValueError(f"{name} must have shape (N, {in_shape}) or (N, {math.prod(shape)}), got {array.shape}")
        return array.reshape(len(array), math.prod(shape))
    return column(name, array, 2)


def as_flags(name: str, value: Any) -> np.ndarray:
    """``value`` as an (N,) bool array: bool, or numbers that are all 0 or 1 (anything else names ``name``)."""
    array = column(name, value, 1)
    if array.dtype == bool:
        return array
    bad = (array != 0) & (array != 1)  # NaN compares unequal to both
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must be bool or hold only 0 and 1, got {array[row].item()!r} at row {row} "
            f"({int(bad.sum())} row(s) hold other values)"
        )
    return array.astype(bool)


def episode_flags(terminals: Any, timeouts: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Checked (N,) bool ``terminals`` and ``timeouts`` from bool or 0/1 arrays (other values are an error).

    A row flagged both terminal and timeout is terminal, and its timeout flag is cleared:
    gymnasium's ``TimeLimit`` reports ``terminated`` and ``truncated`` together when the limit
    falls on a terminal step, and such a step must not be bootstrapped.
    """
    term = as_flags("terminals", terminals)
    tout = np.zeros(len(term), dtype=bool) if timeouts is None else as_flags("timeouts", timeouts)
    if len(tout) != len(term):
        raise ValueError(f"timeouts has {len(tout)} rows, expected {len(term)} (the length of terminals)")
    return term, tout & ~term


def infer_action_space(actions: np.ndarray) -> spaces.Box:
    """[-1, 1] when the (N, act_dim) actions fit it, else their per-dimension min/max (with a warning)."""
    if np.abs(actions).max() <= 1.0:
        return spaces.Box(-1.0, 1.0, (actions.shape[1],), np.float32)
    low, high = actions.min(0), actions.max(0)
    high = np.where(high > low, high, low + 1.0)
    warnings.warn(
        "action_space not given and actions exceed [-1, 1]: using the data's per-dimension "
        f"min/max as bounds (low={low}, high={high}); pass action_space=env.action_space to be exact",
        stacklevel=3,
    )
    return spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)


def check_action_bounds(actions: np.ndarray, space: spaces.Box, clip: bool) -> np.ndarray:
    """(N, act_dim) actions inside the Box (a 1e-6 slack is clipped silently); outside it, an error
    naming the rows, or with ``clip`` a warning and the clipped actions."""
    low, high = space.low.reshape(1, -1), space.high.reshape(1, -1)
    outside = ((actions < low - 1e-6) | (actions > high + 1e-6)).any(axis=1)
    if not outside.any():
        return np.clip(actions, low, high)
    first = int(np.flatnonzero(outside)[0])
    message = (
        f"actions has {int(outside.sum())} row(s) outside the action_space bounds "
        f"[{space.low}, {space.high}] (first at row {first}: {actions[first]})"
    )
    if not clip:
        raise ValueError(message + "; pass clip_actions=True to clip them")
    warnings.warn(message + "; clipping them (clip_actions=True)", stacklevel=3)
    return np.clip(actions, low, high)
