"""OfflineBuffer: a static dataset of transitions, checked once and kept on the training device."""

from __future__ import annotations

import copy
import os
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces

from dql_agent.config import is_int
from dql_agent.encoders import has_images, is_image_space, leaves, tree_from_arrays, tree_nbytes_per_row
from dql_agent.spaces import check_action_space, check_observation_space, flat_dim

REQUIRED_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals")


class Batch(NamedTuple):
    """A batch of transitions; ``not_dones`` is 1 - terminal (timeouts are not terminals).

    Observations are (B, obs_dim) float32, or for spaces with images an observation tree (a dict
    of (B, *shape) tensors per key, see :mod:`dql_agent.encoders`) until the policy encodes them.
    """

    observations: Any  # (B, obs_dim), or a tree
    actions: torch.Tensor  # (B, act_dim)
    rewards: torch.Tensor  # (B,)
    next_observations: Any  # (B, obs_dim), or a tree
    not_dones: torch.Tensor  # (B,)


def take_rows(observations: Any, index: Any) -> Any:
    """Rows of a (N, ...) tensor or of every tensor of an observation tree."""
    if isinstance(observations, dict):
        return {key: value[index] for key, value in observations.items()}
    return observations[index]


def tree_to(observations: Any, device: str | torch.device) -> Any:
    if isinstance(observations, dict):
        return {key: value.to(device) for key, value in observations.items()}
    return observations.to(device)


def _check_dtype(name: str, array: np.ndarray) -> None:
    if array.dtype.kind not in "biuf":  # bool, int, uint, float
        hint = ": complex values are refused, not cut to their real part" if array.dtype.kind == "c" else ""
        raise TypeError(f"{name} must be a numeric array (bool, int or float), got dtype {array.dtype}{hint}")


def dict_space_of(observations: Mapping[str, Any]) -> spaces.Dict:
    """An unbounded float32 Dict space shaped like a dict of (N, ...) arrays (nested dicts nest)."""
    members: dict[str, spaces.Space] = {}
    for key, value in observations.items():
        if isinstance(value, Mapping):
            members[key] = dict_space_of(value)
        else:
            members[key] = box_of(value)
    return spaces.Dict(members)


def box_of(observations: Any) -> spaces.Box:
    """The Box of (N, *shape) observations: a uint8 [0, 255] image Box for uint8 arrays of rank 3
    per row (a camera), else an unbounded float32 Box."""
    array = np.asarray(observations)
    shape = array.shape[1:]
    if array.dtype == np.uint8 and len(shape) == 3:
        return spaces.Box(0, 255, shape, np.uint8)
    return spaces.Box(-np.inf, np.inf, shape if shape else (1,), np.float32)


def flatten_observations(name: str, observations: Mapping[str, Any], space: spaces.Space) -> np.ndarray:
    """A dict of (N, *shape) arrays, one per key of the Dict ``space``, as checked (N, flat_dim)
    float32 rows in the space's flattening order (:mod:`dql_agent.spaces`)."""
    if not isinstance(space, spaces.Dict):
        raise TypeError(f"{name} is a dict, so observation_space must be a Dict space, got {type(space).__name__}")
    missing = sorted(set(space.spaces) - set(observations))
    unexpected = sorted(set(observations) - set(space.spaces))
    if missing or unexpected:
        raise ValueError(f"{name} keys must be {sorted(space.spaces)}; missing {missing}, unexpected {unexpected}")
    parts, rows = [], None
    for key, sub in space.spaces.items():
        where = f"{name}[{key!r}]"
        if isinstance(sub, spaces.Dict):
            value = observations[key]
            if not isinstance(value, Mapping):
                raise TypeError(f"{where} must be a dict for its Dict space, got {type(value).__name__}")
            part = flatten_observations(where, value, sub)
        else:
            array = _as_array(where, observations[key], None)
            shape = tuple(sub.shape or ())
            if array.shape[1:] != shape and not (shape == (1,) and array.ndim == 1):
                raise ValueError(f"{where} must have shape (N, {', '.join(map(str, shape))}), got {array.shape}")
            part = as_float32(where, array.reshape(len(array), -1))
        if rows is not None and len(part) != rows:
            raise ValueError(f"{where} has {len(part)} rows, expected {rows} (the other keys' count)")
        rows = len(part)
        parts.append(part)
    return np.concatenate(parts, axis=1)


