"""Beside the robot: serve a policy, and control Pendulum-v1 through it over the network.

What it shows: the split a real robot uses. The model runs in a policy server
(:class:`dql_agent.server.PolicyServer`, here in a background thread; on a robot, ``dql-agent serve
MODEL --host 0.0.0.0 --token-file token --tls-cert cert.pem --tls-key key.pem`` on the GPU box);
the control loop (``control_loop`` below) needs only numpy, the env and
:class:`dql_agent.remote.RemotePolicy`, which has SB3's ``predict``. Each episode prints its return
and the per-step latency of ``predict`` as the control loop saw it.

    python examples/remote_control_loop.py                        # trains a small model on demo data first
    python examples/remote_control_loop.py --model dql_demo/model  # a saved model (or a Hub repo id)

Without ``--model`` it trains a 64-wide DiffusionQL for ``--steps`` gradient steps on a small
Pendulum dataset rolled out in memory (``dql_agent.demo_data``; nothing is downloaded or written).
Needs ``pip install dql_agent[serve]``.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from typing import Any

import numpy as np

ENV_ID = "Pendulum-v1"


def control_loop(policy: Any, env: Any, seed: int, max_steps: int) -> tuple[float, list[float]]:
    """One episode driven by ``policy.predict``: its return and each step's latency in seconds.

    This is all the robot computer runs: observation in, ``predict`` over the network, action out.
    """
    obs, _ = env.reset(seed=seed)
    total, latencies = 0.0, []
    for _ in range(max_steps):
        started = time.perf_counter()
        action, _ = policy.predict(obs, deterministic=True)
        latencies.append(time.perf_counter() - started)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        if terminated or truncated:
            break
    return total, latencies


def train_small_model(steps: int) -> Any:
    """A 64-wide DiffusionQL trained on 10 + 10 in-memory Pendulum episodes (clean and noisy)."""
    import gymnasium as gym

    from dql_agent import DiffusionQL, OfflineBuffer
    from dql_agent.demo_data import collect_pendulum_episodes

    episodes = collect_pendulum_episodes(n_good=10, n_noisy=10, seed=0)
    env = gym.make(ENV_ID)
    buffer = OfflineBuffer(
        observations=np.concatenate([e["observations"][:-1] for e in episodes]),
        actions=np.concatenate([e["actions"] for e in episodes]),
        rewards=np.concatenate([e["rewards"] for e in episodes]),
        next_observations=np.concatenate([e["observations"][1:] for e in episodes]),
        terminals=np.concatenate([e["terminations"] for e in episodes]),
        timeouts=np.concatenate([e["truncations"] for e in episodes]),
        observation_space=env.observation_space,
        action_space=env.action_space,
    )
    model = DiffusionQL(buffer, env=ENV_ID, seed=0, device="cpu", hidden_dim=64, gamma=0.95, act_with_ema=True)
    return model.learn(steps, progress_bar=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved model folder, a .zip of one, or a Hub repo id (default: train one)")
    parser.add_argument("--steps", type=int, default=2000, help="gradient steps when training")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=200, help="steps per episode at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)

    import gymnasium as gym
    import torch

    import dql_agent
    from dql_agent.remote import RemotePolicy
    from dql_agent.server import PolicyServer

    torch.set_num_threads(1)  # small networks, one observation per call
    model = dql_agent.load_from_hub(args.model, device="cpu") if args.model else train_small_model(args.steps)
    token = secrets.token_urlsafe(32)  # on a robot: a file both sides read (--token-file / DQL_AGENT_TOKEN)

    with PolicyServer(model, port=args.port, token=token) as server:  # the GPU box's side
        print(f"serving {model.algorithm} at {server.url} (token required)")
        # The robot's side: from here on, only numpy, the env and RemotePolicy.
        with RemotePolicy(server.url, token=token) as policy:
            env = gym.make(ENV_ID)
            policy.check_env_spaces(env.observation_space, env.action_space)
            for episode in range(args.episodes):
                total, latencies = control_loop(policy, env, args.seed + episode, args.max_steps)
                ms = sorted(1000 * s for s in latencies)
                print(
                    f"episode {episode}: return {total:.1f} over {len(ms)} steps; predict took "
                    f"{statistics.median(ms):.2f} ms (median), {ms[int(0.99 * (len(ms) - 1))]:.2f} ms (p99)"
                )


if __name__ == "__main__":
    main()
