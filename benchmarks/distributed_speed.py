"""Data-parallel throughput: ``learn(distributed=True)`` under ``torchrun`` with 1, 2, ... processes.

Each world size trains Diffusion-QL at the official settings (Hopper shapes: obs 11, act 3; batch
256 per rank; T=5; 3 x 256 MLPs; 10k random transitions) for ``--steps`` gradient steps after a
warm-up, and reports gradient steps/s, transitions/s (steps/s x batch x world size) and, separately,
the time of one all-reduce of the model's gradients (what each step adds). Scaling efficiency is
transitions/s at world size W over W times those of one process.

    OMP_NUM_THREADS=1 python -m benchmarks.distributed_speed --world-sizes 1 2 --out benchmarks/results/ddp.json

On the CPU every rank takes one core (``--threads`` per rank): 2 ranks on a 2-core machine leave
nothing for anything else, so run it alone. ``--device cuda`` gives each rank its GPU (NCCL).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, random_data, sync, write_results

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank: warm up, time ``--steps`` steps and the all-reduce; rank 0 writes the result."""
    import torch.distributed as dist

    from dql_agent import DiffusionQL, OfflineBuffer

    torch.set_num_threads(args.threads)
    model = DiffusionQL(OfflineBuffer(**random_data(11, 3)), seed=0, device=args.device)
    model.learn(5, log_interval=0, distributed=True)
    device = model.device
    sync(device)
    start = time.perf_counter()
    model.learn(args.steps, reset_num_timesteps=False, log_interval=0, distributed=True)
    sync(device)
    seconds = time.perf_counter() - start
    n_grads = sum(p.numel() for p in model.policy.parameters() if p.requires_grad)
    flat = torch.ones(n_grads, device=device)
    for _ in range(3):
        dist.all_reduce(flat)
    sync(device)
    began = time.perf_counter()
    for _ in range(args.reduces):
        dist.all_reduce(flat)
    sync(device)
    reduce_ms = 1e3 * (time.perf_counter() - began) / args.reduces
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        steps_per_s = args.steps / seconds
        result = {
            "world_size": world,
            "steps_per_s": steps_per_s,
            "transitions_per_s": steps_per_s * model.config.batch_size * world,
            "allreduce_ms": reduce_ms,
            "gradient_floats": n_grads,
            "machine": machine(device, args.threads),
        }
        Path(args.result).write_text(json.dumps(result))


def launch(world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size)]
        command += ["-m", "benchmarks.distributed_speed", "--worker", "--result", str(result)]
        command += ["--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
        command += ["--reduces", str(args.reduces)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        return dict(json.loads(result.read_text()))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=200, help="timed gradient steps per world size")
    p.add_argument("--reduces", type=int, default=50, help="timed all-reduces of the gradients")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    rows = [launch(world_size, args) for world_size in args.world_sizes]
    base = rows[0]["transitions_per_s"] / rows[0]["world_size"]
    print("| processes | gradient steps/s | transitions/s | efficiency | all-reduce of the gradients |")
    print("|---|---|---|---|---|")
    for row in rows:
        row["efficiency"] = row["transitions_per_s"] / (base * row["world_size"])
        print(
            f"| {row['world_size']} | {row['steps_per_s']:.1f} | {row['transitions_per_s']:,.0f} | "
            f"{row['efficiency']:.2f} | {row['allreduce_ms']:.2f} ms ({row['gradient_floats']:,} floats) |"
        )
    results = {"rows": rows, "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "result", "out")}}
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