def _as_array(name: str, value: Any, ndim: int | None) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as error:  # ragged lists, tensors that need grad
        raise ValueError(f"{name} cannot be read as an array: {error}") from None
    _check_dtype(name, array)
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


def as_float32(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` (N, ...) cast to float32, refusing non-numeric dtypes, NaN/inf, and finite values
    too large for float32 (the cast would turn them into inf); errors name ``name`` and the rows.

    Every loader goes through this one check, so no path can store an inf the data did not hold.
    """
    _check_dtype(name, array)
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


def as_flags(name: str, value: Any) -> np.ndarray:
    """``value`` as an (N,) bool array: bool, or numbers that are all 0 or 1 (anything else names ``name``)."""
    array = _as_array(name, value, 1)
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


class OfflineBuffer:
    """A dataset of transitions (s, a, r, s', terminal, timeout) for offline RL.

    Arrays are validated once (dtypes, shapes, lengths, finiteness once cast to float32, 0/1
    flags, action bounds) and stored as float32 tensors; :meth:`to` moves them to the training
    device, where :meth:`sample` draws uniform batches with replacement without leaving the device.

    Args:
        observations: (N, obs_dim) flattened observations, or for a Dict observation space a
            dict of (N, *shape) arrays per key (goal-conditioned data: ``observation``,
            ``achieved_goal``, ``desired_goal``), flattened here in the Dict space's order (see
            :mod:`dql_agent.spaces`); without ``observation_space`` one is inferred from the keys.
        actions: (N, act_dim) actions in the environment's units (within ``action_space``).
        rewards: (N,) rewards.
        next_observations: (N, obs_dim) observations after each action (a dict when
            ``observations`` is one).
        terminals: (N,) true where the episode ended in a terminal state (no bootstrap); bool,
            or numbers that are all 0 or 1.
        timeouts: (N,) true where the episode was cut by a time limit (still bootstrapped); bool
            or 0/1. A row that is both terminal and timeout is terminal (its timeout is cleared),
            as gymnasium reports a time limit that falls on a terminal step.
        observation_space: the environment's observation space (Box or Dict); inferred as an
            unbounded Box when omitted.
        action_space: the Box the actions live in; inferred from the data when omitted
            ([-1, 1] if the data fits, else the per-dimension min/max, with a warning).
        clip_actions: clip actions outside ``action_space`` (with a warning) instead of raising.
        metadata: free-form provenance (dataset id, env id, reference scores) carried into
            checkpoints and model cards.
    """

    def __init__(
        self,
        observations: Any,
        actions: Any,
        rewards: Any,
        next_observations: Any,
        terminals: Any,
        timeouts: Any | None = None,
        *,
        observation_space: spaces.Space | None = None,
        action_space: spaces.Box | None = None,
        clip_actions: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ):
        if observation_space is None and not isinstance(observations, Mapping) and np.ndim(observations) == 4:
            observation_space = box_of(observations)  # (N, H, W, C) uint8 frames: a camera
        if isinstance(observations, Mapping) or isinstance(next_observations, Mapping):
            # Goal-conditioned / camera layout: a dict of arrays per key.
            if not (isinstance(observations, Mapping) and isinstance(next_observations, Mapping)):
                raise TypeError("observations and next_observations must both be dicts of arrays, or both arrays")
            if observation_space is None:
                observation_space = dict_space_of(observations)
        if observation_space is not None:
            check_observation_space(observation_space)
        images = observation_space is not None and has_images(observation_space)
        if observation_space is not None and images:
            # uint8 images stay uint8 (a float32 copy would take 4x the memory), keyed like the space
            obs_tree = tree_from_arrays(observation_space, observations, "observations")
            next_tree = tree_from_arrays(observation_space, next_observations, "next_observations")
            n = len(next(iter(obs_tree.values())))
            n_next = len(next(iter(next_tree.values())))
            if n_next != n:
                raise ValueError(f"next_observations has {n_next} rows, expected {n} (the length of observations)")
        else:
            if isinstance(observations, Mapping):
                assert observation_space is not None  # inferred from the keys above
                observations = flatten_observations("observations", observations, observation_space)
                next_observations = flatten_observations("next_observations", next_observations, observation_space)
            obs = _as_array("observations", observations, 2)
            next_obs = _as_array("next_observations", next_observations, 2)
            n = len(obs)
        act = _as_array("actions", actions, 2)
        rew = _as_array("rewards", rewards, 1)
        term = _as_array("terminals", terminals, 1)
        tout = np.zeros(len(term), dtype=bool) if timeouts is None else _as_array("timeouts", timeouts, 1)
        if n == 0:
            raise ValueError("the dataset is empty: observations has 0 rows")
        for name, array in (
            ("actions", act),
            ("rewards", rew),
            ("terminals", term),
            ("timeouts", tout),
        ):
            if len(array) != n:
                raise ValueError(f"{name} has {len(array)} rows, expected {n} (the length of observations)")
        if not images:
            if len(next_obs) != n:
                raise ValueError(
                    f"next_observations has {len(next_obs)} rows, expected {n} (the length of observations)"
                )
            if next_obs.shape[1] != obs.shape[1]:
                raise ValueError(
                    f"next_observations has dim {next_obs.shape[1]}, expected {obs.shape[1]} (observations)"
                )
            obs, next_obs = as_float32("observations", obs), as_float32("next_observations", next_obs)
        act32, rew = as_float32("actions", act), as_float32("rewards", rew)
        term, tout = episode_flags(term, tout)

        if observation_space is None:
            observation_space = spaces.Box(-np.inf, np.inf, (obs.shape[1],), np.float32)
        check_observation_space(observation_space)
        if not images and flat_dim(observation_space) != obs.shape[1]:
            raise ValueError(
                f"observations have dim {obs.shape[1]}, but observation_space flattens to {flat_dim(observation_space)}"
            )
        if action_space is None:
            action_space = _infer_action_space(act)  # the given values, not their float32 rounding
        check_action_space(action_space)
        if int(np.prod(action_space.shape)) != act.shape[1]:
            raise ValueError(f"actions have dim {act.shape[1]}, but action_space has shape {action_space.shape}")
        act32 = _check_bounds(act32, action_space, clip_actions)

        self.observation_space = observation_space
        self.action_space = action_space
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.observations: Any
        self.next_observations: Any
        if images:
            self.observations = {key: torch.as_tensor(value) for key, value in obs_tree.items()}
            self.next_observations = {key: torch.as_tensor(value) for key, value in next_tree.items()}
        else:
            self.observations = torch.as_tensor(obs, dtype=torch.float32)
            self.next_observations = torch.as_tensor(next_obs, dtype=torch.float32)
        self.actions = torch.as_tensor(act32, dtype=torch.float32)
        self.rewards = torch.as_tensor(rew, dtype=torch.float32)
        self.terminals = torch.as_tensor(term)
        self.timeouts = torch.as_tensor(tout)
        self.batch_device: torch.device | None = None  # set when kept on the host for a CUDA run
        if images:
            print(self.memory_summary())

    # constructors ------------------------------------------------------------------------------
    @classmethod
    def from_d4rl(cls, data: Mapping[str, Any] | str | os.PathLike, **kwargs: Any) -> OfflineBuffer:
        """From a D4RL-style mapping, ``.npz`` or ``.hdf5`` file.

        Keys: observations, actions, rewards, terminals, optional timeouts and
        next_observations. Without next_observations (raw D4RL files), they are taken from the
        following row, and the last row of each episode is dropped as ``d4rl.qlearning_dataset``
        does, since its successor is not in the file; the row before it then ends the episode (a
        timeout), so episode boundaries survive (``qlearning_dataset`` loses them). A row that is
        both terminal and timeout is terminal (see :class:`OfflineBuffer`), so it is kept, where
        ``qlearning_dataset`` drops it.

        Raises:
            ValueError: a file that is not a readable NPZ/HDF5 dataset (the message names the
                path), or arrays that do not line up (the message names the key and shapes).
        """
        arrays = _read_d4rl(data)
        missing = [k for k in REQUIRED_KEYS if k not in arrays and k != "next_observations"]
        if missing:
            raise KeyError(f"D4RL data is missing key(s) {missing}; found {sorted(arrays)}")
        if "next_observations" not in arrays:
            arrays = _derive_next_observations(arrays)
        keys = (*REQUIRED_KEYS, "timeouts")
        columns: dict[str, Any] = {k: arrays[k] for k in keys if k in arrays}
        return cls(**columns, **kwargs)

    @classmethod
    def from_minari(cls, dataset: Any, download: bool = False, **kwargs: Any) -> OfflineBuffer:
        """From a ``minari.MinariDataset`` or a dataset id (downloaded only if ``download``).

        Each episode's T+1 observations give observations = obs[:-1] and
        next_observations = obs[1:]; terminations become terminals and truncations timeouts.
        """
        from dql_agent.integrations.minari import load_minari_dataset, minari_to_transitions

        dataset = load_minari_dataset(dataset, download=download)
        arrays = minari_to_transitions(dataset)
        metadata = {"dataset_id": dataset.spec.dataset_id, **_minari_metadata(dataset)}
        kwargs.setdefault("observation_space", dataset.spec.observation_space)
        kwargs.setdefault("action_space", dataset.spec.action_space)
        kwargs["metadata"] = {**metadata, **(kwargs.get("metadata") or {})}
        return cls(**arrays, **kwargs)

    @classmethod
    def from_sb3(cls, replay_buffer: Any, relabeled_samples: int = 0, **kwargs: Any) -> OfflineBuffer:
        """From a Stable-Baselines3 ``ReplayBuffer``, ``DictReplayBuffer`` or ``HerReplayBuffer``
        (its Box actions are stored scaled to [-1, 1]): the transitions as stored, plus, with
        ``relabeled_samples`` > 0 and a HER buffer, that many drawn by its own ``sample`` with
        relabelled goals and recomputed rewards (see
        :func:`dql_agent.integrations.sb3.replay_buffer_to_transitions`)."""
        from dql_agent.integrations.sb3 import replay_buffer_to_transitions

        if not is_int(relabeled_samples) or relabeled_samples < 0:
            raise ValueError(f"relabeled_samples must be an int >= 0, got {relabeled_samples!r}")
        kwargs.setdefault("observation_space", replay_buffer.observation_space)
        kwargs.setdefault("action_space", replay_buffer.action_space)
        return cls(**replay_buffer_to_transitions(replay_buffer, int(relabeled_samples)), **kwargs)

    # use -----------------------------------------------------------------------------------
    def __repr__(self) -> str:
        ends = (self.terminals | self.timeouts).cpu()
        episodes = int(ends.sum()) + int(len(self) > 0 and not bool(ends[-1]))
        described = self.metadata.get("dataset_id") or self.metadata.get("env_id")
        return (
            f"OfflineBuffer({len(self):,} transitions, {episodes:,} episodes"
            f"{f' of {described!r}' if described else ''}, obs_dim={self.obs_dim}, action_dim={self.action_dim}, "
            f"terminals={int(self.terminals.sum()):,}, timeouts={int(self.timeouts.sum()):,}, device={self.device})"
        )

    def __len__(self) -> int:
        return self.actions.shape[0]

    @property
    def device(self) -> torch.device:
        return self.actions.device

    @property
    def obs_dim(self) -> int:
        """Length of the flattened observation (for spaces with images too, though those are stored by key)."""
        return flat_dim(self.observation_space)

    @property
    def has_images(self) -> bool:
        return isinstance(self.observations, dict)

    def bytes_per_transition(self) -> int:
        """Memory of one transition: observation and next observation (uint8 images), action,
        reward and the two flags."""
        per_obs = (
            tree_nbytes_per_row(self.observations)
            if isinstance(self.observations, dict)
            else self.observations.shape[1] * self.observations.element_size()
        )
        return 2 * per_obs + self.actions.shape[1] * 4 + 4 + 2

    def memory_summary(self) -> str:
        """One line: transitions, bytes per transition and in all, and the image keys' shapes."""
        per_row = self.bytes_per_transition()
        images = ", ".join(
            f"{key} {tuple(box.shape)} uint8" for key, box in leaves(self.observation_space) if is_image_space(box)
        )
        return (
            f"OfflineBuffer: {len(self):,} transitions, {per_row:,} bytes per transition "
            f"({len(self) * per_row / 2**20:,.1f} MiB in all; images {images or 'none'}; observation and next "
            "observation each stored)"
        )

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def to(self, device: str | torch.device) -> OfflineBuffer:
        """Move every array to ``device`` (in place); returns self."""
        for name in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
            setattr(self, name, tree_to(getattr(self, name), device))
        return self

    def replace(self, **arrays: torch.Tensor) -> OfflineBuffer:
        """A shallow copy with some arrays swapped (same rows; used for derived training views)."""
        new = copy.copy(self)
        for name, value in arrays.items():
            if name not in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
                raise ValueError(f"cannot replace {name!r}: not an array of the buffer")
            rows = len(next(iter(value.values()))) if isinstance(value, dict) else value.shape[0]
            if rows != len(self):
                raise ValueError(f"{name} has {rows} rows, expected {len(self)}")
            setattr(new, name, value)
        return new

    def observation_stats(self, eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std (+eps, so constant dimensions do not divide by 0), over the
        flattened observation; image pixels get mean 0 and std 1 (the encoder scales them)."""
        if not isinstance(self.observations, dict):
            obs = self.observations.double()
            return obs.mean(0).float(), (obs.std(0, unbiased=False) + eps).float()
        means, stds = [], []
        for key, box in leaves(self.observation_space):
            if is_image_space(box):
                means.append(torch.zeros(int(np.prod(box.shape))))
                stds.append(torch.ones(int(np.prod(box.shape))))
            else:
                obs = self.observations[key].reshape(len(self), -1).double().cpu()
                means.append(obs.mean(0).float())
                stds.append((obs.std(0, unbiased=False) + eps).float())
        return torch.cat(means), torch.cat(stds)

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of each episode (episodes end at a terminal or timeout)."""
        ends = (self.terminals | self.timeouts).cpu().numpy()
        rewards = self.rewards.cpu().numpy().astype(np.float64)
        cut = np.flatnonzero(ends) + 1
        return np.array([seg.sum() for seg in np.split(rewards, cut) if len(seg)])

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """Uniform batch with replacement; indices are drawn on the buffer's device."""
        return sample_batch(self, len(self), batch_size, generator)


# A dataset is kept on a CUDA device when it takes at most this share of the free memory (the
# networks, their activations and the optimizer need the rest); else it stays on the host.
DEVICE_MEMORY_SHARE = 0.5


def storage_device(nbytes: int, device: torch.device, free_bytes: int | None = None) -> torch.device:
    """Where a dataset of ``nbytes`` lives for training on ``device``: the device itself, unless it
    is a CUDA device whose free memory (``free_bytes``, default as CUDA reports it) the dataset
    would take more than ``DEVICE_MEMORY_SHARE`` of; then the host, batches moved over."""
    if device.type != "cuda":
        return device
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return device if nbytes <= DEVICE_MEMORY_SHARE * free_bytes else torch.device("cpu")


def sample_batch(source: Any, size: int, batch_size: int, generator: torch.Generator | None = None) -> Batch:
    """A uniform batch (with replacement) from the first ``size`` rows of ``source``'s
    observations/actions/rewards/next_observations/terminals tensors, indices drawn on their device.

    A dataset kept on the host for a CUDA run (``source.batch_device``) draws the indices with the
    run's generator on that device, gathers the rows on the host and moves them over from pinned
    memory."""
    storage = source.actions.device
    target = getattr(source, "batch_device", None) or storage
    idx = torch.randint(size, (batch_size,), device=target, generator=generator)
    if target != storage:
        idx = idx.to(storage)
    batch = Batch(
        take_rows(source.observations, idx),
        source.actions[idx],
        source.rewards[idx],
        take_rows(source.next_observations, idx),
        (~source.terminals[idx]).float(),
    )
    if target == storage:
        return batch
    return Batch(*(_pinned_to(part, target) for part in batch))


def _pinned_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, dict):
        return {key: _pinned_to(v, device) for key, v in value.items()}
    return value.pin_memory().to(device, non_blocking=True)


class ReplayBuffer:
    """The online algorithms' ring buffer of transitions, resident on the training device.

    Actions are stored in [-1, 1]; ``terminals`` holds true terminations only (a time-limit
    truncation is stored as not terminal, with the real final observation as next observation).
    CPU storage is allocated with ``torch.empty`` so untouched capacity costs no memory.

    Observations are (capacity, obs_dim) float32 rows, or, for an observation space with camera
    keys (:func:`dql_agent.encoders.has_images`), an observation tree: one (capacity, *shape)
    tensor per leaf key, uint8 for the images (never a float32 copy: 4x the memory) and float32
    for the vector keys; :meth:`sample` then returns trees of (B, *shape) rows.

    Args:
        capacity: transitions kept; the oldest are overwritten.
        observation_space: the observation space (a Box or Dict); an int is the flat observation
            length (the signature before camera observations), stored as float32 rows.
        action_dim: length of the flat action.
        device: where the arrays live.
    """

    def __init__(
        self, capacity: int, observation_space: spaces.Space | int, action_dim: int, device: str | torch.device
    ):
        self.capacity, self.device = capacity, torch.device(device)
        self.observation_space = observation_space if isinstance(observation_space, spaces.Space) else None
        self.has_images = self.observation_space is not None and has_images(self.observation_space)
        self.observations: Any
        self.next_observations: Any
        if isinstance(observation_space, spaces.Space) and self.has_images:
            self.observations = _empty_tree(observation_space, capacity, self.device)
            self.next_observations = _empty_tree(observation_space, capacity, self.device)
        else:
            obs_dim = flat_dim(observation_space) if isinstance(observation_space, spaces.Space) else observation_space
            self.observations = torch.empty((capacity, obs_dim), device=self.device)
            self.next_observations = torch.empty((capacity, obs_dim), device=self.device)
        self.actions = torch.empty((capacity, action_dim), device=self.device)
        self.rewards = torch.empty(capacity, device=self.device)
        self.terminals = torch.empty(capacity, dtype=torch.bool, device=self.device)
        self.pos, self.size = 0, 0

    def __len__(self) -> int:
        return self.size

    def bytes_per_transition(self) -> int:
        """Memory of one stored transition (observation and next observation, action, reward, flag)."""
        if isinstance(self.observations, dict):
            per_obs = sum(value[0].numel() * value.element_size() for value in self.observations.values())
        else:
            per_obs = self.observations.shape[1] * self.observations.element_size()
        return 2 * per_obs + self.actions.shape[1] * self.actions.element_size() + 4 + 1

    def add(
        self,
        observations: Any,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_observations: Any,
        terminals: np.ndarray,
    ) -> None:
        """Append one row per env: (n, obs_dim) (or a tree of (n, *shape) arrays per key), (n, A),
        (n,), the next observations like the observations, (n,) bool."""
        n = len(rewards)
        index = torch.arange(self.pos, self.pos + n, device=self.device) % self.capacity
        stores: list[tuple[torch.Tensor, Any]] = [
            (self.actions, actions),
            (self.rewards, rewards),
            (self.terminals, terminals),
        ]
        for name, store, value in (
            ("observations", self.observations, observations),
            ("next_observations", self.next_observations, next_observations),
        ):
            if isinstance(store, dict):
                if not isinstance(value, Mapping) or set(value) != set(store):
                    given = sorted(value) if isinstance(value, Mapping) else type(value).__name__
                    raise ValueError(f"{name} must be an observation tree with keys {sorted(store)}, got {given}")
                stores += [(store[key], value[key]) for key in store]
            else:
                stores.append((store, value))
        for store, value in stores:
            store[index] = torch.as_tensor(value, dtype=store.dtype).to(self.device)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Batch:
        """Uniform batch with replacement; indices are drawn on the buffer's device."""
        return sample_batch(self, self.size, batch_size, generator)


def _empty_tree(space: spaces.Space, capacity: int, device: torch.device) -> dict[str, torch.Tensor]:
    """(capacity, *shape) storage per leaf key of ``space``: uint8 images, float32 vectors."""
    return {
        key: torch.empty(
            (capacity, *box.shape), dtype=torch.uint8 if is_image_space(box) else torch.float32, device=device
        )
        for key, box in leaves(space)
    }


def _infer_action_space(actions: np.ndarray) -> spaces.Box:
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


def _check_bounds(actions: np.ndarray, space: spaces.Box, clip: bool) -> np.ndarray:
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


def _read_d4rl(data: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(data, Mapping):
        return {k: (dict(v) if isinstance(v, Mapping) else np.asarray(v)) for k, v in data.items()}
    path = os.fspath(data)
    if not os.path.exists(path):
        raise FileNotFoundError(f"D4RL file not found: {path}")
    if not path.endswith((".npz", ".hdf5", ".h5")):
        raise ValueError(f"D4RL file must end in .npz, .hdf5 or .h5, got {path}")
    try:
        if path.endswith(".npz"):
            if not zipfile.is_zipfile(path):  # else numpy takes it for a pickle and suggests unpickling
                raise ValueError("it is not a zip archive, as an .npz file is")
            with np.load(path, allow_pickle=False) as npz:  # never unpickle a data file
                return _nest({k: npz[k] for k in npz.files})
        import h5py

        def read(group: Any) -> dict[str, Any]:  # a group per dict key (goal-conditioned observations)
            return {
                k: (read(v) if isinstance(v, h5py.Group) else v[()])
                for k, v in group.items()
                if isinstance(v, (h5py.Group, h5py.Dataset))
            }

        with h5py.File(path, "r") as f:
            return read(f)
    except (OSError, ValueError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile) as error:
        # h5py and numpy name neither the file nor what was expected of it
        raise ValueError(f"{path} is not a readable HDF5/NPZ dataset: {error}") from error


def _nest(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """npz keys ``observations/achieved_goal`` (an .npz cannot hold dicts) as nested dicts."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


def _rows(value: Any, index: Any) -> Any:
    """``value[index]`` for an array or, key by key, a dict of arrays."""
    if isinstance(value, Mapping):
        return {k: _rows(v, index) for k, v in value.items()}
    return np.asarray(value)[index]


def _shift(value: Any) -> Any:
    """Each row's successor (the last row repeats), for an array or a dict of arrays."""
    if isinstance(value, Mapping):
        return {k: _shift(v) for k, v in value.items()}
    array = np.asarray(value)
    return np.concatenate([array[1:], array[-1:]], axis=0)


def _first_array(value: Any) -> Any:
    return _first_array(next(iter(value.values()))) if isinstance(value, Mapping) and value else value


def _derive_next_observations(arrays: dict[str, Any]) -> dict[str, Any]:
    raw = arrays["observations"]
    obs = raw if isinstance(raw, Mapping) else _as_array("observations", raw, 2)
    first = _as_array("observations", _first_array(obs), None)
    n = len(first)
    if n == 0:
        raise ValueError(f"the dataset is empty: observations has shape {first.shape}")
    for key in ("actions", "rewards", "terminals", "timeouts"):
        shape = np.shape(arrays.get(key, first))
        if not shape or shape[0] != n:
            raise ValueError(
                f"{key} has shape {shape}, expected {n} rows like observations {first.shape} "
                "(next_observations are taken from the following rows)"
            )
    terminals, timeouts = episode_flags(arrays["terminals"], arrays.get("timeouts"))
    # Row i's successor is row i+1 unless row i ends by time limit (its successor is lost) or
    # is the last row of the file.
    keep = ~timeouts
    keep[-1] = bool(terminals[-1])  # a terminal last row needs no successor
    # A dropped row ended its episode: the kept row before it ends it now (a timeout: still
    # bootstrapped), so per-episode returns (Diffusion-DICE's reward scale) do not merge episodes.
    ends = np.zeros(n, dtype=bool)
    dropped = np.flatnonzero(~keep)
    before = dropped[dropped >= 1] - 1
    ends[before[keep[before] & ~terminals[before]]] = True
    out = {k: np.asarray(arrays[k])[keep] for k in ("actions", "rewards")}
    out["observations"], out["terminals"] = _rows(obs, keep), terminals[keep]
    out["next_observations"] = _rows(_shift(obs), keep)
    out["timeouts"] = ends[keep]
    return out


def _minari_metadata(dataset: Any) -> dict[str, Any]:
    meta = dataset.storage.metadata
    out: dict[str, Any] = {}
    for key in ("ref_min_score", "ref_max_score"):
        if meta.get(key) is not None:
            out[key] = float(meta[key])
    env_spec = dataset.spec.env_spec
    if env_spec is not None:
        out["env_id"] = env_spec.id
    return out


REWARD_TRANSFORMS = ("none", "cql_antmaze", "normalize", "iql_locomotion", "iql_antmaze")


def transform_rewards(buffer: OfflineBuffer, kind: str) -> torch.Tensor:
    """The reward transforms of the official codes, as a new tensor.

    'none'; 'cql_antmaze': 4 (r - 0.5); 'normalize': z-score; 'iql_locomotion': r * 1000 /
    (max - min episode return); 'iql_antmaze': 0 if r > 0 else -1.
    """
    rewards = buffer.rewards
    if kind == "cql_antmaze":
        return (rewards - 0.5) * 4.0
    if kind == "normalize":
        return (rewards - rewards.mean()) / rewards.std().clamp(min=1e-8)
    if kind == "iql_locomotion":
        returns = buffer.episode_returns()
        spread = float(returns.max() - returns.min())
        if not spread > 0:
            raise ValueError(
                f"reward_transform='iql_locomotion' needs episodes with different returns, but all "
                f"{len(returns)} episode(s) return {returns.max():.6g}; use reward_transform='none' or 'normalize'"
            )
        return rewards * (1000.0 / spread)
    if kind == "iql_antmaze":
        return torch.where(rewards > 0, 0.0, -1.0).to(rewards.dtype)
    if kind != "none":
        raise ValueError(f"reward_transform must be one of {REWARD_TRANSFORMS}, got {kind!r}")
    return rewards.clone()
