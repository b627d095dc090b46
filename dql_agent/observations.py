"""Observations, in one place: what a space is, how values are checked, batched, flattened and
normalised.

**Spaces.** An observation space is a Box, or a Dict of Boxes (nested Dicts too). A Box is a
*camera* when it is a uint8 Box of rank 3 with bounds [0, 255] (SB3's ``is_image_space``), stored
HWC or CHW; every other Box is a *vector*. The *leaves* of a space are its Boxes with their keys,
in the space's own key order, nested keys joined with '.' (gymnasium sorts the keys of a Dict
built from a plain dict, so ``{'observation', 'achieved_goal', 'desired_goal'}`` has the leaves
achieved_goal, desired_goal, observation); a plain Box has the one leaf ``"observation"``.

**Trees.** Observations travel as a *tree*: a dict from leaf key to a batch ``(B, *shape)`` of
that leaf, uint8 for cameras and float32 for vectors, checked once (shape, dtype, finite values,
whole-number pixels). Every source goes through the same checks: a dataset's columns
(:func:`tree_from_arrays`), ``predict``'s input (:func:`batch_of`, which also tells one
observation from a batch) and an online algorithm's env steps.

**Flat rows.** Spaces without cameras are trained and acted on as flat float32 rows: the leaves
raveled in C order and concatenated in leaf order (:func:`flatten`), the same order as
``gymnasium.spaces.flatten``. Spaces with cameras keep the tree; the encoder
(:mod:`dql_agent.encoders`) turns it into features.

**Normalisation.** :func:`observation_stats` computes the per-dimension mean and std of a
dataset's flat observation (cameras get 0 and 1: the encoder scales pixels), and
:func:`normalize` applies them, to a dataset once and to every ``predict`` input, in the one way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

PLAIN_KEY = "observation"  # the tree key of a plain Box space's one leaf
Tree = dict[str, Any]  # leaf key -> (B, *shape) array or tensor


# what a space is -------------------------------------------------------------------------------
def is_image_space(space: spaces.Space) -> bool:
    """A uint8 Box of rank 3 with bounds [0, 255] (HWC or CHW), as SB3's ``is_image_space``."""
    return (
        isinstance(space, spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) == 3
        and bool(np.all(space.low == 0))
        and bool(np.all(space.high == 255))
    )


def is_channels_first(space: spaces.Box) -> bool:
    """CHW when the first axis is the smallest (SB3's rule), else HWC."""
    return int(np.argmin(space.shape)) == 0


def image_shape_chw(space: spaces.Box) -> tuple[int, int, int]:
    """(channels, height, width) of an image space."""
    c, h, w = space.shape if is_channels_first(space) else (space.shape[2], space.shape[0], space.shape[1])
    return int(c), int(h), int(w)


