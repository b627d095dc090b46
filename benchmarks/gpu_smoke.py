"""The CUDA paths end to end, with timings: what a GPU machine runs before trusting a release.

    python -m benchmarks.gpu_smoke --device cuda [--out gpu_smoke.json]

Trains each algorithm briefly on the device (Diffusion-QL at the default Hopper size, eager and
``compile_training()``; Diffusion-DICE; QVPO online on Pendulum), acts, saves and loads across
devices, stacks seeds with ``train_seeds``, and records steps/s and ``predict`` latency. Every check
raises on failure; the JSON keeps the numbers. Random data: it shows the paths run and how fast,
not how well anything learns.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from dql_agent import QVPO, DiffusionDICE, DiffusionQL, OfflineBuffer, train_seeds


def hopper_like(n: int = 20_000, seed: int = 0) -> OfflineBuffer:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 11)).astype(np.float32)
    ends = np.zeros(n, bool)
    ends[::500] = True
    return OfflineBuffer(obs, rng.uniform(-1, 1, (n, 3)), rng.normal(size=n), obs, np.zeros(n, bool), ends)


def steps_per_second(model, steps: int) -> float:
    model.learn(10, reset_num_timesteps=False)  # warm-up (allocations, compilation)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def predict_ms(model, obs: np.ndarray, repeats: int = 50) -> float:
    model.predict(obs, deterministic=True)
    start = time.perf_counter()
    for _ in range(repeats):
        model.predict(obs, deterministic=True)
    return 1000 * (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300, help="timed gradient steps per path")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report: dict = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    }
    buffer = hopper_like()
    obs1, obs16 = np.zeros(11, np.float32), np.zeros((16, 11), np.float32)

    model = DiffusionQL(buffer, seed=0, device=device)
    report["dql_steps_per_s"] = steps_per_second(model, args.steps)
    first = model.predict(obs16, deterministic=True)[0]
    assert np.array_equal(first, model.predict(obs16, deterministic=True)[0]), "deterministic acting moved"
    assert np.all(np.isfinite(first)) and first.shape == (16, 3)
    report["dql_predict_ms"] = {"b1": predict_ms(model, obs1), "b16": predict_ms(model, obs16)}
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp) / "m", include_optimizer=True)
        same = DiffusionQL.load(Path(tmp) / "m", device=device)
        assert np.array_equal(same.predict(obs16, deterministic=True)[0], first), "load on the device changed acting"
        on_cpu = DiffusionQL.load(Path(tmp) / "m", device="cpu")
        gap = float(np.abs(on_cpu.predict(obs16, deterministic=True)[0] - first).max())
        report["cuda_vs_cpu_deterministic_max_abs_diff"] = gap
        same.set_buffer(buffer)
        same.learn(5, reset_num_timesteps=False)  # resumes on the device with its optimizer state

    compiled = DiffusionQL(buffer, seed=0, device=device)
    compiled.compile_training()
    start = time.perf_counter()
    compiled.learn(2)
    report["compile_first_steps_s"] = time.perf_counter() - start
    report["dql_compiled_steps_per_s"] = steps_per_second(compiled, args.steps)

    start = time.perf_counter()
    seeds = train_seeds(buffer, seeds=[0, 1, 2, 3, 4], total_timesteps=args.steps, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    report["train_seeds_5_steps_per_s_each"] = args.steps / (time.perf_counter() - start)
    assert all(np.all(np.isfinite(m.predict(obs1, deterministic=True)[0])) for m in seeds)

    dice = DiffusionDICE(buffer, seed=0, device=device, behavior_steps=50)
    report["dice_steps_per_s"] = steps_per_second(dice, min(args.steps, 200))
    assert np.all(np.isfinite(dice.predict(obs16, deterministic=True)[0]))

    qvpo = QVPO(gym.make("Pendulum-v1"), seed=0, device=device, learning_starts=100)
    start = time.perf_counter()
    qvpo.learn(400)
    report["qvpo_400_env_steps_s"] = time.perf_counter() - start
    assert np.all(np.isfinite(qvpo.predict(np.zeros(3, np.float32), deterministic=True)[0]))

    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
