"""Train QVPO online on Pendulum-v1, evaluate it with Stable-Baselines3, save it and load it back.

QVPO (Ding et al., NeurIPS 2024) collects its own experience: ``learning_starts`` env steps of uniformly
random actions, then one gradient step per env step, acting with the best of a few diffusion samples
under its critics. Everything runs on a CPU in a couple of minutes::

    python examples/train_qvpo_pendulum.py                       # 5,000 env steps, under 2 min on 2 cores
    python examples/train_qvpo_pendulum.py --steps 20000 --out-dir qvpo-long

What the default budget shows: QVPO learns the swing-up from scratch. Measured with the defaults
(10 seeded 200-step episodes, under 2 min on 2 shared cores): the deterministic mean return went from
-1,409 / -1,508 untrained to -91 / -147 (seeds 0 / 1); a hand-written swing-up controller scores
about -150 and random torques about -1,200. What it cannot show: behaviour at the paper's settings
(networks 256 x 3, 20 diffusion steps, 10,000 warm-up steps; see ``PENDULUM`` below for what was
shrunk), harder tasks (MuJoCo), or a comparison with SAC/TD3. Two seeds and 10 episodes are a
smoke signal, not a benchmark.

Writes ``OUT_DIR/model`` (config.json + model.safetensors) and ``OUT_DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ENV_ID = "Pendulum-v1"
# Smaller and faster than the paper's settings so a CPU learns in minutes: networks 64 x 2 (paper
# 256 x 3), 5 diffusion steps (20), batch 64 (256), 8 samples for the Q-weighted loss (64), 500 random
# warm-up steps (10,000), learning rates 1e-3 / 3e-3 (1e-4 / 3e-4), tau 0.01 (0.005), gamma 0.98 (0.99).
PENDULUM: dict[str, Any] = {
    "hidden_dim": 64,
    "n_hidden": 2,
    "diffusion_steps": 5,
    "batch_size": 64,
    "n_diffusion_samples": 8,
    "learning_rate": 1e-3,
    "critic_learning_rate": 3e-3,
    "tau": 0.01,
    "gamma": 0.98,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="env steps to collect (one update each after warm-up)")
    parser.add_argument("--out-dir", type=Path, default=Path("qvpo-pendulum"), help="where the model is saved")
    parser.add_argument("--learning-starts", type=int, default=500, help="env steps of random actions first")
    parser.add_argument("--n-eval-episodes", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def evaluate(model: Any, n_episodes: int, seed: int) -> tuple[float, float]:
    """Deterministic mean and std return over ``n_episodes``, from the same seeded starts every call."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    env = make_vec_env(ENV_ID, n_envs=1, seed=seed)  # Monitor-wrapped: returns of whole episodes
    mean, std = evaluate_policy(model, env, n_eval_episodes=n_episodes, deterministic=True)
    env.close()
    return float(mean), float(std)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Returns the numbers also written to ``OUT_DIR/results.json``."""
    args = parse_args(argv)

    import numpy as np
    import torch

    from dql_agent import QVPO

    torch.set_num_threads(1)  # small networks: more threads only add synchronisation
    eval_seed = args.seed + 1000  # evaluation starts differ from the training env's
    model = QVPO(ENV_ID, seed=args.seed, device=args.device, learning_starts=args.learning_starts, **PENDULUM)
    before, _ = evaluate(model, args.n_eval_episodes, eval_seed)
    print(f"untrained: mean return {before:.1f} over {args.n_eval_episodes} episodes")

    model.learn(total_timesteps=args.steps)
    after, std = evaluate(model, args.n_eval_episodes, eval_seed)
    print(
        f"after {model.num_timesteps} env steps (the first {args.learning_starts} random): "
        f"mean return {after:.1f} +/- {std:.1f}"
    )

    path = args.out_dir / "model"
    model.save(path)
    loaded = QVPO.load(path, device=args.device)
    # Deterministic actions come from fixed noise, so the reloaded model acts exactly as the saved one.
    probe = np.stack([np.cos(np.linspace(-3, 3, 8)), np.sin(np.linspace(-3, 3, 8)), np.linspace(-8, 8, 8)], 1)
    expected, _ = model.predict(probe, deterministic=True)
    same = bool(np.array_equal(loaded.predict(probe, deterministic=True)[0], expected))
    reloaded, _ = evaluate(loaded, args.n_eval_episodes, eval_seed)
    print(f"reloaded from {path}: mean return {reloaded:.1f}, identical actions: {same}")

    results = {
        "env_id": ENV_ID,
        "env_steps": model.num_timesteps,
        "learning_starts": args.learning_starts,
        "n_eval_episodes": args.n_eval_episodes,
        "mean_return_untrained": before,
        "mean_return": after,
        "std_return": std,
        "mean_return_reloaded": reloaded,
        "identical_actions_after_reload": same,
    }
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