def leaves(space: spaces.Space, prefix: str = "") -> Iterator[tuple[str, spaces.Box]]:
    """(key, Box) of every leaf in the flattening order; nested Dict keys join with '.'."""
    if isinstance(space, spaces.Dict):
        for key, sub in space.spaces.items():
            yield from leaves(sub, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    else:
        assert isinstance(space, spaces.Box)  # checked by check_observation_space
        yield (prefix or PLAIN_KEY), space


def has_images(space: spaces.Space) -> bool:
    """Whether observations of ``space`` take the camera path (a tree and a CNN per camera)."""
    return any(is_image_space(box) for _, box in leaves(space))


def image_keys(space: spaces.Space) -> list[str]:
    return [key for key, box in leaves(space) if is_image_space(box)]


def flat_dim(space: spaces.Space) -> int:
    """Length of the flattened observation."""
    return sum(math.prod(box.shape or ()) for _, box in leaves(space))


def image_on_mlp_error(box: spaces.Box, where: str) -> str:
    """The message for an image-shaped Box that would be flattened into an MLP."""
    return (
        f"{where} is image-shaped ({box.shape}, {box.dtype}, bounds [{np.min(box.low)}, {np.max(box.high)}]) but "
        "not a uint8 Box with bounds [0, 255], so it would be flattened into the MLP pixel by pixel; declare "
        "camera keys as gymnasium.spaces.Box(0, 255, shape, np.uint8) (HWC or CHW) to use the CNN encoder "
        "(config fields cnn_channels, image_features, random_shift)"
    )


def check_observation_space(space: spaces.Space, name: str = "observation_space") -> None:
    """Accept Box and Dict-of-Box (one level or nested) observation spaces; reject the rest, and
    image-shaped Boxes that are not uint8 [0, 255] images (they would be flattened into an MLP)."""
    if isinstance(space, spaces.Box):
        if len(space.shape) == 3 and min(space.shape) > 1 and not is_image_space(space):
            raise TypeError(image_on_mlp_error(space, name))
        return
    if isinstance(space, spaces.Dict):
        for key, sub in space.spaces.items():
            if not isinstance(sub, (spaces.Box, spaces.Dict)):
                raise TypeError(f"{name}[{key!r}] must be a Box or Dict, got {type(sub).__name__}")
            check_observation_space(sub, f"{name}[{key!r}]")
        return
    raise TypeError(f"{name} must be a gymnasium Box or Dict of Box spaces, got {type(space).__name__}")


def describe_observation_space(space: spaces.Space) -> list[dict[str, Any]]:
    """Key, kind, shape and dtype of every leaf (for model cards and export metadata)."""
    out = []
    for key, box in leaves(space):
        entry: dict[str, Any] = {"key": key, "shape": list(box.shape), "dtype": np.dtype(box.dtype).name}
        if is_image_space(box):
            c, h, w = image_shape_chw(box)
            entry |= {"kind": "image", "layout": "CHW" if is_channels_first(box) else "HWC", "size": [h, w, c]}
        else:
            entry["kind"] = "vector"
        out.append(entry)
    return out


def box_of(observations: Any) -> spaces.Box:
    """The Box of (N, *shape) observations: a uint8 [0, 255] image Box for uint8 arrays of rank 3
    per row (a camera), else an unbounded float32 Box."""
    array = np.asarray(observations)
    shape = array.shape[1:]
    if array.dtype == np.uint8 and len(shape) == 3:
        return spaces.Box(0, 255, shape, np.uint8)
    return spaces.Box(-np.inf, np.inf, shape if shape else (1,), np.float32)


def dict_space_of(observations: Mapping[str, Any]) -> spaces.Dict:
    """The Dict space shaped like a dict of (N, ...) arrays (nested dicts nest), each leaf as
    :func:`box_of` infers it."""
    return spaces.Dict(
        {
            key: dict_space_of(value) if isinstance(value, Mapping) else box_of(value)
            for key, value in observations.items()
        }
    )


# checked values --------------------------------------------------------------------------------
def check_numeric(name: str, array: np.ndarray) -> None:
    """Refuse arrays that are not bool, int or float (strings, objects, complex numbers)."""
    if array.dtype.kind not in "biuf":
        hint = ": complex values are refused, not cut to their real part" if array.dtype.kind == "c" else ""
        raise TypeError(f"{name} must be numeric (bool, int or float), got dtype {array.dtype}{hint}")


def as_numeric(name: str, value: Any) -> np.ndarray:
    """``value`` as a numeric numpy array (torch tensors detached and moved to the host)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()  # a tensor that needs grad or lives on a GPU converts only so
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:  # ragged nested lists
        raise ValueError(f"{name} cannot be read as an array: {error}") from None
    check_numeric(name, array)
    return array


def as_float32(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` (N, ...) cast to float32, refusing non-numeric dtypes, NaN/inf, and finite values
    too large for float32 (the cast would turn them into inf); errors name ``name`` and the rows.

    Every loader goes through this one check, so no path can store an inf the data did not hold.
    """
    check_numeric(name, array)
    with np.errstate(over="ignore"):
        out = array.astype(np.float32, copy=False)  # float32 input is not copied (large datasets)
    bad = ~np.isfinite(out)
    if not bad.any():
        return out
    rows = bad.reshape(len(out), -1).any(axis=1)
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    value = array[index].item()
    where = f"(first at row {index[0]}), e.g. {value!r} at {name}[{', '.join(map(str, index))}]"
    if np.isfinite(value):
        raise ValueError(
            f"{name} has values too large for float32 in {int(rows.sum())} row(s) {where}; float32 holds "
            f"magnitudes up to {float(np.finfo(np.float32).max):.4g}, so they would be stored as inf"
        )
    raise ValueError(f"{name} has NaN/inf in {int(rows.sum())} row(s) {where}")


def as_uint8_images(name: str, array: np.ndarray) -> np.ndarray:
    """Images as uint8; other dtypes must hold whole numbers in [0, 255] (nothing is rescaled)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be uint8 images, got dtype {array.dtype}")
    bad = ~np.isfinite(array) | (array < 0) | (array > 255) | (array != np.round(array))
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} must be uint8 images (whole numbers in [0, 255]), got {array[index].item()!r} at "
            f"{name}[{', '.join(map(str, index))}] ({int(bad.sum())} value(s) outside)"
        )
    return array.astype(np.uint8)


def checked_leaf(name: str, box: spaces.Box, array: np.ndarray) -> np.ndarray:
    """One leaf's batch in its stored dtype: uint8 for a camera, finite float32 for a vector."""
    return as_uint8_images(name, array) if is_image_space(box) else as_float32(name, array)


# trees -----------------------------------------------------------------------------------------
def leaf_value(observation: Any, key: str, space: spaces.Space) -> Any:
    """The array of ``key`` in an observation (a nested dict, or the array itself for a Box)."""
    if isinstance(observation, Mapping) and key in observation:  # already a tree (dotted keys)
        return observation[key]
    if not isinstance(space, spaces.Dict):
        return observation
    value = observation
    for part in key.split("."):
        value = value[part]
    return value


def nested(flat: Mapping[str, Any], separator: str = ".") -> dict[str, Any]:
    """Flat keys (``"images.top"``; ``"observations/x"`` with ``separator="/"``) as nested dicts."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(separator)
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


def leaf_name(name: str, key: str, space: spaces.Space) -> str:
    """How errors name a leaf: ``observations['image']``, or ``observations`` for a plain Box."""
    return name if not isinstance(space, spaces.Dict) else f"{name}[{key!r}]"


def check_keys(name: str, observations: Any, space: spaces.Space) -> None:
    """A dataset's Dict observations hold exactly the space's keys, at every level."""
    if not isinstance(space, spaces.Dict):
        return
    if not isinstance(observations, Mapping):
        raise TypeError(f"{name} must be a dict for its Dict space, got {type(observations).__name__}")
    if all(key in observations for key, _ in leaves(space)) and set(observations) == {k for k, _ in leaves(space)}:
        return  # already a tree (dotted keys)
    missing = sorted(set(space.spaces) - set(observations))
    unexpected = sorted(set(observations) - set(space.spaces))
    if missing or unexpected:
        raise ValueError(f"{name} keys must be {sorted(space.spaces)}; missing {missing}, unexpected {unexpected}")
    for key, sub in space.spaces.items():
        check_keys(f"{name}[{key!r}]", observations[key], sub)


def raw_tree(space: spaces.Space, observations: Any, name: str) -> dict[str, np.ndarray]:
    """A dataset's observations (a (N, *shape) array, or a nested dict of them) as a tree of numeric
    arrays in their own dtype: the keys, shapes and row counts checked (a leaf of shape (1,) may
    also come as (N,)), the values not yet (see :func:`tree_from_arrays`)."""
    check_keys(name, observations, space)
    tree: dict[str, np.ndarray] = {}
    rows = None
    for key, box in leaves(space):
        where = leaf_name(name, key, space)
        array = as_numeric(where, leaf_value(observations, key, space))
        shape = tuple(box.shape or ())
        if shape == (1,) and array.ndim == 1:
            array = array[:, None]  # (N,) for a one-dimensional leaf
        if array.ndim == 0 or array.shape[1:] != shape:
            raise ValueError(f"{where} must have shape (N, {', '.join(map(str, shape))}), got {array.shape}")
        if rows is not None and len(array) != rows:
            raise ValueError(f"{where} has {len(array)} rows, expected {rows} (the other keys' count)")
        rows = len(array)
        tree[key] = array
    return tree


def tree_from_arrays(space: spaces.Space, observations: Any, name: str) -> dict[str, np.ndarray]:
    """A dataset's observations as a checked tree (:func:`raw_tree`): cameras uint8 (whole numbers
    in [0, 255]), vectors finite float32."""
    boxes = dict(leaves(space))
    return {
        key: checked_leaf(leaf_name(name, key, space), boxes[key], array)
        for key, array in raw_tree(space, observations, name).items()
    }


def flatten(space: spaces.Space, tree: Mapping[str, Any]) -> Any:
    """A tree's leaves raveled and concatenated in leaf order: (B, flat_dim), numpy or torch as given."""
    parts = [tree[key].reshape(tree[key].shape[0], math.prod(box.shape or ())) for key, box in leaves(space)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=1) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts, axis=1)


