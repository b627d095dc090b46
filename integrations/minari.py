"""Your own data as a dataset: record episodes of any policy, write them as Minari or as an .npz.

- :func:`record_episode` plays one episode of any policy (a scripted controller, an SB3 model's
  ``predict``, a teleoperation bridge) in an env and returns it in Minari's layout;
- :func:`write_minari_dataset` writes such episodes (or a log you recorded yourself, as arrays) as
  a local Minari dataset, read back by ``OfflineBuffer.from_minari(id)``;
- :func:`episodes_to_transitions` aligns them as D4RL-style transition columns, for ``np.savez``
  and ``OfflineBuffer.from_d4rl("file.npz")`` (or ``OfflineBuffer(**columns)``).

An episode of ``T`` steps holds ``T + 1`` observations (the reset observation plus one per step)
and ``T`` actions, rewards, terminations and truncations. Reading is :mod:`dql_agent.readers.minari`
(``OfflineBuffer.from_minari``); its two functions are re-exported here.

Writing uses :func:`minari.create_dataset_from_buffers` with plain
:class:`minari.data_collector.EpisodeBuffer` objects, so no ``jax`` is needed: Minari's own
``DataCollector`` needs ``minari[create]`` (jax), which dql_agent does not install.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import minari
import numpy as np
from gymnasium.envs.registration import EnvSpec
from minari.data_collector import EpisodeBuffer
from minari.storage import get_dataset_path

if TYPE_CHECKING:
    from dql_agent.readers.minari import load_minari_dataset, minari_to_transitions

__all__ = [
    "episodes_to_transitions",
    "load_minari_dataset",
    "minari_to_transitions",
    "record_episode",
    "write_minari_dataset",
]

_EPISODE_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")


def __getattr__(name: str) -> Any:
    # The readers' functions load torch (observations): imported when asked for, so recording and
    # writing episodes (and importing dql_agent, whose PixelReach task records with them) do not.
    if name in ("load_minari_dataset", "minari_to_transitions"):
        from dql_agent.readers import minari as reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def record_episode(
    env: gym.Env, act: Callable[[Any], np.ndarray], reset_seed: int, max_steps: int | None = None
) -> dict[str, Any]:
    """Play one episode of ``act`` (observation -> action) in Minari's layout.

    ``act`` is any policy: a function, an SB3 model (``lambda obs: model.predict(obs,
    deterministic=True)[0]``), a bridge to a teleoperation device. The stored action is the one the
    env applies: clipped to the action Box and cast to its dtype. ``max_steps`` truncates the
    episode early (to fill a step budget exactly).

    Returns:
        ``observations`` (T+1, ...) in the observation space's dtype (a dict of such arrays for a
        Dict space), ``actions`` (T, act_dim), ``rewards`` (T,) float64, ``terminations`` and
        ``truncations`` (T,) bool: one entry of :func:`write_minari_dataset`'s ``episodes``.
    """
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        raise TypeError(f"env.action_space must be a Box, got {type(space).__name__}")
    obs, _ = env.reset(seed=reset_seed)
    observations: list[Any] = [obs]
    actions: list[np.ndarray] = []
    rewards: list[float] = []
    terminations: list[bool] = []
    truncations: list[bool] = []
    while True:
        action = np.clip(act(obs), space.low, space.high).astype(space.dtype)
        obs, reward, terminated, truncated, _ = env.step(action)
        truncated = truncated or (max_steps is not None and len(actions) + 1 >= max_steps)
        observations.append(obs)
        actions.append(action)
        rewards.append(float(reward))
        terminations.append(bool(terminated))
        truncations.append(bool(truncated))
        if terminated or truncated:
            break
    if isinstance(obs, dict):
        stacked: Any = {key: np.stack([o[key] for o in observations]) for key in obs}
    else:
        stacked = np.asarray(observations, dtype=env.observation_space.dtype)
    return {
        "observations": stacked,
        "actions": np.asarray(actions),
        "rewards": np.asarray(rewards, dtype=np.float64),
        "terminations": np.asarray(terminations, dtype=bool),
        "truncations": np.asarray(truncations, dtype=bool),
    }


def episodes_to_transitions(episodes: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Episodes in Minari's layout as D4RL-style transition columns, aligned per episode.

    Each episode's ``T + 1`` observations give ``observations = obs[:-1]`` and
    ``next_observations = obs[1:]``, so no transition crosses an episode boundary; ``terminals``
    are its terminations and ``timeouts`` its truncations (a step both terminated and truncated is
    terminal). ``np.savez(path, **columns)`` writes what ``OfflineBuffer.from_d4rl(path)`` reads.
    Flat (Box) observations only: a Dict space is what a Minari dataset keeps.

    Raises:
        ValueError: no episodes, or an episode whose arrays do not line up (naming it and the key).
        TypeError: dict observations.
    """
    if len(episodes) == 0:
        raise ValueError("episodes is empty; a dataset needs at least one episode")
    columns: dict[str, list[np.ndarray]] = {
        key: [] for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    }
    for index, episode in enumerate(episodes):
        missing = [key for key in _EPISODE_KEYS if key not in episode]
        if missing:
            raise ValueError(f"episode {index}: missing keys {missing}; expected {list(_EPISODE_KEYS)}")
        if isinstance(episode["observations"], Mapping):
            raise TypeError(
                f"episode {index}: dict observations have no flat .npz layout; write a Minari dataset "
                "(write_minari_dataset) instead"
            )
        obs = np.asarray(episode["observations"])
        n_steps = len(np.asarray(episode["rewards"]))
        for key, expected in (("observations", n_steps + 1), ("actions", n_steps), ("terminations", n_steps)):
            found = len(obs) if key == "observations" else len(np.asarray(episode[key]))
            if found != expected:
                raise ValueError(
                    f"episode {index}: {key!r} has length {found}, expected {expected} "
                    f"(T + 1 observations, T actions and flags for T = {n_steps} rewards)"
                )
        terminations = np.asarray(episode["terminations"], dtype=bool)
        columns["observations"].append(obs[:-1])
        columns["next_observations"].append(obs[1:])
        columns["actions"].append(np.asarray(episode["actions"]))
        columns["rewards"].append(np.asarray(episode["rewards"], dtype=np.float64))
        columns["terminals"].append(terminations)
        columns["timeouts"].append(np.asarray(episode["truncations"], dtype=bool) & ~terminations)
    return {key: np.concatenate(parts) for key, parts in columns.items()}


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
    from dql_agent.readers.minari import check_dataset_id

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
