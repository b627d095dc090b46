"""Observation/action spaces: checks, Dict flattening, Box scaling and JSON (de)serialisation.

Dict observations are flattened by concatenating their Box entries in the Dict space's own key
order (gymnasium sorts the keys of a Dict built from a plain dict, so
``{'observation', 'achieved_goal', 'desired_goal'}`` flattens as achieved_goal, desired_goal,
observation), each entry raveled in C order: the same order as ``gymnasium.spaces.flatten``.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
import torch
from gymnasium import spaces

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def check_observation_space(space: spaces.Space) -> None:
    """Accept Box and Dict-of-Box (one level or nested) observation spaces; reject the rest."""
    if isinstance(space, spaces.Box):
        return
    if isinstance(space, spaces.Dict):
        for key, sub in space.spaces.items():
            if not isinstance(sub, (spaces.Box, spaces.Dict)):
                raise TypeError(f"observation_space[{key!r}] must be a Box or Dict, got {type(sub).__name__}")
            check_observation_space(sub)
        return
    raise TypeError(f"observation_space must be a gymnasium Box or Dict of Box spaces, got {type(space).__name__}")


def check_action_space(space: spaces.Space) -> None:
    """Actions must be a finite, bounded Box (scaled to [-1, 1] internally)."""
    if not isinstance(space, spaces.Box):
        raise TypeError(f"action_space must be a gymnasium Box, got {type(space).__name__}")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise ValueError(f"action_space must have finite bounds, got low={space.low}, high={space.high}")
    if np.any(space.high <= space.low):
        raise ValueError(f"action_space needs high > low in every dimension, got low={space.low}, high={space.high}")


def flat_dim(space: spaces.Space) -> int:
    """Length of the flattened observation."""
    if isinstance(space, spaces.Dict):
        return sum(flat_dim(sub) for sub in space.spaces.values())
    return math.prod(space.shape or ())


def flatten_batch(space: spaces.Space, observations: Any, batch_size: int | None = None) -> np.ndarray:
    """Flatten a batch of observations (a (B, *shape) array, or a dict of them) to (B, flat_dim).

    ``batch_size`` None takes B from each array's first axis.
    """
    if isinstance(space, spaces.Dict):
        if not isinstance(observations, dict):
            raise TypeError(f"observation must be a dict for a Dict space, got {type(observations).__name__}")
        missing = [key for key in space.spaces if key not in observations]
        if missing:
            raise ValueError(f"observation is missing Dict key(s) {missing}; expected keys {list(space.spaces)}")
        parts = [flatten_batch(sub, observations[key], batch_size) for key, sub in space.spaces.items()]
        return np.concatenate(parts, axis=1)
    array = np.asarray(observations)
    return array.reshape(array.shape[0] if batch_size is None else batch_size, -1)


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


def _decode_bound(values: list, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=dtype).reshape(shape)


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


def space_from_json(data: dict[str, Any], field: str = "space") -> spaces.Space:
    """Inverse of :func:`space_to_json`; malformed input is a ValueError naming ``field``."""
    try:
        kind = data["type"]
        if kind == "Dict":
            return spaces.Dict({k: space_from_json(v, f"{field}.{k}") for k, v in data["spaces"].items()})
        if kind == "Box":
            shape, dtype = tuple(int(n) for n in data["shape"]), np.dtype(data["dtype"])
            return spaces.Box(
                low=_decode_bound(data["low"], shape, dtype),
                high=_decode_bound(data["high"], shape, dtype),
                shape=shape,
                dtype=dtype,
            )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{field} is not a valid space description ({error!r}): {data!r}") from None
    raise ValueError(f"{field}.type must be 'Box' or 'Dict', got {kind!r}")


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
