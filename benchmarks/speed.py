"""Training speed and acting latency of DiffusionQL, against the arithmetic and the official code.

For each problem size (Hopper-sized: obs 11, act 3; larger: obs 39, act 8) at the default
settings (T=5, batch 256, 3x256 MLPs, 50 action candidates), on 10k random transitions:

- gradient steps/s of ``DiffusionQL.learn``;
- ``predict`` latency for 1 observation and a batch of 16 (median over many calls after a
  warm-up), through ``model.predict`` (SB3-style numpy checks) and the raw
  ``policy.select_action(tensor)``;
- the FLOPs of one training step, counted from the layer shapes, and the fraction of the
  machine's measured matmul throughput the step reaches;
- with ``--reference DIR`` (a checkout of Zhendong-Wang/Diffusion-Policies-for-Offline-RL), the
  official agent's steps/s and ``sample_action`` latency at the same settings, measured in the same
  run with ours/theirs repeats interleaved, and the ratios;
- with ``--deploy``, deterministic acting latency (1 and 16 observations, numpy in and out) through
  each deployment path: ``predict`` (eager, and after ``policy.compile_acting()`` with
  ``--compile``), the ``model.export`` ONNX file in ONNX Runtime with 1 and with 2 intra-op threads,
  and the ``.pt2`` (``torch.export.load(...).module()``); the official ``sample_action`` (its only
  acting, stochastic) in the same interleaved repeats with ``--reference``. Exports go to a temp dir.

Example::

    OMP_NUM_THREADS=2 python -m benchmarks.speed --reference /tmp/official --threads 2 --out speed.json
    OMP_NUM_THREADS=1 python -m benchmarks.speed --reference /tmp/official --threads 1 --compile --deploy
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    add_common_args,
    latency,
    machine,
    official_imports,
    random_data,
    rate,
    setup_torch,
    sync,
)

PROBLEMS = {"hopper": (11, 3), "large": (39, 8)}


# ---------------------------------------------------------------------------------------------
# FLOPs of one step, from the layer shapes
@dataclass(frozen=True)
class Linear:
    fan_in: int
    fan_out: int
    members: int = 1  # ensemble members evaluated together (twin critics)


def denoiser_layers(obs_dim: int, act_dim: int, hidden: int = 256, n_hidden: int = 3, time_dim: int = 16) -> list:
    time_mlp = [Linear(time_dim, 2 * time_dim), Linear(2 * time_dim, time_dim)]
    body = [Linear(act_dim + time_dim + obs_dim, hidden)] + [Linear(hidden, hidden)] * (n_hidden - 1)
    return time_mlp + body + [Linear(hidden, act_dim)]


def critic_layers(obs_dim: int, act_dim: int, hidden: int = 256, n_hidden: int = 3, members: int = 2) -> list:
    dims = [obs_dim + act_dim] + [hidden] * n_hidden + [1]
    return [Linear(i, o, members) for i, o in zip(dims[:-1], dims[1:], strict=True)]


def step_passes(obs_dim: int, act_dim: int, batch: int = 256, steps: int = 5) -> list[tuple[str, str, list, int, str]]:
    """The passes of one Diffusion-QL step: (what, network, layers, rows, kind), kind in
    'fwd', 'fwd+bwd' (backward = 2x forward: input and weight gradients) and 'fwd+bwd_in'
    (backward to the input only = 1x forward)."""
    d, c = denoiser_layers(obs_dim, act_dim), critic_layers(obs_dim, act_dim)
    return [
        (f"TD target: EMA actor chain, {steps} fwd", "denoiser", d, steps * batch, "fwd"),
        ("TD target: target critics fwd", "critic", c, batch, "fwd"),
        ("critic loss fwd+bwd", "critic", c, batch, "fwd+bwd"),
        ("BC loss fwd+bwd", "denoiser", d, batch, "fwd+bwd"),
        (f"actor chain {steps} fwd + {steps} bwd", "denoiser", d, steps * batch, "fwd+bwd"),
        ("critics on new actions fwd + bwd (input only)", "critic", c, batch, "fwd+bwd_in"),
    ]


def pass_flops(layers: list, rows: int, kind: str) -> int:
    forward = sum(2 * layer.fan_in * layer.fan_out * layer.members for layer in layers) * rows
    return forward * {"fwd": 1, "fwd+bwd": 3, "fwd+bwd_in": 2}[kind]


def step_flops(obs_dim: int, act_dim: int, batch: int = 256, steps: int = 5) -> tuple[int, list[dict]]:
    rows = []
    for what, net, layers, n, kind in step_passes(obs_dim, act_dim, batch, steps):
        rows.append({"pass": what, "network": net, "rows": n, "kind": kind, "flops": pass_flops(layers, n, kind)})
    return sum(r["flops"] for r in rows), rows


def step_matmuls(obs_dim: int, act_dim: int, batch: int = 256, steps: int = 5) -> dict[tuple[int, int, int], int]:
    """Every matmul (m, k, n) of one step with its count: forward x @ W, backward g @ W^T and x^T @ g."""
    shapes: dict[tuple[int, int, int], int] = {}
    for _, _, layers, rows, kind in step_passes(obs_dim, act_dim, batch, steps):
        for layer in layers:
            mms = [(rows, layer.fan_in, layer.fan_out)]
            if kind != "fwd":
                mms.append((rows, layer.fan_out, layer.fan_in))
            if kind == "fwd+bwd":
                mms.append((layer.fan_in, rows, layer.fan_out))
            for shape in mms:
                shapes[shape] = shapes.get(shape, 0) + layer.members
    return shapes


def time_mm(m: int, k: int, n: int, device: torch.device, seconds: float) -> float:
    """Seconds per torch.mm of (m, k) @ (k, n), best of a few timed batches."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    reps, best, deadline = 8, float("inf"), time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync(device)
        elapsed = (time.perf_counter() - start) / reps
        best = min(best, elapsed)
        if time.perf_counter() > deadline:
            return best
        if elapsed * reps < 0.01:
            reps *= 2


