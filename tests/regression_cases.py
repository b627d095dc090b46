"""Stored-output regression cases: a fixed seed, a tiny config, N updates, then fingerprints.

Each case trains one algorithm on small data built here (a seeded random dataset for the offline
algorithms, a seeded Pendulum for QVPO) and records:

- the SHA-256 of every tensor of ``policy.state_dict()``;
- every ``train/*`` value the SB3 logger received (one dump per ``log_every`` timesteps);
- ``predict`` on fixed observations, deterministic and stochastic after ``policy.set_seed``.

``tests/test_regression.py`` recomputes them and compares bit for bit (CPU, one thread). The same
module writes the stored outputs and the old-format checkpoints; run it only when a change of
behaviour is deliberate, and commit the new files on their own, saying why:

    OMP_NUM_THREADS=1 .venv/bin/python tests/regression_cases.py                  # regression.json
    OMP_NUM_THREADS=1 .venv/bin/python tests/regression_cases.py --checkpoints    # and the checkpoints

The checkpoints stand for models saved by earlier releases: rewrite them only when the checkpoint
format itself changes (the resume part of regression.json always starts from the committed ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.logger import KVWriter, Logger

DATA = Path(__file__).parent / "data"
STORED = DATA / "regression.json"
CHECKPOINTS = DATA / "checkpoints"

TINY = {"hidden_dim": 32, "n_hidden": 2, "batch_size": 16}
STEPS = 12  # gradient steps (offline) or env steps (QVPO) before the fingerprints
RESUME_STEPS = 6  # more steps after loading the stored checkpoint

CASES: dict[str, dict[str, Any]] = {
    "dql": {"algo": "DiffusionQL", "hp": {**TINY, "diffusion_steps": 3, "n_action_samples": 6, "ema_start_step": 4}},
    "dql_max_q": {
        "algo": "DiffusionQL",
        "hp": {
            **TINY,
            "diffusion_steps": 4,
            "n_action_samples": 5,
            "max_q_backup": True,
            "n_max_q_samples": 3,
            "normalize_observations": True,
            "lr_decay": True,
            "lr_decay_steps": 20,
            "act_with_ema": True,
            "ema_start_step": 0,
            "ema_update_every": 2,
            "beta_schedule": "cosine",
            "reward_transform": "normalize",
        },
    },
    "dql_bandit": {"algo": "DiffusionQL", "hp": {**TINY, "diffusion_steps": 2, "n_action_samples": 4, "eta": 2.0}},
    "dql_bc": {"algo": "DiffusionQL", "hp": {**TINY, "diffusion_steps": 3, "n_action_samples": 4, "eta": 0.0}},
    "dice": {
        "algo": "DiffusionDICE",
        "hp": {
            **TINY,
            "behavior_batch_size": 32,
            "behavior_steps": 7,
            "diffusion_steps": 3,
            "n_action_samples": 5,
            "q_ensemble_size": 3,
            "n_noisy_copies": 4,
            "guidance_n_hidden": 2,
            "behavior_n_hidden": 2,
            "lr_decay": True,
            "lr_decay_steps": 30,
        },
    },
    "qvpo": {
        "algo": "QVPO",
        "hp": {
            **TINY,
            "learning_starts": 4,
            "diffusion_steps": 3,
            "n_diffusion_samples": 6,
            "n_entropy_samples": 2,
            "n_behavior_samples": 3,
            "n_target_samples": 2,
            "n_action_samples": 5,
            "entropy_decay_steps": 40,
            "time_dim": 8,
        },
    },
}
EPISODE_STEPS = 4  # QVPO's Pendulum episodes are cut to this many steps (several resets per run)
# learn's log_interval per case, in timesteps. QVPO's counted finished episodes before the one
# learn loop; with 4-step episodes, 4 env steps dump at the points 1 episode did.
LOG_EVERY = {"dql": 1, "dql_max_q": 1, "dql_bandit": 1, "dql_bc": 1, "dice": 1, "qvpo": EPISODE_STEPS}


class Recorder(KVWriter):
    """Keeps every ``train/*`` value of every dump."""

    def __init__(self) -> None:
        self.dumps: list[dict[str, float]] = []

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        self.dumps.append({k: float(v) for k, v in sorted(key_values.items()) if k.startswith("train/")})


def pendulum_spaces() -> tuple[gym.spaces.Box, gym.spaces.Box]:
    env = gym.make("Pendulum-v1")
    return env.observation_space, env.action_space


def offline_data(bandit: bool = False) -> dict[str, np.ndarray]:
    """200 seeded random Pendulum-shaped transitions in 5 episodes of 40 (1-step episodes: a bandit)."""
    rng = np.random.default_rng(7)
    n = 200
    obs = rng.uniform(-1.0, 1.0, (n, 3)).astype(np.float32) * np.array([1.0, 1.0, 8.0], np.float32)
    actions = rng.uniform(-2.0, 2.0, (n, 1)).astype(np.float32)
    rewards = (-(obs[:, 2] ** 2) * 0.1 - actions[:, 0] ** 2 + rng.normal(0, 0.1, n)).astype(np.float32)
    next_obs = np.clip(obs + rng.normal(0, 0.2, obs.shape), -8, 8).astype(np.float32)
    terminals = np.ones(n, bool) if bandit else np.zeros(n, bool)
    timeouts = np.zeros(n, bool) if bandit else (np.arange(n) % 40 == 39)
    return {
        "observations": obs,
        "actions": actions,
        "rewards": rewards,
        "next_observations": next_obs,
        "terminals": terminals,
        "timeouts": timeouts,
    }


def make_buffer(name: str) -> Any:
    from dql_agent import OfflineBuffer

    observation_space, action_space = pendulum_spaces()
    data = offline_data(bandit=name == "dql_bandit")
    return OfflineBuffer(**data, observation_space=observation_space, action_space=action_space)


def make_env() -> gym.Env:
    return gym.make("Pendulum-v1", max_episode_steps=EPISODE_STEPS)


def agent_class(name: str) -> type:
    import dql_agent

    return getattr(dql_agent, CASES[name]["algo"])


def build(name: str) -> Any:
    """The case's untrained model with its data (buffer or env) attached."""
    cls, hp = agent_class(name), CASES[name]["hp"]
    if CASES[name]["algo"] == "QVPO":
        return cls(make_env(), seed=3, device="cpu", **hp)
    return cls(make_buffer(name), seed=3, device="cpu", **hp)


def attach_data(name: str, model: Any) -> None:
    """Give a loaded model its data again (checkpoints carry no dataset or env)."""
    if CASES[name]["algo"] == "QVPO":
        model.set_env(make_env())
    else:
        model.set_buffer(make_buffer(name))


def train(name: str, model: Any, steps: int, reset: bool = True) -> list[dict[str, float]]:
    recorder = Recorder()
    model.set_logger(Logger(folder=None, output_formats=[recorder]))
    model.learn(steps, log_interval=LOG_EVERY[name], reset_num_timesteps=reset)
    return recorder.dumps


def probe_observations() -> np.ndarray:
    rng = np.random.default_rng(11)
    return (rng.uniform(-1.0, 1.0, (4, 3)) * np.array([1.0, 1.0, 8.0])).astype(np.float32)


def fingerprint(model: Any) -> dict[str, Any]:
    """Weights' SHA-256, deterministic and seeded stochastic actions (as exact float lists)."""
    weights = {
        key: hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for key, tensor in sorted(model.policy.state_dict().items())
    }
    obs = probe_observations()
    deterministic, _ = model.predict(obs, deterministic=True)
    model.policy.set_seed(123)
    stochastic, _ = model.predict(obs, deterministic=False)
    single, _ = model.predict(obs[0], deterministic=True)
    return {
        "weights": weights,
        "predict_deterministic": np.asarray(deterministic, np.float64).tolist(),
        "predict_stochastic_seed_123": np.asarray(stochastic, np.float64).tolist(),
        "predict_single": np.asarray(single, np.float64).tolist(),
    }


def run_case(name: str) -> tuple[Any, dict[str, Any]]:
    model = build(name)
    logs = train(name, model, STEPS)
    return model, {"logged": logs, **fingerprint(model)}


def resume_case(name: str, checkpoint: Path) -> dict[str, Any]:
    """Load the stored checkpoint, continue RESUME_STEPS steps, fingerprint."""
    model = agent_class(name).load(checkpoint, device="cpu")
    loaded = fingerprint(model)
    attach_data(name, model)
    logs = train(name, model, RESUME_STEPS, reset=False)
    return {"loaded": loaded, "resumed": {"logged": logs, **fingerprint(model)}}


def regenerate(checkpoints: bool) -> None:
    """Write tests/data/regression.json (and, with ``checkpoints``, tests/data/checkpoints/<case>/)
    from the code as it is."""
    stored: dict[str, Any] = {"torch": torch.__version__, "cases": {}}
    for name in CASES:
        model, outputs = run_case(name)
        target = CHECKPOINTS / name
        if checkpoints:
            model.save(target, include_optimizer=True)
        stored["cases"][name] = {**outputs, **resume_case(name, target)}
        print(f"{name}: {len(outputs['weights'])} tensors, {len(outputs['logged'])} dumps")
    STORED.write_text(json.dumps(stored, indent=1) + "\n")


if __name__ == "__main__":
    if os.environ.get("OMP_NUM_THREADS") != "1":
        sys.exit("run with OMP_NUM_THREADS=1, as the tests do")
    torch.set_num_threads(1)
    regenerate(checkpoints="--checkpoints" in sys.argv[1:])
