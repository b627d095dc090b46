"""OfflineBuffer and ReplayBuffer: the transitions an algorithm trains on, and how batches are drawn.

An :class:`OfflineBuffer` is a static dataset, checked once (observations by
:mod:`dql_agent.observations`, the other columns by :mod:`dql_agent.transitions`) and kept on
the training device; the readers in :mod:`dql_agent.readers` fill it from files. A
:class:`ReplayBuffer` is the online algorithms' ring buffer. :func:`prepare_training_data` turns
a dataset into what an agent trains on (normalised observations, actions in [-1, 1],
transformed rewards, on the device).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from gymnasium import spaces

from dql_agent.chunks import Chunking, chunk_transitions, episode_index
from dql_agent.config import is_int
from dql_agent.observations import (
    as_float32,
    box_of,
    check_observation_space,
    dict_space_of,
    flat_dim,
    flatten,
    has_images,
    is_image_space,
    leaves,
    observation_stats,
    rows_of,
    take_rows,
    tree_from_arrays,
    tree_nbytes_per_row,
    tree_to,
)
from dql_agent.report import report
from dql_agent.rewards import transform_rewards
from dql_agent.spaces import check_action_space, scale_actions
from dql_agent.transitions import check_action_bounds, column, episode_flags, flat_rows, infer_action_space

if TYPE_CHECKING:
    from dql_agent.policy import PolicyBase


class Batch(NamedTuple):
    """A batch of transitions; ``not_dones`` is 1 - terminal (timeouts are not terminals).

    Observations are (B, obs_dim) float32, or for spaces with images an observation tree (a dict
    of (B, *shape) tensors per key, see :mod:`dql_agent.observations`) until the policy encodes them.
    """

    observations: Any  # (B, obs_dim), or a tree; (B, k, ...) histories with n_obs_steps = k > 1
    actions: torch.Tensor  # (B, act_dim); (B, h * act_dim) chunks with action_horizon = h > 1
    rewards: torch.Tensor  # (B,); a chunk's discounted reward sum
    next_observations: Any  # like observations
    not_dones: torch.Tensor  # (B,)
    discounts: torch.Tensor | None = None  # (B,) gamma^L of a chunk's bootstrap; None: the config's gamma
    action_mask: torch.Tensor | None = None  # (B, h * act_dim) 0 on a chunk's padding; None: no padding


def _flat_observations(name: str, observations: Any, space: spaces.Space) -> np.ndarray:
    """A dataset's observations without camera keys as (N, flat_dim) rows: a dict of arrays per
    key is checked and flattened in the space's leaf order; an array may come flat or in the
    space's shape (its float checks follow, once the columns' lengths agree)."""
    if isinstance(observations, Mapping):
        if not isinstance(space, spaces.Dict):
            raise TypeError(f"{name} is a dict, so observation_space must be a Dict space, got {type(space).__name__}")
        return flatten(space, tree_from_arrays(space, observations, name))
    return flat_rows(name, observations, tuple(space.shape) if isinstance(space, spaces.Box) else None)


class OfflineBuffer:
    """A dataset of transitions (s, a, r, s', terminal, timeout) for offline RL.

    Arrays are validated once (dtypes, shapes, lengths, finiteness once cast to float32, 0/1
    flags, action bounds) and stored as float32 tensors (camera keys as uint8); :meth:`to` moves
    them to the training device, where :meth:`sample` draws uniform batches with replacement
    without leaving the device.

    Args:
        observations: (N, obs_dim) flattened observations or (N, *shape) in the Box's shape, or
            for a Dict observation space a dict of (N, *shape) arrays per key (goal-conditioned
            data: ``observation``, ``achieved_goal``, ``desired_goal``; camera keys as uint8
            frames), flattened in the Dict space's order unless the space has cameras (see
            :mod:`dql_agent.observations`); without ``observation_space`` one is inferred.
        actions: (N, act_dim) or (N, *action_shape) actions in the environment's units (within
            ``action_space``).
        rewards: (N,) rewards.
        next_observations: observations after each action, like ``observations``.
        terminals: (N,) true where the episode ended in a terminal state (no bootstrap); bool,
            or numbers that are all 0 or 1.
        timeouts: (N,) true where the episode was cut by a time limit (still bootstrapped); bool
            or 0/1. A row that is both terminal and timeout is terminal (its timeout is cleared),
            as gymnasium reports a time limit that falls on a terminal step.
        observation_space: the environment's observation space (Box or Dict); inferred when
            omitted (an unbounded float32 Box, uint8 (N, H, W, C) frames as a camera).
        action_space: the Box the actions live in; inferred from the data when omitted
            ([-1, 1] if the data fits, else the per-dimension min/max, with a warning).
        clip_actions: clip actions outside ``action_space`` (with a warning) instead of raising.
        metadata: free-form provenance (dataset id, env id, reference scores) carried into
            checkpoints and model cards.
    """

    def __init__(  # noqa: C901 - one flat sequence of checks, each branch its own error message
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
        if isinstance(observations, Mapping) != isinstance(next_observations, Mapping):
            raise TypeError("observations and next_observations must both be dicts of arrays, or both arrays")
        if observation_space is None:
            if isinstance(observations, Mapping):
                observation_space = dict_space_of(observations)
            else:
                observation_space = box_of(column("observations", observations, None))
        check_observation_space(observation_space)
        images = has_images(observation_space)
        if images:
            # uint8 images stay uint8 (a float32 copy would take 4x the memory), keyed like the space
            obs_tree = tree_from_arrays(observation_space, observations, "observations")
            next_tree = tree_from_arrays(observation_space, next_observations, "next_observations")
            n, n_next = rows_of(obs_tree), rows_of(next_tree)
            if n_next != n:
                raise ValueError(f"next_observations has {n_next} rows, expected {n} (the length of observations)")
        else:
            obs = _flat_observations("observations", observations, observation_space)
            next_obs = _flat_observations("next_observations", next_observations, observation_space)
            n = len(obs)
        action_shape = tuple(action_space.shape) if isinstance(action_space, spaces.Box) else None
        act = flat_rows("actions", actions, action_shape)
        rew = column("rewards", rewards, 1)
        term = column("terminals", terminals, 1)
        tout = np.zeros(len(term), dtype=bool) if timeouts is None else column("timeouts", timeouts, 1)
        if n == 0:
            raise ValueError("the dataset is empty: observations has 0 rows")
        for name, array in (("actions", act), ("rewards", rew), ("terminals", term), ("timeouts", tout)):
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
            if flat_dim(observation_space) != obs.shape[1]:
                raise ValueError(
                    f"observations have dim {obs.shape[1]}, but observation_space flattens to "
                    f"{flat_dim(observation_space)}"
                )
        act32, rew = as_float32("actions", act), as_float32("rewards", rew)
        term, tout = episode_flags(term, tout)
        if action_space is None:
            action_space = infer_action_space(act)  # the given values, not their float32 rounding
        check_action_space(action_space)
        if int(np.prod(action_space.shape)) != act.shape[1]:
            raise ValueError(f"actions have dim {act.shape[1]}, but action_space has shape {action_space.shape}")
        act32 = check_action_bounds(act32, action_space, clip_actions)

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
        self.chunking: Chunking | None = None  # set on a training view that samples chunks
        if images:
            report(self.memory_summary())

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
        from dql_agent.readers.d4rl import read_d4rl

        return cls(**read_d4rl(data), **kwargs)

    @classmethod
    def from_minari(cls, dataset: Any, download: bool = False, **kwargs: Any) -> OfflineBuffer:
        """From a ``minari.MinariDataset`` or a dataset id (downloaded only if ``download``).

        Each episode's T+1 observations give observations = obs[:-1] and
        next_observations = obs[1:]; terminations become terminals and truncations timeouts.
        """
        from dql_agent.readers.minari import load_minari_dataset, minari_metadata, minari_to_transitions

        dataset = load_minari_dataset(dataset, download=download)
        arrays = minari_to_transitions(dataset)
        kwargs.setdefault("observation_space", dataset.spec.observation_space)
        kwargs.setdefault("action_space", dataset.spec.action_space)
        kwargs["metadata"] = {**minari_metadata(dataset), **(kwargs.get("metadata") or {})}
        return cls(**arrays, **kwargs)

    @classmethod
    def from_sb3(cls, replay_buffer: Any, relabeled_samples: int = 0, **kwargs: Any) -> OfflineBuffer:
        """From a Stable-Baselines3 ``ReplayBuffer``, ``DictReplayBuffer`` or ``HerReplayBuffer``
        (its Box actions are stored scaled to [-1, 1]): the transitions as stored, plus, with
        ``relabeled_samples`` > 0 and a HER buffer, that many drawn by its own ``sample`` with
        relabelled goals and recomputed rewards (see
        :func:`dql_agent.readers.sb3.replay_buffer_to_transitions`)."""
        from dql_agent.readers.sb3 import replay_buffer_to_transitions

        if not is_int(relabeled_samples) or relabeled_samples < 0:
            raise ValueError(f"relabeled_samples must be an int >= 0, got {relabeled_samples!r}")
        kwargs.setdefault("observation_space", replay_buffer.observation_space)
        kwargs.setdefault("action_space", replay_buffer.action_space)
        return cls(**replay_buffer_to_transitions(replay_buffer, int(relabeled_samples)), **kwargs)

    @classmethod
    def from_lerobot(cls, source: str | os.PathLike[str], **kwargs: Any) -> OfflineBuffer:
        """From a LeRobot dataset (v3.0 or v2.1, Parquet tables and MP4 video): a local folder or a
        Hub dataset id. Keywords (``revision``, ``keys``, ``episodes``, ``image_size``, the
        action bounds, ``reward``, ``memory_budget_bytes``, ...) and what the dataset becomes are
        :func:`dql_agent.readers.lerobot.read_lerobot`'s; it needs ``pip install dql_agent[lerobot]``."""
        from dql_agent.readers.lerobot import read_lerobot

        return cls(**read_lerobot(source, **kwargs))

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
        """Per-dimension mean and std of the flat observation (see
        :func:`dql_agent.observations.observation_stats`)."""
        return observation_stats(self.observation_space, self.observations, eps)

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
    chunking: Chunking | None = getattr(source, "chunking", None)
    if chunking is not None:  # chunks of actions, histories of observations (dql_agent.chunks)
        batch = Batch(**chunk_transitions(source, chunking.episodes, idx, *chunking[:3]))
    else:
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
    if value is None:
        return None
    if isinstance(value, dict):
        return {key: _pinned_to(v, device) for key, v in value.items()}
    return value.pin_memory().to(device, non_blocking=True)


