"""Several seeds in one process: ``train_seeds``'s stacked replicas against separate runs.

At the default settings (3x256 MLPs, batch 256, T=5) on 10k random Hopper-sized transitions
(obs 11, act 3), measures gradient steps/s summed over ``--seeds`` replicas:

- stacked: one ``SeedStack`` (what ``train_seeds`` runs) stepping all replicas at once;
- separate: the same number of ordinary ``DiffusionQL`` models, each ``learn``-ing in turn, as
  sequential separate runs in one process would.

Repeats are interleaved so both see the same machine load; medians are reported with the ratio.

Example::

    OMP_NUM_THREADS=1 python -m benchmarks.packed_seeds_speed --threads 1 --seconds 3 --out seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import add_common_args, machine, random_data, rate, setup_torch, write_results

OBS_DIM, ACT_DIM = 11, 3  # Hopper


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "stacked/separate")
    p.add_argument("--seeds", type=int, default=5, help="replicas (seeds 0..N-1)")
    p.add_argument("--out", type=Path, default=None, help="write all results to this JSON file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from dql_agent import DiffusionQL, OfflineBuffer
    from dql_agent.seeds import SeedStack

    args = parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    device, threads = setup_torch(args)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"threads": threads}
    results: dict[str, Any] = {"machine": machine(device, threads), "settings": settings}
    print("machine:", json.dumps(results["machine"]))

    buffer = OfflineBuffer(**random_data(OBS_DIM, ACT_DIM))
    seeds = range(args.seeds)
    stack = SeedStack([DiffusionQL(buffer, device=device, seed=s) for s in seeds])
    separate = [DiffusionQL(buffer, device=device, seed=s) for s in seeds]

    def stacked_rounds(n: int) -> None:  # one round = one gradient step of every replica
        stack.learn(n, log_interval=0)

    def separate_rounds(n: int) -> None:
        for model in separate:
            model.learn(n, log_interval=0, reset_num_timesteps=False)

    stacked_rounds(2)  # warm-up
    separate_rounds(2)
    samples: dict[str, list[float]] = {"stacked": [], "separate": []}
    for _ in range(args.repeats):  # interleaved
        samples["stacked"].append(args.seeds * rate(stacked_rounds, args.seconds, device))
        samples["separate"].append(args.seeds * rate(separate_rounds, args.seconds, device))
    for name, values in samples.items():
        results[name] = {"steps_per_s": statistics.median(values), "all": values}
    results["ratio"] = results["stacked"]["steps_per_s"] / results["separate"]["steps_per_s"]
    print(
        f"\n{args.seeds} seeds, obs {OBS_DIM}, act {ACT_DIM}, defaults (3x256, batch 256, T=5), {device}, "
        f"{threads} thread(s); gradient steps/s summed over the seeds, median of {args.repeats}"
    )
    print("| | steps/s | all |\n|---|---|---|")
    for name in samples:
        print(f"| {name} | {results[name]['steps_per_s']:.1f} | {', '.join(f'{v:.1f}' for v in samples[name])} |")
    print(f"stacked / separate: {results['ratio']:.2f}x")
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
