"""Mixed precision: Diffusion-QL's training steps/s in bf16 (or fp16 on CUDA) against fp32, and
where the time of one step goes.

Models (Hopper shapes: obs 11, act 3; batch 256, T=5, 50 candidates; 10k random transitions):

- ``width256``: the default 3 x 256 MLPs;
- ``width1024``: 3 x 1024 MLPs (matmuls dominate);
- ``camera``: an 84 x 84 x 3 camera plus a 2-d state, through the default CNN encoder;
- ``width256-compiled``: the default after ``compile_training()`` (fuses the element-wise work).

Every model is timed in each precision with the repeats interleaved (one run, the same machine
load for both), and the ratio bf16/fp32 of the median steps/s is reported. ``--profile`` adds,
per model and precision, the self time of one step split into matmuls and convolutions, dtype
casts, and everything else (element-wise work, reductions, the optimizer), from torch.profiler.

    OMP_NUM_THREADS=1 python -m benchmarks.precision --threads 1 --out benchmarks/results/precision.json --profile
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import add_common_args, camera_buffer, machine, random_data, rate, setup_torch, write_results

MODELS = ("width256", "width1024", "camera", "width256-compiled")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution", "aten::_convolution")
CONV_AND_MM = (*MATMULS, "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_mkldnn_convolution")
CASTS = ("aten::_to_copy", "aten::to", "aten::copy_")


def build(name: str, precision: str, device: torch.device, transitions: int) -> Any:
    from dql_agent import DiffusionQL, OfflineBuffer

    if name == "camera":
        buffer = camera_buffer(min(transitions, 2000))
    else:
        buffer = OfflineBuffer(**random_data(11, 3, n=transitions))
    width = 1024 if name == "width1024" else 256
    model = DiffusionQL(buffer, seed=0, device=device, hidden_dim=width, precision=precision)
    if name.endswith("-compiled"):
        model.compile_training()
    model.learn(3, log_interval=0)  # warm-up (and compilation)
    return model


def step_breakdown(model: Any, steps: int) -> dict[str, float]:
    """Self time per step (ms) of matmuls/convolutions, casts and the rest, over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.learn(steps, reset_num_timesteps=False, log_interval=0)
    parts = {"matmul_conv": 0.0, "casts": 0.0, "other": 0.0}
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / steps
        if event.key in CONV_AND_MM or "convolution" in event.key:
            parts["matmul_conv"] += ms
        elif event.key in CASTS:
            parts["casts"] += ms
        else:
            parts["other"] += ms
    parts["total"] = sum(parts.values())
    return parts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "fp32/low-precision")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16"), help="what fp32 is compared with")
    p.add_argument("--transitions", type=int, default=10_000)
    p.add_argument("--profile", action="store_true", help="split one step's time into matmuls, casts, the rest")
    p.add_argument("--profile-steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device, threads = setup_torch(args)
    precisions = ("fp32", args.precision)
    results: dict[str, Any] = {"machine": machine(device, threads), "settings": {**vars(args), "threads": threads}}
    results["settings"]["out"] = str(args.out)
    print("machine:", json.dumps(results["machine"]))
    for name in args.models:
        models = {precision: build(name, precision, device, args.transitions) for precision in precisions}
        samples: dict[str, list[float]] = {precision: [] for precision in precisions}
        for _ in range(args.repeats):
            for precision, model in models.items():
                samples[precision].append(
                    rate(lambda n, m=model: m.learn(n, reset_num_timesteps=False, log_interval=0), args.seconds, device)
                )
        row: dict[str, Any] = {
            precision: {"steps_per_s": statistics.median(s), "all": s} for precision, s in samples.items()
        }
        row["ratio"] = row[args.precision]["steps_per_s"] / row["fp32"]["steps_per_s"]
        if args.profile and not name.endswith("-compiled"):  # compiled kernels hide the split
            for precision, model in models.items():
                row[precision]["breakdown_ms"] = step_breakdown(model, args.profile_steps)
        results[name] = row
        print(
            f"{name}: fp32 {row['fp32']['steps_per_s']:.2f} steps/s, {args.precision} "
            f"{row[args.precision]['steps_per_s']:.2f} steps/s, ratio {row['ratio']:.2f}"
        )
    print_table(results, args.models, args.precision)
    write_results(args.out, results)
    return results


def print_table(results: dict[str, Any], models: Sequence[str], low: str) -> None:
    print(f"\n| model | fp32 steps/s | {low} steps/s | {low} / fp32 |")
    print("|---|---|---|---|")
    for name in models:
        row = results[name]
        print(f"| {name} | {row['fp32']['steps_per_s']:.2f} | {row[low]['steps_per_s']:.2f} | {row['ratio']:.2f}x |")
    profiled = [name for name in models if "breakdown_ms" in results[name]["fp32"]]
    if profiled:
        print("\nms per step (self time): matmuls and convolutions / casts / everything else / total")
        print("\n| model | precision | matmul+conv | casts | other | total |")
        print("|---|---|---|---|---|---|")
        for name in profiled:
            for precision in ("fp32", low):
                b = results[name][precision]["breakdown_ms"]
                print(
                    f"| {name} | {precision} | {b['matmul_conv']:.1f} | {b['casts']:.1f} | {b['other']:.1f} | "
                    f"{b['total']:.1f} |"
                )


if __name__ == "__main__":
    main()
