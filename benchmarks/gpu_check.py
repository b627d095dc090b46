"""The one command to run when a GPU is lent: the CUDA tests, then the numbers, in at most ~8 minutes
on one H100. It writes ``gpu_check.md`` (the tables for docs/BENCHMARKS.md) and ``gpu_check.json``
(every sample) under the folder it is given.

    python -m benchmarks.gpu_check --out gpu_results --reference /path/to/Diffusion-Policies-for-Offline-RL
    python -m benchmarks.gpu_check --out /tmp/check --dry-run        # on the CPU, tiny sizes: the script itself

Phases (each bounded by ``--seconds`` of timing after its warm-up; a phase that would pass the
``--budget`` is skipped and says so, so the command always ends with a report):

1. ``pytest -m cuda``: the tests that only a GPU runs (fp16 with loss scaling, bf16, CUDA graphs,
   NCCL, data kept on the host);
2. training steps/s at the official settings (Hopper shapes: obs 11, act 3; batch 256; T=5; 3 x 256
   MLPs; 10k random transitions): eager, ``compile_training()``, bf16, bf16 compiled, and the
   official code on the same GPU and on this machine's CPU (``--reference``), in interleaved repeats;
3. ``train_seeds`` with 5 seeds against 1: time per round of gradient steps;
4. single-observation ``predict`` latency: eager, ``compile_acting()``, and ``compile_acting(mode=
   "reduce-overhead")`` (CUDA graphs);
5. a camera model (84 x 84 x 3 + state, the default CNN): steps/s in fp32 and bf16;
6. peak GPU memory of each phase (``torch.cuda.max_memory_allocated``).

Without CUDA it refuses to start (exit status 2) unless ``--dry-run``: then every phase runs on the
CPU at tiny sizes for a fraction of a second, which tests the script (tests/test_gpu_check.py),
not the hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import latency, machine, random_data, rate, sync

ROOT = Path(__file__).resolve().parents[1]
FULL = {"hidden_dim": 256, "diffusion_steps": 5, "batch_size": 256}
TINY = {"hidden_dim": 32, "n_hidden": 2, "diffusion_steps": 3, "batch_size": 32, "n_action_samples": 8}


class Check:
    """The run's clock, sizes and report."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.start = time.perf_counter()
        self.sizes = TINY if args.dry_run else FULL
        self.seconds = 0.2 if args.dry_run else args.seconds
        self.report: dict[str, Any] = {"machine": machine(device, torch.get_num_threads()), "dry_run": args.dry_run}
        self.skipped: dict[str, str] = {}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def phase(self, name: str, needs: float, run: Callable[[], Any]) -> None:
        """Run phase ``name`` if about ``needs`` seconds are left; record its result and peak memory."""
        if self.left() < needs:
            self.skipped[name] = f"skipped: {self.left():.0f} s of the {self.args.budget:.0f} s budget left"
            print(f"[{name}] {self.skipped[name]}", flush=True)
            return
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        began = time.perf_counter()
        result = run()
        result = result if isinstance(result, dict) else {"result": result}
        result["seconds"] = time.perf_counter() - began
        if self.device.type == "cuda":
            result["peak_memory_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.report[name] = result
        print(f"[{name}] done in {result['seconds']:.0f} s", flush=True)

    def model(self, data: dict[str, np.ndarray] | Any, **changes: Any) -> Any:
        from dql_agent import DiffusionQL, OfflineBuffer

        buffer = data if isinstance(data, OfflineBuffer) else OfflineBuffer(**data)
        return DiffusionQL(buffer, seed=0, device=self.device, **{**self.sizes, **changes})


# phases ------------------------------------------------------------------------------------------
def cuda_tests(check: Check) -> dict[str, Any]:
    """``pytest -m cuda`` (in the dry run: collection only, the CPU has none to run)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests"]
    if check.args.dry_run:
        command.append("--collect-only")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(check.left(), 30))
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": result.returncode, "summary": summary, "output_tail": result.stdout[-4000:]}


def training_speed(check: Check) -> dict[str, Any]:
    """Steps/s of every variant at the official settings, repeats interleaved."""
    data = random_data(11, 3, n=2000 if check.args.dry_run else 10_000)
    variants: dict[str, Callable[[int], Any]] = {}
    for name, changes, compiled in (
        ("eager_fp32", {}, False),
        ("compiled_fp32", {}, True),
        ("eager_bf16", {"precision": "bf16"}, False),
        ("compiled_bf16", {"precision": "bf16"}, True),
    ):
        if compiled and check.args.skip_compile:
            check.skipped[f"training_speed.{name}"] = "skipped: --skip-compile"
            continue
        model = check.model(data, **changes)
        if compiled:
            model.compile_training()
        model.learn(3, log_interval=0)  # warm-up, compilation
        variants[name] = lambda n, m=model: m.learn(n, reset_num_timesteps=False, log_interval=0)
    if check.args.reference is not None and not check.args.dry_run:
        from benchmarks.speed import Official

        official = Official(check.args.reference, data, check.device)
        official.train(3)
        variants["official_gpu"] = official.train
        cpu = Official(check.args.reference, data, torch.device("cpu"))
        cpu.train(2)
        variants["official_cpu"] = cpu.train
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(check.args.repeats):
        for name, train in variants.items():
            samples[name].append(
                rate(train, check.seconds, check.device if name != "official_cpu" else torch.device("cpu"))
            )
    result: dict[str, Any] = {name: statistics.median(values) for name, values in samples.items()}
    result["samples"] = samples
    for name in ("official_gpu", "official_cpu"):
        if name in result:
            result[f"eager_fp32_over_{name}"] = result["eager_fp32"] / result[name]
    return result


def packed_seeds(check: Check) -> dict[str, Any]:
    """Seconds per round (one gradient step of every seed) of ``train_seeds`` with 5 seeds and with 1."""
    from dql_agent import OfflineBuffer, train_seeds

    buffer = OfflineBuffer(**random_data(11, 3, n=2000 if check.args.dry_run else 10_000))
    rounds = 5 if check.args.dry_run else 200
    times = {}
    for n in (1, 5):
        train_seeds(buffer, seeds=list(range(n)), total_timesteps=3, device=check.device, **check.sizes)  # warm-up
        sync(check.device)
        began = time.perf_counter()
        train_seeds(buffer, seeds=list(range(n)), total_timesteps=rounds, device=check.device, **check.sizes)
        sync(check.device)
        times[f"seeds_{n}_s_per_round"] = (time.perf_counter() - began) / rounds
    return {**times, "five_over_one": times["seeds_5_s_per_round"] / times["seeds_1_s_per_round"]}


def acting_latency(check: Check) -> dict[str, Any]:
    """Median ms of ``predict(one observation, deterministic=True)`` per acting path."""
    data = random_data(11, 3, n=1000)
    observation = data["observations"][0]
    result: dict[str, Any] = {}
    paths: list[tuple[str, dict[str, Any] | None]] = [
        ("eager", None),
        ("compiled", {}),
        ("cuda_graphs", {"mode": "reduce-overhead"}),
    ]
    for name, compile_kwargs in paths:
        if compile_kwargs is not None and check.args.skip_compile:
            check.skipped[f"acting_latency.{name}"] = "skipped: --skip-compile"
            continue
        model = check.model(data)
        if compile_kwargs is not None:
            model.policy.compile_acting(**compile_kwargs)
        for _ in range(3):  # compilation, CUDA graph recording
            model.predict(observation, deterministic=True)
        result[name] = latency(lambda m=model: m.predict(observation, deterministic=True), check.seconds, check.device)
    return result


def camera_model(check: Check) -> dict[str, Any]:
    """Steps/s of a camera model in fp32 and bf16, repeats interleaved."""
    from benchmarks.common import camera_buffer

    size = 20 if check.args.dry_run else 84
    buffer = camera_buffer(200 if check.args.dry_run else 2000, size=size)
    models = {precision: check.model(buffer, precision=precision) for precision in ("fp32", "bf16")}
    for model in models.values():
        model.learn(2, log_interval=0)
    samples: dict[str, list[float]] = {precision: [] for precision in models}
    for _ in range(check.args.repeats):
        for precision, model in models.items():
            samples[precision].append(
                rate(
                    lambda n, m=model: m.learn(n, reset_num_timesteps=False, log_interval=0),
                    check.seconds,
                    check.device,
                )
            )
    result: dict[str, Any] = {precision: statistics.median(values) for precision, values in samples.items()}
    return {
        **result,
        "bf16_over_fp32": result["bf16"] / result["fp32"],
        "image": f"{size}x{size}x3",
        "samples": samples,
    }


# report ------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any], skipped: dict[str, str]) -> str:
    m = report["machine"]
    lines = [f"Machine: {m.get('gpu', m['device'])}, CPU {m['cpu']} ({m['cores_visible']} cores), torch {m['torch']}"]
    if report["dry_run"]:
        lines.append("**Dry run on the CPU at tiny sizes: these numbers test the script, not a GPU.**")
    tests = report.get("cuda_tests")
    if tests:
        lines += ["", f"CUDA tests (`pytest -m cuda`): {tests['summary']} (exit status {tests['returncode']})"]
    speed = report.get("training_speed")
    if speed:
        lines += ["", "| training (Hopper shapes, batch 256, T=5) | gradient steps/s |", "|---|---|"]
        for name in ("eager_fp32", "compiled_fp32", "eager_bf16", "compiled_bf16", "official_gpu", "official_cpu"):
            if name in speed:
                lines.append(f"| {name.replace('_', ' ')} | {speed[name]:.1f} |")
        for name in ("official_gpu", "official_cpu"):
            if f"eager_fp32_over_{name}" in speed:
                lines.append(f"| eager fp32 / {name.replace('_', ' ')} | {speed[f'eager_fp32_over_{name}']:.2f}x |")
    seeds = report.get("packed_seeds")
    if seeds:
        lines += [
            "",
            f"`train_seeds`: 1 seed {1e3 * seeds['seeds_1_s_per_round']:.2f} ms per round, 5 seeds "
            f"{1e3 * seeds['seeds_5_s_per_round']:.2f} ms: {seeds['five_over_one']:.2f}x the time of one",
        ]
    acting = report.get("acting_latency")
    if acting:
        lines += ["", "| predict, 1 observation, deterministic | median ms | p90 ms |", "|---|---|---|"]
        for name in ("eager", "compiled", "cuda_graphs"):
            if name in acting and isinstance(acting[name], dict):
                lines.append(
                    f"| {name.replace('_', ' ')} | {acting[name]['median_ms']:.3f} | {acting[name]['p90_ms']:.3f} |"
                )
    camera = report.get("camera_model")
    if camera:
        lines += [
            "",
            f"Camera model ({camera['image']} + state): fp32 {camera['fp32']:.2f} steps/s, bf16 {camera['bf16']:.2f} "
            f"steps/s ({camera['bf16_over_fp32']:.2f}x)",
        ]
    memory = {k: v["peak_memory_mib"] for k, v in report.items() if isinstance(v, dict) and "peak_memory_mib" in v}
    if memory:
        lines += ["", "Peak GPU memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items())]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md and gpu_check.json")
    p.add_argument("--reference", type=Path, default=None, help="official Diffusion-QL checkout to compare with")
    p.add_argument("--dry-run", action="store_true", help="run every phase on the CPU at tiny sizes")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile variants")
    p.add_argument("--seconds", type=float, default=8.0, help="timing window per measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians reported")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check (phases past it skip)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check needs a CUDA GPU and this torch sees none (torch.cuda.is_available() is False): run it on the "
            "GPU machine, or pass --dry-run to exercise the script on the CPU",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if args.reference is not None and not (args.reference / "agents" / "ql_diffusion.py").exists():
        raise SystemExit(f"--reference {args.reference} has no agents/ql_diffusion.py")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        torch.set_num_threads(1)
        args.repeats = 1
    check = Check(args, device)
    print("machine:", json.dumps(check.report["machine"]), flush=True)
    with tempfile.TemporaryDirectory():
        check.phase("cuda_tests", 60, lambda: cuda_tests(check))
        check.phase("training_speed", 120, lambda: training_speed(check))
        check.phase("packed_seeds", 30, lambda: packed_seeds(check))
        check.phase("acting_latency", 60, lambda: acting_latency(check))
        check.phase("camera_model", 40, lambda: camera_model(check))
    check.report["skipped"] = check.skipped
    check.report["total_seconds"] = time.perf_counter() - check.start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(check.report, indent=2, default=str))
    table = markdown(check.report, check.skipped)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    return check.report


if __name__ == "__main__":
    main()
