"""What the benchmark scripts share: the machine's description, timing, data, argument parsing."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

N_TRANSITIONS = 10_000  # the speed measurements' dataset size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[int], Any], seconds: float, device: torch.device, probe: int = 3) -> float:
    """Calls/s of ``fn(n)`` (n iterations per call): calibrated on ``probe`` iterations, then one
    timed run of about ``seconds``."""
    sync(device)
    start = time.perf_counter()
    fn(probe)
    sync(device)
    first = (time.perf_counter() - start) / probe
    n = max(1, round(seconds / max(first, 1e-6)))
    start = time.perf_counter()
    fn(n)
    sync(device)
    return n / (time.perf_counter() - start)


def latency(fn: Callable[[], Any], seconds: float, device: torch.device, warmup: int = 10) -> dict[str, float]:
    """Median and 90th percentile (ms) over at least 20 calls and about ``seconds``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 20 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_ms": statistics.median(times) * 1e3, "p90_ms": times[int(0.9 * len(times))] * 1e3, "n": len(times)}


def random_data(obs_dim: int, act_dim: int, seed: int = 0, n: int = N_TRANSITIONS) -> dict[str, np.ndarray]:
    """``n`` random transitions (the speed measurements' data: the content does not matter)."""
    rng = np.random.default_rng(seed)
    return {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "terminals": rng.random(n) < 0.01,
    }


@contextlib.contextmanager
def official_imports(directory: Path) -> Iterator[None]:
    """Import from the official checkout: its top-level ``agents``/``utils`` packages are put in
    sys.modules only while importing (``utils.logger`` stubbed: it needs a log directory), then the
    previous entries are restored so the generic names do not leak."""
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("agents", "utils")}
    for key in saved:
        del sys.modules[key]
    sys.path.insert(0, str(directory))
    try:
        utils = importlib.import_module("utils")
        stub = types.ModuleType("utils.logger")
        stub.logger = None
        sys.modules["utils.logger"] = stub
        utils.logger = stub
        yield
    finally:
        sys.path.remove(str(directory))
        for key in [k for k in sys.modules if k.split(".")[0] in ("agents", "utils")]:
            del sys.modules[key]
        sys.modules.update(saved)


def machine(device: torch.device | None = None, threads: int | None = None) -> dict[str, Any]:
    """The machine a number was measured on: CPU, visible cores, torch and its threads, the device."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": model,
        "cores_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if threads is not None:
        info["threads_arg"] = threads
    if device is not None:
        info["device"] = str(device)
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    return info


def add_common_args(p: argparse.ArgumentParser, compared: str) -> None:
    """--device, --threads, --seconds, --repeats: shared by the speed scripts."""
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: OMP_NUM_THREADS if set, else all visible cores)",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--repeats", type=int, default=3, help=f"interleaved {compared} repeats; medians reported")


def setup_torch(args: argparse.Namespace) -> tuple[torch.device, int]:
    """Set torch's threads (--threads, else an explicit OMP_NUM_THREADS, else all cores); the device."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or (int(omp) if omp.isdigit() else 0) or cores
    torch.set_num_threads(threads)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), threads
    return torch.device(args.device), threads


def parse_named_hyperparameters(items: Sequence[str], flag: str) -> dict[str, dict[str, Any]]:
    """``NAME=JSON`` pairs, the JSON an object of hyperparameters; a ValueError names ``flag`` and the item."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{flag} expects NAME=JSON, got {item!r}")
        try:
            hyperparameters = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} {name}: not JSON ({e}): {value!r}") from None
        if not isinstance(hyperparameters, dict):
            raise ValueError(f"{flag} {name}: expects a JSON object of hyperparameters, got {value!r}")
        out[name] = hyperparameters
    return out


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs, values read as JSON when they parse (numbers, true, null), else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def camera_buffer(n: int, size: int = 84, action_dim: int = 3, seed: int = 0) -> Any:
    """``n`` random transitions of an ``{"image": (size, size, 3) uint8, "state": (2,)}`` Dict space:
    what a camera model's step costs does not depend on the pixels' values."""
    from gymnasium import spaces

    from dql_agent import OfflineBuffer

    rng = np.random.default_rng(seed)
    space = spaces.Dict(
        {"image": spaces.Box(0, 255, (size, size, 3), np.uint8), "state": spaces.Box(-1, 1, (2,), np.float32)}
    )
    obs = {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), "state": rng.normal(size=(n, 2))}
    next_obs = {"image": np.roll(obs["image"], -1, axis=0), "state": np.roll(obs["state"], -1, axis=0)}
    return OfflineBuffer(
        obs, rng.uniform(-1, 1, (n, action_dim)), rng.normal(size=n), next_obs, np.zeros(n), observation_space=space
    )


def write_results(path: Path | None, results: Any) -> None:
    """Write a measurement's results as indented JSON to ``path`` (its folder made), when given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