def batch_of(
    space: spaces.Space, observation: Any, name: str = "observation", history: int = 1
) -> tuple[dict[str, np.ndarray], bool]:
    """``predict``'s input, one observation or a batch ``(n_envs, *shape)``, as a checked tree of
    (B, *shape) leaves, and whether it was batched. With ``history`` k > 1 every leaf carries a
    history axis: ``(k, *shape)`` for one, ``(n_envs, k, *shape)`` for a batch.

    Batching is read off the first leaf, as SB3 does for Dict spaces; every other leaf must then
    have its space's shape with the same batching, else a ValueError names the leaf. Torch tensors
    are detached and moved to the host; Dict keys the space does not name are ignored.
    """
    steps = (history,) if history > 1 else ()
    if isinstance(observation, tuple) and len(observation) == 2 and isinstance(observation[1], dict):
        raise ValueError(
            f"{name} is an (obs, info) tuple: pass only the observation, e.g. "
            "`obs, info = env.reset(); model.predict(obs)`"
        )
    found = [(where, box, as_numeric(where, value)) for where, box, value in _named_leaves(space, observation, name)]
    first, box, probe = found[0]
    shape = (*steps, *box.shape)
    if probe.shape == shape:
        vectorized, batch = False, 1
    elif probe.shape[1:] == shape and probe.ndim == len(shape) + 1:
        vectorized, batch = True, probe.shape[0]
    else:
        raise ValueError(
            f"{first} has shape {probe.shape}; expected {shape} for one observation or "
            f"(n_envs, {', '.join(map(str, shape))}) for a batch"
        )
    tree: dict[str, np.ndarray] = {}
    for (key, _), (where, leaf_box, array) in zip(leaves(space), found, strict=True):
        leaf_shape = (*steps, *leaf_box.shape)
        expected = (batch, *leaf_shape) if vectorized else leaf_shape
        if array.shape != expected:
            given = f"a batch of {batch}" if vectorized else "one observation"
            raise ValueError(
                f"{where} has shape {array.shape}; expected {expected} ({given}, as {first} has shape {probe.shape})"
            )
        array = array.reshape(batch, *leaf_shape)
        if is_image_space(leaf_box):
            tree[key] = as_uint8_images(where, array)
        else:
            tree[key] = array.astype(np.float32)
            bad = ~np.isfinite(tree[key])
            if bad.any():
                raise ValueError(
                    f"{where} contains {int(bad.sum())} NaN/inf value(s) at {np.argwhere(bad)[0].tolist()}"
                )
    return tree, vectorized


