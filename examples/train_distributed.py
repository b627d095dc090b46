"""Train one Diffusion-QL on several processes (GPUs, or CPU cores) with torchrun, optionally in bf16.

    torchrun --nproc-per-node 2 examples/train_distributed.py --steps 2000 --precision bf16 --out ddp_model

Every rank runs this same script: it builds the same dataset and the same model (same seed), then
``learn(..., distributed=True)`` averages the gradients over the ranks, so each step sees
``batch_size`` transitions per rank. Rank 0 alone logs, evaluates and saves (``is_main_process``).
Interrupt it (Ctrl-C, or SIGTERM from a scheduler) and it saves ``OUT/interrupted``; start it again
with ``--resume OUT/interrupted`` on any number of ranks to go on where it stopped.

The dataset here is the demo's Pendulum episodes, rebuilt identically on every rank; with your own
data, give every rank the same ``OfflineBuffer`` (a Minari id, a LeRobot folder, a .npz).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gymnasium as gym
import numpy as np
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

from dql_agent import DiffusionQL, OfflineBuffer
from dql_agent.demo_data import collect_pendulum_episodes
from dql_agent.integrations.minari import episodes_to_transitions
from dql_agent.scaling import is_main_process

ENV_ID = "Pendulum-v1"


def pendulum_buffer(episodes: int) -> OfflineBuffer:
    env = gym.make(ENV_ID)
    transitions = episodes_to_transitions(collect_pendulum_episodes(n_good=episodes, n_noisy=episodes, seed=0))
    return OfflineBuffer(**transitions, observation_space=env.observation_space, action_space=env.action_space)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="gradient steps (each rank takes every one)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--episodes", type=int, default=5, help="good and noisy demo episodes each")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint saved with its optimizer state")
    parser.add_argument("--out", type=Path, default=Path("ddp_model"))
    parser.add_argument("--hidden-dim", type=int, default=256)
    args = parser.parse_args()

    buffer = pendulum_buffer(args.episodes)
    if args.resume is not None:
        model = DiffusionQL.load(args.resume, buffer=buffer)
    else:
        model = DiffusionQL(buffer, seed=0, precision=args.precision, hidden_dim=args.hidden_dim, verbose=1)
    model.learn(
        args.steps,
        log_interval=max(args.steps // 4, 1),
        reset_num_timesteps=args.resume is None,
        interrupt_checkpoint=args.out / "interrupted",
        distributed=True,
    )
    if is_main_process():  # the other ranks hold the same weights: one save, one evaluation
        model.save(args.out / "model", include_optimizer=True)
        returns, _ = evaluate_policy(model, Monitor(gym.make(ENV_ID)), n_eval_episodes=2, return_episode_rewards=True)
        print(f"saved {args.out / 'model'} after {model.n_updates} steps; mean return {np.mean(returns):.1f}")


if __name__ == "__main__":
    main()
