"""What acting costs per environment step when the policy acts in chunks (issue 28).

For action_horizon h in 1, 4, 8 (n_action_steps = h: the whole chunk runs before the next plan)
and a history of ``--obs-steps`` observations, ``predict`` on one Pendulum observation per call,
deterministic, through SB3's recurrent ``state``: the median cost of one call over whole chunks
(one plan, then h - 1 steps served from the pending chunk). An untrained default-size
Diffusion-QL (3 x 256, T = 5, 50 candidates); the chunk widens the denoiser's output and the
critics' input, so a plan costs a little more than one step's.

    OMP_NUM_THREADS=1 python -m benchmarks.chunk_acting --seconds 3
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from benchmarks.common import machine


def per_step_ms(model: Any, seconds: float) -> dict[str, float]:
    """Median and mean ms per predict call over whole chunks, after a warm-up."""
    obs = np.zeros(3, np.float32)
    state: Any = None
    for _ in range(20):
        _, state = model.predict(obs, state=state, deterministic=True)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 50:
        start = time.perf_counter()
        _, state = model.predict(obs, state=state, deterministic=True)
        times.append(time.perf_counter() - start)
    return {"median_ms": float(np.median(times)) * 1e3, "mean_ms": float(np.mean(times)) * 1e3, "calls": len(times)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--horizons", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--obs-steps", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    from dql_agent import DiffusionQL

    torch.set_num_threads(1)
    env = gym.make("Pendulum-v1")
    rows = []
    for h in args.horizons:
        model = DiffusionQL(
            observation_space=env.observation_space,
            action_space=env.action_space,
            device="cpu",
            seed=0,
            action_horizon=h,
            n_action_steps=h,
            n_obs_steps=args.obs_steps,
        )
        rows.append({"action_horizon": h, "n_obs_steps": args.obs_steps, **per_step_ms(model, args.seconds)})
    results = {"machine": machine(), "rows": rows}
    print("| h | ms per env step (mean) | median | cheaper than h = 1 |\n|---:|---:|---:|---:|")
    base = rows[0]["mean_ms"]
    for row in rows:
        h, mean, median = row["action_horizon"], row["mean_ms"], row["median_ms"]
        print(f"| {h} | {mean:.3f} | {median:.3f} | {base / mean:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
