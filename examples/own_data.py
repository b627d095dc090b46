"""Your own data: roll out any policy (or take a recorded log), write a dataset, train on it.

Three sources of episodes on Pendulum-v1, each turned into the same episode dicts:

1. a scripted controller (any function observation -> action);
2. a Stable-Baselines3 model (any object with SB3's ``predict``: here an untrained SAC, as a
   stand-in for ``SAC.load("my_sac")``);
3. a recorded teleoperation log, given as arrays (observations, actions, rewards, done flags), as
   one would read it from a CSV or a ROS bag.

Then the episodes are written twice, each read back into an ``OfflineBuffer``:

- as a Minari dataset with ``dql_agent.integrations.minari.write_minari_dataset`` (no jax needed,
  unlike Minari's own ``DataCollector``), read by ``OfflineBuffer.from_minari(id)``;
- as a D4RL-style ``.npz`` (``episodes_to_transitions`` + ``np.savez``), read by
  ``OfflineBuffer.from_d4rl(path)``.

and Diffusion-QL trains a few steps on the Minari one and acts.

    python examples/own_data.py --out own_data_demo --steps 2000
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "Pendulum-v1"
DATASET_ID = "me/pendulum/own-v0"


def scripted_policy(obs: np.ndarray) -> np.ndarray:
    """A hand-written controller: push along the angular velocity (pumps energy into the swing)."""
    return np.array([2.0 if obs[2] >= 0 else -2.0], dtype=np.float32)


def teleop_log(n_steps: int, seed: int) -> dict[str, np.ndarray]:
    """A stand-in for a log recorded by hand: flat arrays with one row per control step, the
    observation *before* each action, and a ``done`` flag on each episode's last step."""
    env = gym.make(ENV_ID)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {"obs": [], "action": [], "reward": [], "next_obs": [], "done": []}
    obs, _ = env.reset(seed=seed)
    for t in range(n_steps):
        action = np.clip(-1.5 * obs[1:2] + rng.normal(0, 0.3, 1), -2, 2).astype(np.float32)  # "the operator"
        next_obs, reward, terminated, truncated, _ = env.step(action)
        done = terminated or truncated or t == n_steps - 1
        for key, value in zip(rows, (obs, action, reward, next_obs, done), strict=True):
            rows[key].append(value)
        obs = env.reset()[0] if done else next_obs
    return {key: np.asarray(value) for key, value in rows.items()}


def log_to_episodes(log: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Cut a flat log at its ``done`` flags into Minari-layout episodes (T + 1 observations).

    A logged episode that ended because time ran out (not a real terminal state) is a truncation."""
    episodes, start = [], 0
    for end in np.flatnonzero(log["done"]) + 1:
        n = end - start
        episodes.append(
            {
                "observations": np.concatenate([log["obs"][start:end], log["next_obs"][end - 1 : end]]),
                "actions": log["action"][start:end],
                "rewards": log["reward"][start:end],
                "terminations": np.zeros(n, dtype=bool),  # Pendulum never terminates
                "truncations": np.arange(n) == n - 1,
            }
        )
        start = end
    return episodes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="own_data_demo", help="folder for the Minari store and the .npz")
    p.add_argument("--episodes", type=int, default=4, help="episodes per rolled-out policy")
    p.add_argument("--max-steps", type=int, default=200, help="steps per episode (Pendulum's limit is 200)")
    p.add_argument("--steps", type=int, default=2000, help="gradient steps of Diffusion-QL")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    os.environ["MINARI_DATASETS_PATH"] = str(out / "minari")  # where write_minari_dataset writes

    from stable_baselines3 import SAC

    from dql_agent import DiffusionQL, OfflineBuffer
    from dql_agent.integrations.minari import episodes_to_transitions, record_episode, write_minari_dataset

    env = gym.make(ENV_ID)
    sb3_model = SAC("MlpPolicy", env, seed=0)  # or SAC.load("my_sac"): anything with SB3's predict

    def sb3_policy(obs: np.ndarray) -> np.ndarray:
        return sb3_model.predict(obs, deterministic=True)[0]

    episodes = []
    for i in range(args.episodes):
        episodes.append(record_episode(env, scripted_policy, reset_seed=i, max_steps=args.max_steps))
        episodes.append(record_episode(env, sb3_policy, reset_seed=100 + i, max_steps=args.max_steps))
    episodes += log_to_episodes(teleop_log(args.episodes * args.max_steps, seed=7))

    # 1. A Minari dataset (local, under $MINARI_DATASETS_PATH): OfflineBuffer.from_minari reads it.
    path = Path(os.environ["MINARI_DATASETS_PATH"]) / DATASET_ID
    if path.exists():  # a rerun: write_minari_dataset never overwrites
        import shutil

        shutil.rmtree(path)
    write_minari_dataset(
        DATASET_ID,
        episodes,
        observation_space=env.observation_space,
        action_space=env.action_space,
        env_id=ENV_ID,  # the env the data came from: the model evaluates there
        algorithm_name="scripted + SAC + teleop",
    )
    from_minari = OfflineBuffer.from_minari(DATASET_ID)

    # 2. A D4RL-style .npz: OfflineBuffer.from_d4rl reads it (with the env's spaces).
    npz = out / "own_data.npz"
    np.savez(npz, **episodes_to_transitions(episodes))
    from_npz = OfflineBuffer.from_d4rl(npz, observation_space=env.observation_space, action_space=env.action_space)

    model = DiffusionQL(from_minari, env=ENV_ID, seed=0, device=args.device, hidden_dim=64)
    model.learn(args.steps)
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    print(f"{len(episodes)} episodes, {len(from_minari)} transitions -> {path} and {npz}")
    print(from_minari)
    print(f"trained {args.steps} steps; action for the first observation: {action}")
    return {"episodes": episodes, "minari": from_minari, "npz": from_npz, "model": model, "npz_path": npz}


if __name__ == "__main__":
    main()
