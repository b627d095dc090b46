"""Evaluating a model: seeded episodes of SB3's ``evaluate_policy``, as results.json records them.

Shared by the CLI (``dql-agent evaluate``), the Hub push and the sweeps. ``evaluate(..., seed=0)``
seeds every episode's reset, so an evaluation repeats exactly on the same machine.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import gymnasium as gym
import numpy as np

if TYPE_CHECKING:
    from dql_agent.base import BaseAgent


def env_id_of(env: Any) -> str | None:
    """The registered id of a gymnasium env or of the first sub-env of a VecEnv, else None."""
    spec = getattr(env, "spec", None)
    if spec is None and hasattr(env, "envs"):
        spec = getattr(env.envs[0], "spec", None)
    return spec.id if spec is not None else None


def check_eval_env(model: BaseAgent, env: Any) -> None:
    """An env (or VecEnv) whose spaces are the model's; else a TypeError or ValueError saying why."""
    if not hasattr(env, "observation_space") or not hasattr(env, "action_space"):
        kind = type(env).__name__
        raise TypeError(f"eval_env must be a gymnasium.Env or an SB3 VecEnv, got {kind}")
    model.check_env_spaces(env.observation_space, env.action_space)


class SeededResets(gym.Wrapper):
    """Reset episode ``i`` (counting from the wrapper's creation) with ``seed + i``, whatever
    seed the caller passes: SB3's ``evaluate_policy`` (and a VecEnv's automatic resets) reset
    without one, and every episode's start state is then a function of the seed alone."""

    def __init__(self, env: gym.Env, seed: int):
        super().__init__(env)
        self.base_seed, self.episodes = int(seed), 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        episode_seed = self.base_seed + self.episodes
        self.episodes += 1
        return self.env.reset(seed=episode_seed, options=options)


@contextlib.contextmanager
def _acting_seed(model: BaseAgent, seed: int | None, deterministic: bool) -> Iterator[None]:
    """A stochastic evaluation's own stream of random actions: the policy's generator seeded
    with ``seed`` and put back as it was afterwards (deterministic acting draws nothing)."""
    if seed is None or deterministic:
        yield
        return
    generator = model.policy.generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def evaluate(
    model: BaseAgent,
    eval_env: Any,
    n_eval_episodes: int = 10,
    deterministic: bool = True,
    seed: int | None = None,
) -> dict[str, Any]:
    """Deterministic SB3 ``evaluate_policy`` on a ``Monitor``-wrapped env: the results.json dict.

    ``seed`` makes the evaluation repeatable: with a ``gymnasium.Env``, episode ``i`` resets with
    ``seed + i``; with an SB3 VecEnv, env ``j`` is seeded ``seed + j`` before the first reset
    (SB3's ``VecEnv.seed``) and its later episodes follow from its own RNG. A stochastic
    evaluation (``deterministic=False``) also samples from the policy's generator seeded with
    ``seed`` (restored afterwards). With the same weights, env and seed on the same machine the
    results are the same numbers, run after run. None resets the env as it stands (not repeatable).

    Keys: ``mean_reward``, ``std_reward`` (plain floats), ``n_eval_episodes``,
    ``is_deterministic``, ``eval_datetime`` (ISO 8601, UTC), ``env_id``, ``dataset_id`` and
    ``normalized_score`` (``100 * (mean - ref_min) / (ref_max - ref_min)`` when the model's
    metadata has both reference scores, else None), ``success_rate`` (the fraction of episodes
    whose final info says ``is_success`` or ``success``, as goal-conditioned envs report it and
    SB3's ``EvalCallback`` logs it; None when the env reports neither), ``seed`` and the seeds
    used: ``episode_seeds`` (one per episode, a ``gymnasium.Env``) or ``env_seeds`` (one per
    env of a VecEnv), None without a seed.
    """
    from stable_baselines3.common.env_util import is_wrapped
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import VecEnv

    from dql_agent.sb3 import refuse_normalized_observations

    if not isinstance(n_eval_episodes, int) or n_eval_episodes < 1:
        raise ValueError(f"n_eval_episodes must be an int >= 1, got {n_eval_episodes!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be an int >= 0 or None, got {seed!r}")
    check_eval_env(model, eval_env)
    refuse_normalized_observations(eval_env)
    env = eval_env
    if isinstance(env, gym.Env) and not is_wrapped(env, Monitor):
        env = Monitor(env)  # episode returns from the Monitor, not from possibly-wrapped rewards
    seeds: dict[str, list[int] | None] = {"episode_seeds": None, "env_seeds": None}
    if seed is not None:
        seed = int(seed)
        if isinstance(env, VecEnv):
            env.seed(seed)  # env j: seed + j at its next reset
            seeds["env_seeds"] = [seed + j for j in range(env.num_envs)]
        else:
            env = SeededResets(env, seed)
            seeds["episode_seeds"] = [seed + i for i in range(n_eval_episodes)]
    successes: list[bool] = []

    def record_success(local_vars: dict[str, Any], _: dict[str, Any]) -> None:
        # As SB3's EvalCallback: an episode's success is its final info's is_success (or the
        # "success" key gymnasium-robotics' mazes report).
        if local_vars["done"]:
            info = local_vars["info"]
            flag = info.get("is_success", info.get("success"))
            if flag is not None:
                successes.append(bool(flag))

    with _acting_seed(model, seed, deterministic):
        mean, std = cast(
            "tuple[float, float]",  # the (mean, std) form: return_episode_rewards is False
            evaluate_policy(
                model, env, n_eval_episodes=n_eval_episodes, deterministic=deterministic, callback=record_success
            ),
        )
    meta = model.metadata
    normalized = None
    ref_min, ref_max = meta.get("ref_min_score"), meta.get("ref_max_score")
    if ref_min is not None and ref_max is not None and ref_max != ref_min:
        normalized = 100.0 * (float(mean) - float(ref_min)) / (float(ref_max) - float(ref_min))
    return {
        "env_id": env_id_of(eval_env) or meta.get("env_id"),
        "dataset_id": meta.get("dataset_id"),
        "mean_reward": float(mean),
        "std_reward": float(std),
        "normalized_score": normalized,
        "success_rate": float(np.mean(successes)) if successes else None,
        "n_eval_episodes": int(n_eval_episodes),
        "is_deterministic": bool(deterministic),
        "seed": seed,
        **seeds,
        "eval_datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