def matmul_ceiling(device: torch.device, seconds: float, problems: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """GFLOP/s of torch.mm at square sizes and, per problem, over the exact matmul shapes of one step."""
    result: dict[str, Any] = {"square": {}}
    for size in (256, 512, 1024):
        t = time_mm(size, size, size, device, seconds / 4)
        result["square"][f"{size}x{size}x{size}"] = 2 * size**3 / t / 1e9
    per_shape_cache: dict[tuple[int, int, int], float] = {}
    for name, (obs_dim, act_dim) in problems.items():
        shapes = step_matmuls(obs_dim, act_dim)
        total_time = total_flops = 0.0
        for shape, count in shapes.items():
            if shape not in per_shape_cache:
                per_shape_cache[shape] = time_mm(*shape, device, seconds / max(len(shapes), 1))
            total_time += per_shape_cache[shape] * count
            total_flops += 2 * shape[0] * shape[1] * shape[2] * count
        result[name] = {
            "step_shapes_gflops": total_flops / total_time / 1e9,
            "matmul_only_ms_per_step": total_time * 1e3,
            "n_matmuls": int(sum(shapes.values())),
        }
    return result


class Ours:
    name = "dql_agent"

    def __init__(self, data: dict[str, np.ndarray], device: torch.device):
        from dql_agent import DiffusionQL, OfflineBuffer

        self.device = device
        self.model = DiffusionQL(OfflineBuffer(**data), device=device, seed=0)
        self.obs1 = data["observations"][0]
        self.obs16 = data["observations"][:16]
        self.t1 = torch.as_tensor(self.obs1[None], device=device)
        self.t16 = torch.as_tensor(self.obs16, device=device)

    def train(self, n: int) -> None:
        self.model.learn(n)

    def predict(self, batch: int) -> Callable[[], Any]:
        obs = self.obs1 if batch == 1 else self.obs16
        return lambda: self.model.predict(obs)

    def select_action(self, batch: int) -> Callable[[], Any]:
        tensor = self.t1 if batch == 1 else self.t16
        policy = self.model.policy
        return lambda: policy.select_action(tensor)


class OursCompiled(Ours):
    """The same model with ``compile_training()`` and ``policy.compile_acting()`` (torch.compile);
    ``policy.select_action`` runs through the compiled ``act``, so it is inherited as is."""

    name = "dql_agent_compiled"

    def __init__(self, data: dict[str, np.ndarray], device: torch.device):
        super().__init__(data, device)
        self.model.compile_training()
        self.model.policy.compile_acting()
        for batch in (1, 16):  # compile outside the timed calls
            self.predict(batch)()
            self.select_action(batch)()


class Official:
    name = "official"

    def __init__(self, directory: Path, data: dict[str, np.ndarray], device: torch.device):
        with official_imports(directory):
            ql = importlib.import_module("agents.ql_diffusion")
            sampler = importlib.import_module("utils.data_sampler")
        obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
        torch.manual_seed(0)
        np.random.seed(0)
        self.device = device
        # main.py's defaults for locomotion: vp schedule, T=5, lr 3e-4, eta 1, grad_norm 1 (hopper-medium)
        self.agent = ql.Diffusion_QL(
            obs_dim, act_dim, 1.0, str(device), 0.99, 0.005, eta=1.0, beta_schedule="vp", n_timesteps=5, lr=3e-4
        )
        self.data = sampler.Data_Sampler(data, str(device), "no")
        self.obs1 = data["observations"][0]
        self.obs16 = data["observations"][:16]

    def train(self, n: int) -> None:
        self.agent.train(self.data, iterations=n, batch_size=256)

    def predict(self, batch: int) -> Callable[[], Any]:
        if batch == 1:
            return lambda: self.agent.sample_action(self.obs1)
        return self._batched_sample

    def _batched_sample(self) -> np.ndarray:
        """The official has no batched acting; this is ``sample_action`` for 16 states at once with
        its own modules (50 candidates each, softmax over min-Q), the cheapest way to use its code."""
        agent = self.agent
        state = torch.as_tensor(self.obs16, device=self.device).repeat_interleave(50, dim=0)
        with torch.no_grad():
            action = agent.actor.sample(state)
            q = agent.critic_target.q_min(state, action).view(16, 50)
            idx = torch.multinomial(torch.softmax(q, dim=1), 1).squeeze(1)
        return action.view(16, 50, -1)[torch.arange(16), idx].cpu().numpy()


# ---------------------------------------------------------------------------------------------
# deployment: deterministic acting through each exported runtime
DEPLOY_PATHS = {  # key in the results: label in the table
    "predict": "`model.predict(obs, deterministic=True)`, eager",
    "predict_compiled": "the same after `policy.compile_acting()`",
    "onnxruntime_1t": "ONNX Runtime, 1 intra-op thread",
    "onnxruntime_2t": "ONNX Runtime, 2 intra-op threads",
    "pt2": "`.pt2`: `torch.export.load(path).module()`",
    "official": "official `sample_action` (stochastic)",
}


def has_onnx() -> bool:
    """Whether the deploy extra (onnx, onnxscript to export; onnxruntime to run) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxscript", "onnxruntime"))


def onnxruntime_session(path: Path, threads: int) -> Any:
    """A CPU session with ``threads`` intra-op threads, executing one node at a time (the policy's
    graph is a chain of small layers: there is nothing for inter-op parallelism to overlap)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Deployed:
    """One model's deterministic acting through each deployment path on the same fixed observations,
    numpy in and numpy out for every path (as a control loop calls them). ``calls[path](batch)``
    returns the zero-argument call to time."""

    def __init__(self, ours: Ours, compiled: OursCompiled | None, official: Official | None, directory: Path):
        self.device = ours.device
        self.obs = {1: ours.obs1, 16: ours.obs16}
        self.flat = {1: ours.obs1[None], 16: ours.obs16}  # (B, obs_dim): what the exported graphs take
        self.info: dict[str, Any] = {"export_s": {}, "file_bytes": {}, "max_abs_diff_vs_predict": {}}
        model = ours.model
        self.calls: dict[str, Callable[[int], Callable[[], Any]]] = {"predict": self.predict_call(model)}
        if compiled is not None:
            self.calls["predict_compiled"] = self.predict_call(compiled.model)
        if has_onnx():
            path = self.export(model, directory / "policy.onnx")
            for threads in (1, 2):
                self.calls[f"onnxruntime_{threads}t"] = self.onnxruntime_call(onnxruntime_session(path, threads))
        else:
            self.info["onnx"] = "skipped: needs onnx, onnxscript and onnxruntime (pip install dql_agent[deploy])"
        module = torch.export.load(self.export(model, directory / "policy.pt2")).module()
        self.calls["pt2"] = self.pt2_call(module)
        if official is not None:
            self.calls["official"] = official.predict
        # Same weights, same fixed noise: every exported path returns predict's deterministic actions.
        for name in self.calls.keys() - {"predict", "predict_compiled", "official"}:
            diff = max(
                float(np.abs(self.calls[name](b)() - model.predict(self.obs[b], deterministic=True)[0]).max())
                for b in (1, 16)
            )
            self.info["max_abs_diff_vs_predict"][name] = diff

    def export(self, model: Any, path: Path) -> Path:
        start = time.perf_counter()
        written = Path(model.export(path))
        self.info["export_s"][path.suffix] = time.perf_counter() - start
        self.info["file_bytes"][path.suffix] = written.stat().st_size
        return written

    def predict_call(self, model: Any) -> Callable[[int], Callable[[], Any]]:
        return lambda batch: lambda: model.predict(self.obs[batch], deterministic=True)[0]

    def onnxruntime_call(self, session: Any) -> Callable[[int], Callable[[], Any]]:
        def call(batch: int) -> Callable[[], Any]:
            feed = {"observation": self.flat[batch]}
            return lambda: session.run(["action"], feed)[0]

        return call

    def pt2_call(self, module: Any) -> Callable[[int], Callable[[], Any]]:
        def call(batch: int) -> Callable[[], Any]:
            obs = self.flat[batch]

            def run() -> np.ndarray:
                with torch.no_grad():
                    return module(torch.from_numpy(obs).to(self.device)).cpu().numpy()

            return run

        return call


def measure_deploy(agents: list, seconds: float, repeats: int, device: torch.device) -> dict[str, Any]:
    """Deterministic acting latency of every deployment path (medians of interleaved repeats) and the
    ratios: official latency / path latency (with ``--reference``), eager predict latency / path latency."""
    ours = agents[0]
    compiled = next((a for a in agents if isinstance(a, OursCompiled)), None)
    official = next((a for a in agents if isinstance(a, Official)), None)
    with tempfile.TemporaryDirectory(prefix="dql_agent_deploy_") as tmp:
        deployed = Deployed(ours, compiled, official, Path(tmp))
        for call in deployed.calls.values():  # first calls (compile_acting's compilation) outside the timings
            for batch in (1, 16):
                call(batch)()
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in deployed.calls}
        # As in the acting phase: the paths' repeats interleaved, so all see the same machine load.
        for _ in range(repeats):
            for name, call in deployed.calls.items():
                for batch in (1, 16):
                    t = latency(call(batch), seconds / 4, device)["median_ms"]
                    samples[name].setdefault(f"b{batch}_ms", []).append(t)
    out: dict[str, Any] = {
        name: {key: statistics.median(values) for key, values in s.items()} | {"all": s} for name, s in samples.items()
    }
    for base in ("official", "predict"):
        if base in out:
            out[f"ratios_vs_{base}"] = {
                f"{name}_b{batch}": out[base][f"b{batch}_ms"] / out[name][f"b{batch}_ms"]
                for name in samples
                if name != base
                for batch in (1, 16)
            }
    out["info"] = deployed.info
    return out