class ReplayBuffer:
    """The online algorithms' ring buffer of transitions, resident on the training device.

    Actions are stored in [-1, 1]; ``terminals`` holds true terminations only (a time-limit
    truncation is stored as not terminal, with the real final observation as next observation).
    CPU storage is allocated with ``torch.empty`` so untouched capacity costs no memory.

    Observations are (capacity, obs_dim) float32 rows, or, for an observation space with camera
    keys (:func:`dql_agent.observations.has_images`), an observation tree: one (capacity, *shape)
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


def prepare_training_data(
    buffer: OfflineBuffer,
    policy: PolicyBase,
    device: torch.device,
    *,
    reward_transform: str = "none",
    normalize_observations: bool = False,
    action_horizon: int = 1,
    n_obs_steps: int = 1,
    gamma: float = 0.99,
) -> OfflineBuffer:
    """What an agent trains on: ``buffer`` with its observations normalised (when asked; the
    statistics go into ``policy``), actions scaled to [-1, 1], rewards transformed, on ``device``
    when it fits, else in host memory with each batch copied over (``batch_device``). With
    ``action_horizon`` or ``n_obs_steps`` above 1 its batches are chunks and histories inside
    episodes, with the h-step backup's discount ``gamma`` (see :mod:`dql_agent.chunks`)."""
    rewards = transform_rewards(buffer, reward_transform)
    if normalize_observations:
        mean, std = buffer.observation_stats()
        policy.obs_mean.copy_(mean)
        policy.obs_std.copy_(std)
    nbytes = len(buffer) * buffer.bytes_per_transition()
    place = storage_device(nbytes, device)
    data = buffer.replace(
        observations=policy.normalize_observations(tree_to(buffer.observations, place)),
        next_observations=policy.normalize_observations(tree_to(buffer.next_observations, place)),
        actions=scale_actions(buffer.actions, policy.action_space),
        rewards=rewards,
    ).to(place)
    if action_horizon > 1 or n_obs_steps > 1:
        data.chunking = Chunking(action_horizon, n_obs_steps, gamma, episode_index(data.terminals, data.timeouts))
    if place != device:
        data.batch_device = device
        warnings.warn(
            f"the dataset ({nbytes / 2**30:.1f} GiB) takes more than half of {device}'s free memory: it stays "
            "in host memory and each batch is copied over",
            stacklevel=3,
        )
    return data