def _named_leaves(space: spaces.Space, value: Any, name: str) -> Iterator[tuple[str, spaces.Box, Any]]:
    """(name for errors, Box, value) of every leaf of an observation, Dict keys checked on the way."""
    if isinstance(space, spaces.Dict):
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict for a Dict observation space, got {type(value).__name__}")
        missing = [k for k in space.spaces if k not in value]
        if missing:
            raise ValueError(f"{name} is missing key(s) {missing}; expected keys {list(space.spaces)}")
        for key, sub in space.spaces.items():
            yield from _named_leaves(sub, value[key], f"{name}[{key!r}]")
    else:
        assert isinstance(space, spaces.Box)
        yield name, space, value


def rows_of(observations: Any) -> int:
    """Batch size of a (B, ...) array or tensor or of a tree (a SymInt under torch.export: no int(),
    which would fix the exported batch size)."""
    if isinstance(observations, Mapping):
        observations = next(iter(observations.values()))
    return observations.shape[0]


def take_rows(observations: Any, index: Any) -> Any:
    """Rows of a (N, ...) tensor or of every leaf of a tree."""
    if isinstance(observations, dict):
        return {key: value[index] for key, value in observations.items()}
    return observations[index]


def tree_to(observations: Any, device: str | torch.device) -> Any:
    """A tensor or a tree of tensors moved to ``device``."""
    if isinstance(observations, dict):
        return {key: value.to(device) for key, value in observations.items()}
    return observations.to(device)


def tree_nbytes_per_row(tree: Mapping[str, torch.Tensor]) -> int:
    return sum(t[0].numel() * t.element_size() for t in tree.values() if len(t))


# normalisation ---------------------------------------------------------------------------------
def observation_stats(space: spaces.Space, observations: Any, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (+eps, so constant dimensions do not divide by 0) of a dataset's
    flat observation ((N, obs_dim) tensor, or a tree); camera pixels get mean 0 and std 1."""
    if not isinstance(observations, dict):
        obs = observations.double()
        return obs.mean(0).float(), (obs.std(0, unbiased=False) + eps).float()
    means, stds = [], []
    for key, box in leaves(space):
        size = math.prod(box.shape)
        if is_image_space(box):
            means.append(torch.zeros(size))
            stds.append(torch.ones(size))
        else:
            obs = observations[key].reshape(rows_of(observations), -1).double().cpu()
            means.append(obs.mean(0).float())
            stds.append((obs.std(0, unbiased=False) + eps).float())
    return torch.cat(means), torch.cat(stds)


def normalize(space: spaces.Space, observations: Any, mean: torch.Tensor, std: torch.Tensor) -> Any:
    """Flat observations (B, obs_dim) or a tree, standardised by the flat statistics ``mean`` and
    ``std``; in a tree only the vector leaves (pixels are scaled by the encoder)."""
    if not isinstance(observations, dict):
        return (observations - mean) / std
    out, start = dict(observations), 0
    for key, box in leaves(space):
        size = math.prod(box.shape)
        if not is_image_space(box):
            value = observations[key].reshape(-1, size)
            out[key] = ((value - mean[start : start + size]) / std[start : start + size]).reshape(
                observations[key].shape
            )
        start += size
    return out
