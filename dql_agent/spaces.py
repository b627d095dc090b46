"""Action spaces (checks, scaling to the networks' [-1, 1]) and spaces as JSON.

Observation spaces, and everything about observations, are :mod:`dql_agent.observations`.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
import torch
from gymnasium import spaces

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def check_action_space(space: spaces.Space) -> None:
    """Actions must be a finite, bounded Box (scaled to [-1, 1] internally)."""
    if not isinstance(space, spaces.Box):
        raise TypeError(f"action_space must be a gymnasium Box, got {type(space).__name__}")
    if not np.issubdtype(space.dtype, np.floating):
        # an integer Box would truncate every action the policy produces
        raise TypeError(f"action_space must have a float dtype (continuous actions), got {space.dtype}")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise ValueError(
            f"action_space must have finite bounds, got low={space.low}, high={space.high}; pass "
            "action_space=gymnasium.spaces.Box(low, high) with the bounds the actuators accept (to the model, "
            "or to OfflineBuffer)"
        )
    if np.any(space.high <= space.low):
        raise ValueError(f"action_space needs high > low in every dimension, got low={space.low}, high={space.high}")


def scale_actions(actions: torch.Tensor, space: spaces.Box) -> torch.Tensor:
    """Box-bounded actions (N, act_dim) -> the networks' units, [-1, 1] (clamped), float32."""
    low = torch.as_tensor(space.low, dtype=torch.float32, device=actions.device).reshape(1, -1)
    high = torch.as_tensor(space.high, dtype=torch.float32, device=actions.device).reshape(1, -1)
    return (2.0 * (actions - low) / (high - low) - 1.0).clamp(-1.0, 1.0)


def unscale_actions(actions: ArrayT, space: spaces.Box) -> ArrayT:
    """The networks' units, [-1, 1], back to the Box: (N, act_dim) -> (N, act_dim), clipped to the
    bounds as SB3 does; numpy in the Box's dtype, or torch (``forward`` and export) in float32."""
    if isinstance(actions, torch.Tensor):
        low = torch.as_tensor(space.low.reshape(1, -1), dtype=actions.dtype, device=actions.device)
        high = torch.as_tensor(space.high.reshape(1, -1), dtype=actions.dtype, device=actions.device)
        return torch.clamp(low + 0.5 * (actions + 1.0) * (high - low), low, high)
    low, high = space.low.reshape(1, -1), space.high.reshape(1, -1)
    return np.clip(low + 0.5 * (actions + 1.0) * (high - low), low, high).astype(space.dtype)


# JSON ------------------------------------------------------------------------------------------
def _encode_bound(array: np.ndarray) -> list:
    # JSON has no inf: write non-finite bounds as strings so any JSON reader accepts the file.
    return [v if math.isfinite(v) else ("inf" if v > 0 else "-inf") for v in array.astype(np.float64).ravel().tolist()]


def space_to_json(space: spaces.Space) -> dict[str, Any]:
    """A JSON-safe description of a Box or Dict space."""
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_json(v) for k, v in space.spaces.items()}}
    if isinstance(space, spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": np.dtype(space.dtype).name,
            "low": _encode_bound(space.low),
            "high": _encode_bound(space.high),
        }
    raise TypeError(f"cannot serialise a {type(space).__name__} space; expected Box or Dict")


BOX_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
MAX_SPACE_DEPTH = 16


def space_from_json(data: Any, field: str = "space", depth: int = 0) -> spaces.Space:  # noqa: C901 - flat checks
    """Inverse of :func:`space_to_json`; malformed input is a ValueError naming ``field``.

    Only numeric Box dtypes, int (not bool) shapes, bounds that fit the dtype and Dicts nested at
    most ``MAX_SPACE_DEPTH`` deep are accepted: a file decides nothing else.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{field} must be a JSON object describing a space, got {data!r:.80}")
    kind = data.get("type")
    if kind == "Dict":
        if depth >= MAX_SPACE_DEPTH:
            raise ValueError(f"{field} nests Dict spaces more than {MAX_SPACE_DEPTH} deep")
        members = data.get("spaces")
        if not isinstance(members, dict):
            raise ValueError(f"{field}.spaces must be an object of named spaces, got {members!r:.80}")
        return spaces.Dict({k: space_from_json(v, f"{field}.{k}", depth + 1) for k, v in members.items()})
    if kind != "Box":
        raise ValueError(f"{field}.type must be 'Box' or 'Dict', got {kind!r}")
    shape, dtype = data.get("shape"), data.get("dtype")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise ValueError(f"{field}.shape must be a list of ints >= 0, got {shape!r:.80}")
    if dtype not in BOX_DTYPES:
        raise ValueError(f"{field}.dtype must be one of {BOX_DTYPES}, got {dtype!r:.80}")
    size = math.prod(shape)
    bounds = {}
    for name in ("low", "high"):
        values = data.get(name)
        if not isinstance(values, list) or len(values) != size:
            raise ValueError(f"{field}.{name} must be a list of {size} numbers (the shape's size), got {values!r:.80}")
        if not all(_is_bound(v) for v in values):
            raise ValueError(f"{field}.{name} must hold numbers or 'inf'/'-inf', got {values!r:.80}")
        array = np.array([float(v) for v in values], dtype=np.float64).reshape(shape)
        if np.dtype(dtype).kind == "f":
            largest = float(np.finfo(dtype).max)
            if np.any(np.isfinite(array) & (np.abs(array) > largest)):
                raise ValueError(f"{field}.{name} has finite values beyond {dtype}'s range, got {values!r:.80}")
        if np.dtype(dtype).kind in "iu":
            info = np.iinfo(dtype)
            if not (np.all(np.isfinite(array)) and np.all((array >= info.min) & (array <= info.max))):
                raise ValueError(
                    f"{field}.{name} must be finite and within [{info.min}, {info.max}] for a {dtype} Box, "
                    f"got {values!r:.80}"
                )
        bounds[name] = array
    try:
        return spaces.Box(
            low=bounds["low"].astype(dtype), high=bounds["high"].astype(dtype), shape=tuple(shape), dtype=dtype
        )
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"{field} is not a valid Box ({error})") from None


def _is_bound(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or value in ("inf", "-inf")


def spaces_equal(a: spaces.Space, b: spaces.Space) -> bool:
    """Same kind, keys, shapes and bounds (dtype differences tolerated)."""
    if isinstance(a, spaces.Dict) and isinstance(b, spaces.Dict):
        return list(a.spaces) == list(b.spaces) and all(spaces_equal(a[k], b[k]) for k in a.spaces)
    if isinstance(a, spaces.Box) and isinstance(b, spaces.Box):
        return (
            a.shape == b.shape
            and np.allclose(a.low, b.low, equal_nan=True)
            and np.allclose(a.high, b.high, equal_nan=True)
        )
    return False
