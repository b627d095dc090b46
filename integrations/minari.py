"""Minari datasets in and out, with the episode alignment done right.

A Minari episode of ``T`` steps stores ``T + 1`` observations (the reset observation plus one
per step) and ``T`` actions, rewards, terminations and truncations. Flat transition arrays
therefore take ``observations = obs[:-1]`` and ``next_observations = obs[1:]`` *per episode*.
Concatenating the ``T + 1`` observations of all episodes first (as d3rlpy's ``get_minari`` does)
shifts every later episode by one step; :func:`minari_to_transitions` never does that.

Writing uses :func:`minari.create_dataset_from_buffers` with plain
:class:`minari.data_collector.EpisodeBuffer` objects, so no ``jax`` (``minari[create]``) is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from gymnasium.envs.registration import EnvSpec
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.storage import get_dataset_path

from dql_agent.buffer import as_float32, episode_flags
from dql_agent.encoders import has_images, tree_from_arrays
from dql_agent.spaces import check_observation_space, flatten_batch

__all__ = ["load_minari_dataset", "minari_to_transitions", "write_minari_dataset"]

# Minari ids are "(namespace/)name-vN"; minari itself crashes with a TypeError without "-vN".
_VERSIONED_ID = re.compile(r"-v\d+$")

_EPISODE_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")
_FLOAT_KEYS = ("observations", "next_observations", "actions", "rewards")


def _check_dataset_id(dataset_id: str) -> None:
    valid = isinstance(dataset_id, str) and _VERSIONED_ID.search(dataset_id) is not None
    if valid:
        try:
            parse_dataset_id(dataset_id)  # minari's own grammar, e.g. namespaces of 2+ characters
        except ValueError:
            valid = False
    if not valid:
        raise ValueError(
            f"dataset id {dataset_id!r} is not a Minari id: expected '(namespace/)name-vN' "
            "(letters, digits, '-' and '_'), e.g. 'mujoco/hopper/medium-v0'"
        )


def load_minari_dataset(dataset_or_id: str | minari.MinariDataset, download: bool = False) -> minari.MinariDataset:
    """Return a :class:`minari.MinariDataset`, loading it from the local store when given an id.

    Args:
        dataset_or_id: a ``MinariDataset`` (returned as is) or an id such as
            ``"mujoco/hopper/medium-v0"``.
        download: fetch the dataset from Minari's remote (``MINARI_REMOTE``, default the
            ``farama-minari`` Hugging Face organisation) when it is not stored locally.

    Raises:
        ValueError: the id lacks the ``-vN`` version suffix.
        FileNotFoundError: the dataset is not stored locally and ``download`` is False. The
            message names the directory searched (``$MINARI_DATASETS_PATH``, else
            ``~/.minari/datasets``).
    """
    if isinstance(dataset_or_id, minari.MinariDataset):
        return dataset_or_id
    _check_dataset_id(dataset_or_id)
    path = Path(get_dataset_path(dataset_or_id))
    if not download and not (path / "data").exists():
        root = "$MINARI_DATASETS_PATH" if "MINARI_DATASETS_PATH" in os.environ else "the default"
        raise FileNotFoundError(
            f"Minari dataset {dataset_or_id!r} is not stored locally: looked in {path} ({root} "
            "root; datasets live under $MINARI_DATASETS_PATH, else ~/.minari/datasets). Pass "
            f"download=True to fetch it, or run `minari download {dataset_or_id}`."
        )
    if (path / "data").exists():
        _refuse_spaces_from_code(path / "data", dataset_or_id)
    return minari.load_dataset(dataset_or_id, download=download)


def _refuse_spaces_from_code(data_path: Path, dataset_id: str) -> None:
    """Minari makes the env named in a dataset's ``env_spec`` (importing its entry point's module)
    when the metadata lacks a stored space: code named in a file. Refuse such datasets instead."""
    from minari.dataset.minari_storage import MinariStorage

    metadata = MinariStorage.read_raw_metadata(str(data_path))
    missing = [key for key in ("observation_space", "action_space") if key not in metadata]
    if missing:
        raise ValueError(
            f"Minari dataset {dataset_id!r} stores no {' or '.join(missing)} in {data_path}/metadata.json; "
            "minari would build them by making the env its env_spec names, which imports code named in a "
            "file. Recreate the dataset with its spaces (minari.create_dataset_from_buffers(..., "
            "observation_space=..., action_space=...))"
        )


def _leading_lengths(data: Any) -> set[int]:
    """The set of first-axis lengths over every array in a (possibly nested) dict."""
    if isinstance(data, Mapping):
        lengths: set[int] = set()
        for value in data.values():
            lengths |= _leading_lengths(value)
        return lengths
    return {len(data)}


def minari_to_transitions(dataset: str | minari.MinariDataset) -> dict[str, Any]:
    """Flatten a Minari dataset into transition arrays, aligned per episode.

    For each episode of ``T`` steps, ``observations`` are its ``obs[:-1]`` and
    ``next_observations`` its ``obs[1:]``, so no transition crosses an episode boundary.

    Observation spaces may be a Box or a Dict of Boxes (nested Dicts too, as in goal-conditioned
    robotics with ``achieved_goal``/``desired_goal``/``observation``). Dicts are flattened exactly
    like ``gymnasium.spaces.flatten(dataset.observation_space, obs)``: each Box in C order, the
    sub-spaces concatenated in the Dict space's key order, which gymnasium sorts alphabetically
    for plain dicts (so ``achieved_goal, desired_goal, observation``).

    Camera datasets (a uint8 [0, 255] image Box, alone or in the Dict) are not flattened: their
    ``observations`` and ``next_observations`` are observation trees (see
    :mod:`dql_agent.encoders`), a dict from key to (N, *shape) arrays, uint8 images kept uint8.

    Args:
        dataset: a ``MinariDataset`` or a local dataset id.

    Returns:
        ``observations`` (N, obs_dim) float32, ``actions`` (N, act_dim) float32, ``rewards`` (N,)
        float32, ``next_observations`` (N, obs_dim) float32, ``terminals`` (N,) bool (from
        ``terminations``) and ``timeouts`` (N,) bool (from ``truncations``), N = total steps. A
        step both terminated and truncated (gymnasium's ``TimeLimit`` reports both when the
        limit falls on a terminal step) is terminal, with ``timeouts`` False, as in
        :class:`~dql_agent.OfflineBuffer`.

    Raises:
        TypeError: the observation or action space is not a Box (or a Dict of Boxes for
            observations), e.g. Discrete, Tuple or Text; or complex/non-numeric stored data.
        ValueError: an episode does not hold ``T + 1`` observations for ``T`` actions; NaN/inf or
            values too large for float32 (naming the key and the first row); terminations or
            truncations that are neither bool nor 0/1.
    """
    dataset = load_minari_dataset(dataset)
    obs_space, act_space = dataset.observation_space, dataset.action_space
    if not isinstance(act_space, gym.spaces.Box):
        raise TypeError(f"action space {act_space} is not supported: expected a Box, got {type(act_space).__name__}")
    check_observation_space(obs_space)

    columns: dict[str, list[np.ndarray]] = {
        "observations": [],
        "next_observations": [],
        "actions": [],
        "rewards": [],
        "terminals": [],
        "timeouts": [],
    }
    images = has_images(obs_space)
    trees: dict[str, dict[str, list[np.ndarray]]] = {"observations": {}, "next_observations": {}}
    for episode in dataset.iterate_episodes():
        n_steps = len(episode.rewards)
        if images:  # kept by key, images as uint8 (a float32 copy of a camera dataset is 4x larger)
            tree = tree_from_arrays(obs_space, episode.observations, f"episode {episode.id} observations")
            rows = len(next(iter(tree.values())))
        else:
            obs = flatten_batch(obs_space, episode.observations)  # (T+1, obs_dim)
            rows = obs.shape[0]
        if rows != n_steps + 1:
            raise ValueError(
                f"episode {episode.id}: expected {n_steps + 1} observations for {n_steps} steps, got {rows}"
            )
        if images:
            for key, value in tree.items():
                trees["observations"].setdefault(key, []).append(value[:-1])
                trees["next_observations"].setdefault(key, []).append(value[1:])
        else:
            columns["observations"].append(obs[:-1])
            columns["next_observations"].append(obs[1:])
        columns["actions"].append(flatten_batch(act_space, episode.actions))
        columns["rewards"].append(np.asarray(episode.rewards))
        columns["terminals"].append(np.asarray(episode.terminations))
        columns["timeouts"].append(np.asarray(episode.truncations))

    if not columns["rewards"]:
        raise ValueError(f"Minari dataset {dataset.spec.dataset_id!r} holds no episodes")
    # Cast and check once over all episodes, with OfflineBuffer's own checks, so rows in errors
    # are transition rows.
    out: dict[str, Any] = {
        key: as_float32(key, np.concatenate(columns[key])) for key in _FLOAT_KEYS if not (images and "obs" in key)
    }
    if images:
        for name, tree_parts in trees.items():
            out[name] = {key: np.concatenate(parts) for key, parts in tree_parts.items()}
    out["terminals"], out["timeouts"] = episode_flags(
        np.concatenate(columns["terminals"]), np.concatenate(columns["timeouts"])
    )
    return out


def _episode_arrays(space: gym.Space, data: Any, where: str) -> Any:
    """Cast one episode's observations or actions to arrays of the space's dtype and shape.

    Dict spaces give plain dicts of arrays, the layout minari's storage writes as sub-groups.
    """
    if isinstance(space, gym.spaces.Dict):
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a dict for a Dict space, got {type(data).__name__}")
        missing = [key for key in space.keys() if key not in data]
        if missing:
            raise ValueError(f"{where}: missing keys {missing} of the Dict space")
        return {key: _episode_arrays(sub, data[key], f"{where}[{key!r}]") for key, sub in space.items()}
    if not isinstance(space, gym.spaces.Box):
        raise TypeError(f"{where}: space {space} is not supported: expected a Box or a Dict of Boxes")
    array = np.asarray(data, dtype=space.dtype)
    if array.shape[1:] != space.shape:
        raise ValueError(
            f"{where}: expected shape (steps, {', '.join(map(str, space.shape))}) for space {space}, got {array.shape}"
        )
    return array


def _episode_buffer(
    index: int, episode: Mapping[str, Any], obs_space: gym.Space, act_space: gym.Space
) -> EpisodeBuffer:
    """Validate one episode dict and wrap it in an ``EpisodeBuffer``."""
    if not isinstance(episode, Mapping):
        raise ValueError(f"episode {index}: expected a dict, got {type(episode).__name__}")
    missing = [key for key in _EPISODE_KEYS if key not in episode]
    if missing:
        raise ValueError(f"episode {index}: missing keys {missing}; expected {list(_EPISODE_KEYS)}")

    observations = _episode_arrays(obs_space, episode["observations"], f"episode {index} observations")
    actions = _episode_arrays(act_space, episode["actions"], f"episode {index} actions")
    n_steps = len(np.asarray(episode["rewards"]))
    if n_steps == 0:
        raise ValueError(f"episode {index}: 'rewards' is empty; an episode needs at least one step")
    expected = {"observations": n_steps + 1, "actions": n_steps}
    for key, data in (("observations", observations), ("actions", actions)):
        if _leading_lengths(data) != {expected[key]}:
            raise ValueError(
                f"episode {index}: {key!r} has length {sorted(_leading_lengths(data))}, expected "
                f"{expected[key]} (T + 1 observations and T actions for T = {n_steps} rewards)"
            )
    for key in ("terminations", "truncations"):
        if len(np.asarray(episode[key])) != n_steps:
            raise ValueError(
                f"episode {index}: {key!r} has length {len(np.asarray(episode[key]))}, expected "
                f"{n_steps} (one per reward)"
            )
    return EpisodeBuffer(
        id=index,
        observations=observations,
        actions=actions,
        rewards=np.asarray(episode["rewards"], dtype=np.float64),
        terminations=np.asarray(episode["terminations"], dtype=bool),
        truncations=np.asarray(episode["truncations"], dtype=bool),
        infos={},
    )


def write_minari_dataset(
    dataset_id: str,
    episodes: Sequence[Mapping[str, Any]],
    *,
    observation_space: gym.Space,
    action_space: gym.Space,
    env_id: str | EnvSpec | None = None,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    author: str = "dql_agent",
    author_email: str | None = None,
    code_permalink: str | None = None,
    description: str | None = None,
    algorithm_name: str | None = None,
) -> minari.MinariDataset:
    """Write episodes to a new local Minari dataset (under ``$MINARI_DATASETS_PATH``).

    Args:
        dataset_id: a new id of the form ``(namespace/)name-vN``; an existing one is an error.
        episodes: one dict per episode with ``observations`` (T+1, ...), ``actions`` (T, ...),
            ``rewards`` (T,), ``terminations`` (T,) and ``truncations`` (T,). For a Dict
            observation space, ``observations`` is a dict of such arrays.
        observation_space: the space of one observation (a Box or a Dict of Boxes).
        action_space: the space of one action (a Box).
        env_id: the Gymnasium id or spec the data came from; stored as both the collection and
            the evaluation environment, so ``dataset.recover_environment()`` works.
        ref_min_score: mean return of a random policy, for ``minari.get_normalized_score``.
        ref_max_score: mean return of an expert policy. Give both scores or neither: we never
            let minari estimate a missing one by rolling out 100 episodes.
        author: stored in the dataset metadata.
        author_email, code_permalink: contact and code link for the metadata (minari's reminders
            about leaving them out are silenced: that is the caller's choice).
        description: stored in the metadata; defaults to a one-line summary of the episodes.
        algorithm_name: the policy that collected the data, stored in the metadata.

    Returns:
        The written ``MinariDataset``.

    Raises:
        ValueError: a malformed id, an existing dataset, only one reference score, or an episode
            whose arrays do not line up (the message names the episode index and the key).
        TypeError: an observation space other than a Box or a Dict of Boxes, or a non-Box
            action space.

    A write that fails part-way removes the half-written dataset directory.
    """
    _check_dataset_id(dataset_id)
    if (ref_min_score is None) != (ref_max_score is None):
        raise ValueError(
            f"give both ref_min_score and ref_max_score or neither, got ref_min_score="
            f"{ref_min_score}, ref_max_score={ref_max_score}"
        )
    if not isinstance(action_space, gym.spaces.Box):
        raise TypeError(f"action_space must be a Box, got {type(action_space).__name__}")
    if len(episodes) == 0:
        raise ValueError("episodes is empty; a Minari dataset needs at least one episode")
    path = Path(get_dataset_path(dataset_id))
    if path.exists():
        raise ValueError(
            f"Minari dataset {dataset_id!r} already exists at {path}; choose a new id or version, "
            "or delete it with minari.delete_dataset"
        )
    buffers = [_episode_buffer(i, episode, observation_space, action_space) for i, episode in enumerate(episodes)]
    if description is None:
        n_steps = sum(len(buffer.rewards) for buffer in buffers)
        description = f"{len(buffers)} episodes, {n_steps} steps, written by dql_agent."

    try:
        with warnings.catch_warnings():
            # Leaving these out is the caller's choice, not a mistake worth a warning.
            warnings.filterwarnings("ignore", message="`algorithm_name` is set to None")
            warnings.filterwarnings("ignore", message="`eval_env` is set to None")
            warnings.filterwarnings("ignore", message="env_spec is None")
            warnings.filterwarnings("ignore", message="`author_email` is set to None")
            warnings.filterwarnings("ignore", message="`code_permalink` is set to None")
            dataset = minari.create_dataset_from_buffers(
                dataset_id=dataset_id,
                buffer=buffers,
                env=env_id,
                eval_env=env_id,
                algorithm_name=algorithm_name,
                author=author,
                author_email=author_email,
                code_permalink=code_permalink,
                action_space=action_space,
                observation_space=observation_space,
                ref_min_score=ref_min_score,
                ref_max_score=ref_max_score,
                description=description,
            )
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # minari made the directory before failing
        raise
    if ref_min_score is not None and ref_max_score is not None and "ref_min_score" not in dataset.storage.metadata:
        # Without an env spec minari silently drops the reference scores; store them ourselves.
        dataset.storage.update_metadata({"ref_min_score": float(ref_min_score), "ref_max_score": float(ref_max_score)})
    return dataset
