"""Ray Tune's cost: N sweep trials through ``run_sweep`` against the same runs one after another.

Each run is what a sweep trial does: load a Pendulum ``.npz`` dataset, build a Diffusion-QL
model, train ``--steps`` gradient steps in ``learn`` calls of ``--eval-every`` steps, each
followed by an evaluation (``--episodes`` deterministic episodes) and a
``save(include_optimizer=True)``. Seeds 0..N-1, one torch thread per run.

- sequential: the N runs in this process, one after another (torch already imported);
- ray, for each ``--cpus`` C: ``run_sweep`` with one CPU per trial on a fresh local Ray of C CPUs
  (``ray.init`` timed apart), i.e. C trials at a time, each in a Ray worker that imports torch
  and dql_agent itself.

Reported per C: the sweep's wall time, the throughput ratio (sequential / sweep wall time: the
sweep's gradient steps per second over the sequential runs'), the time Tune measured inside the
trial function (``time_total_s``, mean per trial), and Ray's overhead per trial,
``(sweep * C - sequential) / N``: the core-seconds beyond perfect scaling (worker start and
imports, Tune's bookkeeping, checkpoints copied to storage, and, with C > 1 on a busy machine,
contention). With C = 1 it is the plain per-trial cost. Each run must end with the same
evaluation return both ways (the sweep is the same computation).

Example::

    OMP_NUM_THREADS=1 python -m benchmarks.sweep_overhead --trials 4 --steps 500 --cpus 1 2 --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ENV = "Pendulum-v1"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=4, help="runs (seeds 0..N-1)")
    p.add_argument("--steps", type=int, default=1000, help="gradient steps per run")
    p.add_argument("--eval-every", type=int, default=500, help="steps between evaluations and checkpoints")
    p.add_argument("--episodes", type=int, default=1, help="evaluation episodes (200 steps each)")
    p.add_argument("--hidden-dim", type=int, default=64, help="MLP width (64: the demo's; 256: the paper's)")
    p.add_argument("--cpus", type=int, nargs="+", default=[2], help="CPUs of the local Ray (= trials at a time)")
    p.add_argument("--out", type=Path, default=None, help="write the results to this JSON file")
    return p.parse_args(argv)


def sequential_run(npz: str, seed: int, args: argparse.Namespace, hp: dict[str, Any], folder: Path) -> float:
    """One sweep trial's work in this process; returns its last evaluation's mean return."""
    from dql_agent import DiffusionQL
    from dql_agent.integrations.metrics import MetricsCallback
    from dql_agent.registry import load_buffer

    model = DiffusionQL(load_buffer(npz, env_id=ENV), seed=seed, device="cpu", **hp)
    recorder = MetricsCallback(ENV, args.eval_every, args.episodes, eval_seed=0)
    while model.num_timesteps < args.steps:
        n = min(args.eval_every, args.steps - model.num_timesteps)
        model.learn(n, callback=recorder, log_interval=args.eval_every, reset_num_timesteps=False)
        model.save(folder / f"seed_{seed}", include_optimizer=True)
    return recorder.latest["eval/mean_reward"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray
    import torch

    from benchmarks.common import machine
    from dql_agent.demo_data import collect_pendulum_episodes
    from dql_agent.integrations.ray import run_sweep

    torch.set_num_threads(1)
    hp = {"hidden_dim": args.hidden_dim}
    results: dict[str, Any] = {
        "machine": machine(torch.device("cpu"), 1) | {"ray": ray.__version__, "load_before": os.getloadavg()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        episodes = collect_pendulum_episodes(n_good=10, n_noisy=10, seed=0)
        npz = str(Path(tmp) / "pendulum.npz")
        np.savez(
            npz,
            observations=np.concatenate([e["observations"][:-1] for e in episodes]),
            actions=np.concatenate([e["actions"] for e in episodes]),
            rewards=np.concatenate([e["rewards"] for e in episodes]),
            next_observations=np.concatenate([e["observations"][1:] for e in episodes]),
            terminals=np.concatenate([e["terminations"] for e in episodes]),
            timeouts=np.concatenate([e["truncations"] for e in episodes]),
        )
        start = time.perf_counter()
        returns = [sequential_run(npz, seed, args, hp, Path(tmp)) for seed in range(args.trials)]
        sequential = time.perf_counter() - start
        print(f"sequential: {sequential:.1f} s for {args.trials} runs")

        results["sequential_s"] = sequential
        results["ray"] = {}
        for cpus in args.cpus:
            start = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            init = time.perf_counter() - start
            start = time.perf_counter()
            result = run_sweep(
                datasets=[npz],
                env=ENV,
                seeds=list(range(args.trials)),
                param_space=hp,
                total_timesteps=args.steps,
                eval_every=args.eval_every,
                eval_episodes=args.episodes,
                resources={"cpu": 1},
                storage=str(Path(tmp) / "sweeps"),
                name=f"cpus{cpus}",
                verbose=0,
            )
            swept = time.perf_counter() - start
            ray.shutdown()
            by_seed = {t.config["seeds"][0]: t.metrics_dataframe["eval/mean_reward"].iloc[-1] for t in result.grid}
            if [by_seed[seed] for seed in range(args.trials)] != returns:
                raise AssertionError(f"the sweep's returns {by_seed} differ from the sequential runs' {returns}")
            inside = float(np.mean([t.metrics["time_total_s"] for t in result.grid]))
            results["ray"][cpus] = {
                "ray_init_s": init,
                "sweep_s": swept,
                "trial_function_mean_s": inside,
                "throughput_ratio": sequential / swept,
                "overhead_per_trial_core_s": (swept * cpus - sequential) / args.trials,
            }
            print(
                f"ray, {cpus} CPU(s): {swept:.1f} s (+ {init:.1f} s ray.init); throughput {sequential / swept:.2f}x "
                f"the sequential runs'; overhead {(swept * cpus - sequential) / args.trials:.1f} core-s per trial; "
                f"{inside:.1f} s inside each trial function (sequential: {sequential / args.trials:.1f} s per run)"
            )
    results["machine"]["load_after"] = os.getloadavg()
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
