"""Writing Minari datasets from your own episodes, without jax.

Reading is :mod:`dql_agent.readers.minari` (``OfflineBuffer.from_minari``); its two functions are
re-exported here. An episode of ``T`` steps holds ``T + 1`` observations (the reset observation
plus one per step) and ``T`` actions, rewards, terminations and truncations.

Writing uses :func:`minari.create_dataset_from_buffers` with plain
:class:`minari.data_collector.EpisodeBuffer` objects, so no ``jax`` (``minari[create]``) is needed.
"""

from __future__ import annotations

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
from minari.storage import get_dataset_path

from dql_agent.readers.minari import check_dataset_id, load_minari_dataset, minari_to_transitions

__all__ = ["load_minari_dataset", "minari_to_transitions", "write_minari_dataset"]

_EPISODE_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")


def _leading_lengths(data: Any) -> set[int]:
    """The set of first-axis lengths over every array in a (possibly nested) dict."""
    if isinstance(data, Mapping):
        lengths: set[int] = set()
        for value in data.values():
            lengths |= _leading_lengths(value)
        return lengths
    return {len(data)}


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
    check_dataset_id(dataset_id)
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