def print_deploy(name: str, deploy: dict[str, Any]) -> None:
    print(f"\n### {name}: deterministic acting by deployment path (median ms; 'vs X': X's latency / this path's)")
    bases = [base for base in ("official", "predict") if f"ratios_vs_{base}" in deploy]
    header = "| path | 1 obs (ms) | 16 obs (ms) |"
    for base in bases:
        label = "official" if base == "official" else "eager predict"
        header += f" 1 obs vs {label} | 16 obs vs {label} |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for key, label in DEPLOY_PATHS.items():
        if key not in deploy:
            continue
        line = f"| {label} | {deploy[key]['b1_ms']:.3f} | {deploy[key]['b16_ms']:.3f} |"
        for base in bases:
            ratios = deploy[f"ratios_vs_{base}"]
            line += "".join(f" {ratios[f'{key}_b{b}']:.2f}x |" if f"{key}_b{b}" in ratios else " - |" for b in (1, 16))
        print(line)
    info = deploy["info"]
    if "onnx" in info:
        print(info["onnx"])
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in info["max_abs_diff_vs_predict"].items())
    exports = ", ".join(f"{k} {v:.1f} s ({info['file_bytes'][k] / 1e6:.2f} MB)" for k, v in info["export_s"].items())
    print(f"max |action - predict(deterministic=True)|: {diffs}; export: {exports}")


