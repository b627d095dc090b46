"""Evaluating a model: seeded episodes of SB3's ``evaluate_policy``, as results.json records them.

Shared by the CLI (``dql-agent evaluate``), the Hub push and the sweeps.
"""

from __future__ import annotations

import datetime
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


def evaluate(model: BaseAgent, eval_env: Any, n_eval_episodes: int = 10, deterministic: bool = True) -> dict[str, Any]:
    """Deterministic SB3 ``evaluate_policy`` on a ``Monitor``-wrapped env: the results.json dict.

    Keys: ``mean_reward``, ``std_reward`` (plain floats), ``n_eval_episodes``,
    ``is_deterministic``, ``eval_datetime`` (ISO 8601, UTC), ``env_id``, ``dataset_id`` and
    ``normalized_score`` (``100 * (mean - ref_min) / (ref_max - ref_min)`` when the model's
    metadata has both reference scores, else None), ``success_rate`` (the fraction of episodes
    whose final info says ``is_success`` or ``success``, as goal-conditioned envs report it and
    SB3's ``EvalCallback`` logs it; None when the env reports neither).
    """
    from stable_baselines3.common.env_util import is_wrapped
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor

    from dql_agent.sb3 import refuse_normalized_observations

    if not isinstance(n_eval_episodes, int) or n_eval_episodes < 1:
        raise ValueError(f"n_eval_episodes must be an int >= 1, got {n_eval_episodes!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    check_eval_env(model, eval_env)
    refuse_normalized_observations(eval_env)
    env = eval_env
    if isinstance(env, gym.Env) and not is_wrapped(env, Monitor):
        env = Monitor(env)  # episode returns from the Monitor, not from possibly-wrapped rewards
    successes: list[bool] = []

    def record_success(local_vars: dict[str, Any], _: dict[str, Any]) -> None:
        # As SB3's EvalCallback: an episode's success is its final info's is_success (or the
        # "success" key gymnasium-robotics' mazes report).
        if local_vars["done"]:
            info = local_vars["info"]
            flag = info.get("is_success", info.get("success"))
            if flag is not None:
                successes.append(bool(flag))

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
        "eval_datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
