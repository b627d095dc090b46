"""Camera observations: training speed, acting latency and memory per transition of Diffusion-QL on
image (+ state) observations.

For each image size (default 64x64x3 and 84x84x3) a buffer of random uint8 frames plus a 2-D
state is built, and the default DiffusionQL (CNN encoder with the default ``cnn_channels``,
``image_features`` and ``random_shift``) is timed for:

- gradient steps per second at ``--batch`` (default 256), after a warm-up;
- ``predict`` latency for one observation, deterministic and stochastic (median of repeats);
- buffer bytes per transition (observation and next observation stored, images as uint8).

Example (one thread, as the numbers in the README were taken)::

    OMP_NUM_THREADS=1 python -m benchmarks.pixels_speed --threads 1 --sizes 64 84 --out /tmp/bench/pixels.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import camera_buffer, machine, write_results
from dql_agent import DiffusionQL  # noqa: E402


def time_steps(model: DiffusionQL, seconds: float) -> float:
    model.learn(3, log_interval=0)  # warm-up: first-call allocations
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.learn(5, reset_num_timesteps=False, log_interval=0)
        steps += 5
    return steps / (time.perf_counter() - start)


def time_predict(model: DiffusionQL, observation: dict, deterministic: bool, repeats: int) -> float:
    model.predict(observation, deterministic=deterministic)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(observation, deterministic=deterministic)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 84])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--transitions", type=int, default=2000, help="rows of the random buffer")
    p.add_argument("--seconds", type=float, default=20.0, help="timing window of the training loop per size")
    p.add_argument("--repeats", type=int, default=50, help="predict calls per latency")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        buffer = camera_buffer(args.transitions, size, action_dim=2)
        model = DiffusionQL(buffer, device=args.device, seed=0, batch_size=args.batch)
        one = {"image": buffer.observations["image"][0].numpy(), "state": buffer.observations["state"][0].numpy()}
        rows.append(
            {
                "size": f"{size}x{size}x3",
                "steps_per_s": time_steps(model, args.seconds),
                "predict_ms_deterministic": 1e3 * time_predict(model, one, True, args.repeats),
                "predict_ms_stochastic": 1e3 * time_predict(model, one, False, args.repeats),
                "bytes_per_transition": buffer.bytes_per_transition(),
                "encoder_parameters": sum(p.numel() for p in model.policy.encoder.parameters()),
            }
        )
    result = {"machine": machine(torch.device(args.device), args.threads), "batch": args.batch, "rows": rows}
    print(f"batch {args.batch}, {args.device}, {args.threads} thread(s)")
    print("| image | gradient steps/s | predict ms (deterministic) | predict ms (stochastic) | bytes/transition |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['steps_per_s']:.2f} | {r['predict_ms_deterministic']:.1f} | "
            f"{r['predict_ms_stochastic']:.1f} | {r['bytes_per_transition']:,} |"
        )
    write_results(args.out, result)
    return result


if __name__ == "__main__":
    main()