def profile_step(ours: Ours, n_steps: int = 20, rows: int = 15) -> str:
    """torch.profiler table of our training step (self CPU time by op)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ours.device.type == "cuda" else [])
    ours.train(3)
    with profile(activities=activities) as prof:
        ours.train(n_steps)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, default=None, help="official Diffusion-QL checkout to compare with")
    add_common_args(p, "ours/official")
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--compile", action="store_true", help="also time compile_training() and compile_acting()")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of our step")
    p.add_argument(
        "--deploy",
        action="store_true",
        help="also time deterministic acting through ONNX Runtime (1 and 2 threads) and the .pt2 (temp dir)",
    )
    p.add_argument("--out", type=Path, default=None, help="write all results to this JSON file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:  # noqa: C901 - one branch per optional phase
    args = parse_args(argv)
    device, threads = setup_torch(args)
    if args.reference is not None and not (args.reference / "agents" / "ql_diffusion.py").exists():
        raise FileNotFoundError(f"--reference {args.reference} has no agents/ql_diffusion.py")
    problems = {name: PROBLEMS[name] for name in args.problems}
    results: dict[str, Any] = {"machine": machine(device, threads), "settings": vars(args) | {"threads": threads}}
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in results["settings"].items()}
    print("machine:", json.dumps(results["machine"]))

    results["matmul"] = matmul_ceiling(device, args.seconds, problems)
    square = results["matmul"]["square"]
    print("torch.mm GFLOP/s:", ", ".join(f"{k}: {v:.1f}" for k, v in square.items()))

    for name, (obs_dim, act_dim) in problems.items():
        if args.compile:
            # Each problem compiles afresh, as in its own process: dynamo's recompile limit (8 per code
            # object) counts the earlier problems' compiled models too, and past it `act` runs eager.
            torch._dynamo.reset()
        data = random_data(obs_dim, act_dim)
        agents = [Ours(data, device)] + ([OursCompiled(data, device)] if args.compile else [])
        if args.reference is not None:
            agents.append(Official(args.reference, data, device))
        flops, passes = step_flops(obs_dim, act_dim)
        res: dict[str, Any] = {"obs_dim": obs_dim, "act_dim": act_dim, "step_gflop": flops / 1e9, "passes": passes}
        samples: dict[str, dict[str, list[float]]] = {a.name: {} for a in agents}
        for agent in agents:
            agent.train(5)  # warm-up (and compilation)
        # Training, then acting, each phase with the agents' repeats interleaved so all see the same
        # machine load; acting gets its own phase, as in a control loop (no training in between).
        for _ in range(args.repeats):
            for agent in agents:
                samples[agent.name].setdefault("steps_per_s", []).append(rate(agent.train, args.seconds, device))
        for _ in range(args.repeats):
            for agent in agents:
                s = samples[agent.name]
                for batch in (1, 16):
                    s.setdefault(f"predict_b{batch}_ms", []).append(
                        latency(agent.predict(batch), args.seconds / 4, device)["median_ms"]
                    )
                    if isinstance(agent, Ours):
                        s.setdefault(f"select_action_b{batch}_ms", []).append(
                            latency(agent.select_action(batch), args.seconds / 4, device)["median_ms"]
                        )
        mm = results["matmul"][name]
        for agent_name, s in samples.items():
            r = {key: statistics.median(values) for key, values in s.items()}
            r["all"] = s
            r["achieved_gflops"] = r["steps_per_s"] * flops / 1e9
            r["fraction_of_mm_256"] = r["achieved_gflops"] / square["256x256x256"]
            r["fraction_of_step_shapes"] = r["achieved_gflops"] / mm["step_shapes_gflops"]
            res[agent_name] = r
        if "official" in res:
            res["ratios"] = {
                f"{agent}_{key}": speedup(res[agent][key], res["official"][key], key)
                for agent in ("dql_agent", "dql_agent_compiled")
                if agent in res
                for key in ("steps_per_s", "predict_b1_ms", "predict_b16_ms")
            }
        if args.deploy:  # its own phase after acting, again with nothing else running in between
            res["deploy"] = measure_deploy(agents, args.seconds, args.repeats, device)
        if args.profile:
            res["profile"] = profile_step(agents[0])
            print(res["profile"])
        results[name] = res
        print_problem(name, res, mm, square["256x256x256"])
        if args.deploy:
            print_deploy(name, res["deploy"])

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return results


def print_problem(name: str, res: dict[str, Any], mm: dict[str, float], mm256: float) -> None:
    print(
        f"\n## {name}: obs {res['obs_dim']}, act {res['act_dim']}; one step = {res['step_gflop']:.3f} GFLOP; "
        f"matmul ceiling: {mm['step_shapes_gflops']:.1f} GFLOP/s over the step's shapes "
        f"({mm['matmul_only_ms_per_step']:.1f} ms of matmuls per step), {mm256:.1f} GFLOP/s at 256^3"
    )
    agents = [a for a in ("dql_agent", "dql_agent_compiled", "official") if a in res]
    ours = [a for a in agents if a != "official"]
    header = "| metric | " + " | ".join(agents) + " |"
    if "official" in res:
        header += "".join(f" {a} vs official |" for a in ours)
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    rows = [
        ("train steps/s", "steps_per_s", "{:.1f}", True),
        ("achieved GFLOP/s", "achieved_gflops", "{:.1f}", False),
        ("fraction of step-shape matmul ceiling", "fraction_of_step_shapes", "{:.0%}", False),
        ("fraction of 256^3 mm", "fraction_of_mm_256", "{:.0%}", False),
        ("predict, 1 obs (ms)", "predict_b1_ms", "{:.2f}", True),
        ("predict, 16 obs (ms)", "predict_b16_ms", "{:.2f}", True),
        ("select_action(tensor), 1 obs (ms)", "select_action_b1_ms", "{:.2f}", False),
        ("select_action(tensor), 16 obs (ms)", "select_action_b16_ms", "{:.2f}", False),
    ]
    for label, key, fmt, compare in rows:
        line = f"| {label} | " + " | ".join(fmt.format(res[a][key]) if key in res[a] else "-" for a in agents) + " |"
        if "official" in res:
            for a in ours:
                line += f" {speedup(res[a][key], res['official'][key], key):.2f}x |" if compare else " |"
        print(line)


def speedup(ours: float, theirs: float, key: str) -> float:
    """ours vs theirs as a speed-up: a rate divides, a latency is inverted."""
    return ours / theirs if key == "steps_per_s" else theirs / ours


if __name__ == "__main__":
    main()
