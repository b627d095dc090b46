"""Stored-output regression cases: a fixed seed, a tiny config, N updates, then the outputs.

Each case trains one algorithm on small data built here (a seeded random dataset for the offline
algorithms, a seeded Pendulum for QVPO) and records, after training (``run``), after loading the
committed old-format checkpoint (``loaded``) and after resuming it for a few steps (``resumed``):

- every tensor of ``policy.state_dict()`` (``tests/data/regression_weights.safetensors``) and its
  SHA-256;
- every ``train/*`` value the SB3 logger received (one dump per ``log_every`` timesteps);
- ``predict`` on fixed observations, deterministic and stochastic after ``policy.set_seed``.

Two guarantees, kept apart (``tests/test_regression.py``):

- Against the stored floats, the outputs agree within tolerances *measured* here: every case is
  run under each kernel path this torch offers (``KERNEL_PATHS``: ATen's CPU capability and MKL's
  instruction-set and reproducibility switches), the largest deviation from the stored outputs is
  recorded per case, stage and kind (``tests/data/regression_tolerances.json``), and the tolerance
  is ``MARGIN`` times it, never above ``CEILING``, which is what a real change of behaviour exceeds
  (a 1e-3 relative change of one weight; the suite shows each such change failing).
- On the machine that wrote them (same torch, CPU, capability and BLAS: ``machine()``), the
  weights' hashes and every float must also match bit for bit.

Deviations are relative, with a floor: ``|found - stored| / max(|stored|, FLOOR * scale)``, where
``scale`` is the largest magnitude of the group the value belongs to (a tensor, a logged key's
series, an action array), so values near zero are not judged by their own tiny size.

Regenerate only for a deliberate change of behaviour, and commit the new files on their own,
saying why; then re-measure the tolerances (minutes: every case under every kernel path):

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.regression_cases                  # the stored outputs
    OMP_NUM_THREADS=1 .venv/bin/python -m tests.regression_cases --checkpoints    # and the checkpoints
    OMP_NUM_THREADS=1 .venv/bin/python -m tests.regression_cases --measure        # the tolerances

The checkpoints stand for models saved by earlier releases: rewrite them only when the checkpoint
format itself changes (the ``loaded``/``resumed`` outputs always start from the committed ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from stable_baselines3.common.logger import KVWriter, Logger

DATA = Path(__file__).parent / "data"
STORED = DATA / "regression.json"
STORED_WEIGHTS = DATA / "regression_weights.safetensors"
TOLERANCES = DATA / "regression_tolerances.json"
CHECKPOINTS = DATA / "checkpoints"

TINY = {"hidden_dim": 32, "n_hidden": 2, "batch_size": 16}
STEPS = 12  # gradient steps (offline) or env steps (QVPO) before the fingerprints
RESUME_STEPS = 6  # more steps after loading the stored checkpoint

CASES: dict[str, dict[str, Any]] = {
    "dql": {"algo": "DiffusionQL", "hp": {**TINY, "diffusion_steps": 3, "n_action_samples": 6, "ema_start_step": 4}},
    "dql_max_q": {
        "algo": "DiffusionQL",
        "hp": {
            **TINY,
            "diffusion_steps": 4,
            "n_action_samples": 5,
            "max_q_backup": True,
            "n_max_q_samples": 3,
            "normalize_observations": True,
            "lr_decay": True,
            "lr_decay_steps": 20,
            "act_with_ema": True,
            "ema_start_step": 0,
            "ema_update_every": 2,
            "beta_schedule": "cosine",
            "reward_transform": "normalize",
        },
    },
    "dql_bandit": {"algo": "DiffusionQL", "hp": {**TINY, "diffusion_steps": 2, "n_action_samples": 4, "eta": 2.0}},
    "dql_bc": {"algo": "DiffusionQL", "hp": {**TINY, "diffusion_steps": 3, "n_action_samples": 4, "eta": 0.0}},
    "dice": {
        "algo": "DiffusionDICE",
        "hp": {
            **TINY,
            "behavior_batch_size": 32,
            "behavior_steps": 7,
            "diffusion_steps": 3,
            "n_action_samples": 5,
            "q_ensemble_size": 3,
            "n_noisy_copies": 4,
            "guidance_n_hidden": 2,
            "behavior_n_hidden": 2,
            "lr_decay": True,
            "lr_decay_steps": 30,
        },
    },
    "qvpo": {
        "algo": "QVPO",
        "hp": {
            **TINY,
            "learning_starts": 4,
            "diffusion_steps": 3,
            "n_diffusion_samples": 6,
            "n_entropy_samples": 2,
            "n_behavior_samples": 3,
            "n_target_samples": 2,
            "n_action_samples": 5,
            "entropy_decay_steps": 40,
            "time_dim": 8,
        },
    },
}
EPISODE_STEPS = 4  # QVPO's Pendulum episodes are cut to this many steps (several resets per run)
# learn's log_interval per case, in timesteps. QVPO's counted finished episodes before the one
# learn loop; with 4-step episodes, 4 env steps dump at the points 1 episode did.
LOG_EVERY = {"dql": 1, "dql_max_q": 1, "dql_bandit": 1, "dql_bc": 1, "dice": 1, "qvpo": EPISODE_STEPS}

STAGES = ("run", "loaded", "resumed")
# A loaded checkpoint's weights are a copy of the committed file (no arithmetic, so equal on every
# machine): they are compared by hash only, and only the trained stages' values are stored.
TRAINED_STAGES = ("run", "resumed")
KINDS = ("logged", "actions", "weights")
ACTION_KEYS = ("predict_deterministic", "predict_stochastic_seed_123", "predict_single")

# The kernel paths measured: ATen's vectorised kernels (ATEN_CPU_CAPABILITY; 'default' is the plain
# C++ path, which no machine runs unless told to) and MKL's own dispatch (the BLAS under matmul):
# its instruction sets and its conditional-reproducibility mode. {} is the machine's own choice.
KERNEL_PATHS: tuple[dict[str, str], ...] = (
    {},
    {"ATEN_CPU_CAPABILITY": "default"},
    {"ATEN_CPU_CAPABILITY": "avx2"},
    {"ATEN_CPU_CAPABILITY": "avx512"},
    {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    {"MKL_CBWR": "COMPATIBLE"},
    {"MKL_CBWR": "AVX2"},
    {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
)
FLOOR = 1e-2  # a value's deviation is relative to at least 1% of the largest magnitude in its group
MARGIN = 10.0  # tolerance = MARGIN x the largest deviation measured over the kernel paths ...
CEILING = 5e-4  # ... but never above this: a 1e-3 relative change of one weight fails by 2x
MINIMUM = 1e-6  # ... nor below this (a kind that measured exactly 0 on every path)


class Recorder(KVWriter):
    """Keeps every ``train/*`` value of every dump."""

    def __init__(self) -> None:
        self.dumps: list[dict[str, float]] = []

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        self.dumps.append({k: float(v) for k, v in sorted(key_values.items()) if k.startswith("train/")})


def pendulum_spaces() -> tuple[gym.spaces.Box, gym.spaces.Box]:
    env = gym.make("Pendulum-v1")
    return env.observation_space, env.action_space


def offline_data(bandit: bool = False) -> dict[str, np.ndarray]:
    """200 seeded random Pendulum-shaped transitions in 5 episodes of 40 (1-step episodes: a bandit)."""
    rng = np.random.default_rng(7)
    n = 200
    obs = rng.uniform(-1.0, 1.0, (n, 3)).astype(np.float32) * np.array([1.0, 1.0, 8.0], np.float32)
    actions = rng.uniform(-2.0, 2.0, (n, 1)).astype(np.float32)
    rewards = (-(obs[:, 2] ** 2) * 0.1 - actions[:, 0] ** 2 + rng.normal(0, 0.1, n)).astype(np.float32)
    next_obs = np.clip(obs + rng.normal(0, 0.2, obs.shape), -8, 8).astype(np.float32)
    terminals = np.ones(n, bool) if bandit else np.zeros(n, bool)
    timeouts = np.zeros(n, bool) if bandit else (np.arange(n) % 40 == 39)
    return {
        "observations": obs,
        "actions": actions,
        "rewards": rewards,
        "next_observations": next_obs,
        "terminals": terminals,
        "timeouts": timeouts,
    }


def make_buffer(name: str) -> Any:
    from dql_agent import OfflineBuffer

    observation_space, action_space = pendulum_spaces()
    data = offline_data(bandit=name == "dql_bandit")
    return OfflineBuffer(**data, observation_space=observation_space, action_space=action_space)


def make_env() -> gym.Env:
    return gym.make("Pendulum-v1", max_episode_steps=EPISODE_STEPS)


def agent_class(name: str) -> type:
    import dql_agent

    return getattr(dql_agent, CASES[name]["algo"])


def build(name: str, **overrides: Any) -> Any:
    """The case's untrained model with its data (buffer or env) attached; ``overrides`` replace
    hyperparameters (the tests use them to make deliberate changes)."""
    cls, hp = agent_class(name), {**CASES[name]["hp"], **overrides}
    if CASES[name]["algo"] == "QVPO":
        return cls(make_env(), seed=3, device="cpu", **hp)
    return cls(make_buffer(name), seed=3, device="cpu", **hp)


def attach_data(name: str, model: Any) -> None:
    """Give a loaded model its data again (checkpoints carry no dataset or env)."""
    if CASES[name]["algo"] == "QVPO":
        model.set_env(make_env())
    else:
        model.set_buffer(make_buffer(name))


def train(name: str, model: Any, steps: int, reset: bool = True) -> list[dict[str, float]]:
    recorder = Recorder()
    model.set_logger(Logger(folder=None, output_formats=[recorder]))
    model.learn(steps, log_interval=LOG_EVERY[name], reset_num_timesteps=reset)
    return recorder.dumps


def probe_observations() -> np.ndarray:
    rng = np.random.default_rng(11)
    return (rng.uniform(-1.0, 1.0, (4, 3)) * np.array([1.0, 1.0, 8.0])).astype(np.float32)


def weights_of(model: Any) -> dict[str, torch.Tensor]:
    return {
        key: tensor.detach().cpu().contiguous().clone() for key, tensor in sorted(model.policy.state_dict().items())
    }


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def fingerprint(model: Any) -> dict[str, Any]:
    """The weights (tensors) and deterministic and seeded stochastic actions (exact float lists)."""
    obs = probe_observations()
    deterministic, _ = model.predict(obs, deterministic=True)
    model.policy.set_seed(123)
    stochastic, _ = model.predict(obs, deterministic=False)
    single, _ = model.predict(obs[0], deterministic=True)
    actions = (deterministic, stochastic, single)
    return {
        "weights": weights_of(model),
        "actions": {key: np.asarray(a, np.float64).tolist() for key, a in zip(ACTION_KEYS, actions, strict=True)},
    }


def run_case(name: str, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """Train the case from scratch: the model and its ``run`` outputs."""
    model = build(name, **overrides)
    logs = train(name, model, STEPS)
    return model, {"logged": logs, **fingerprint(model)}


def resume_case(name: str, checkpoint: Path) -> dict[str, Any]:
    """Load the stored checkpoint, fingerprint, continue RESUME_STEPS steps, fingerprint."""
    model = agent_class(name).load(checkpoint, device="cpu")
    loaded = fingerprint(model)
    attach_data(name, model)
    logs = train(name, model, RESUME_STEPS, reset=False)
    return {"loaded": loaded, "resumed": {"logged": logs, **fingerprint(model)}}


def case_outputs(name: str) -> dict[str, Any]:
    """All three stages of a case (``run`` trained here, ``loaded``/``resumed`` from the checkpoint)."""
    _, run = run_case(name)
    return {"run": run, **resume_case(name, CHECKPOINTS / name)}


# the machine ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """What decides the last bits of a float here: torch, its kernel path, the BLAS and the CPU.

    MKL picks its code path from the CPU (vendor included), so the CPU's name is part of it."""
    config = torch.__config__.show()
    blas = next((line.strip(" -") for line in config.splitlines() if "Math Kernel Library" in line), "not MKL")
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas,
        "cpu": cpu_model(),
        "mkl_env": " ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("MKL_")),
    }


# deviations -----------------------------------------------------------------------------------
def relative_deviation(found: Any, stored: Any) -> float:
    """The largest ``|found - stored| / max(|stored|, FLOOR * max|stored|)`` over a group; inf where
    the shapes differ or a value is not finite."""
    a, b = np.asarray(found, np.float64), np.asarray(stored, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    same_nonfinite = ~np.isfinite(b) & ((a == b) | (np.isnan(a) & np.isnan(b)))  # a key absent from a dump
    a, b = np.where(same_nonfinite, 0.0, a), np.where(same_nonfinite, 0.0, b)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    scale = FLOOR * float(np.max(np.abs(b)))
    denominator = np.maximum(np.abs(b), scale)
    difference = np.abs(a - b)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(difference == 0, 0.0, difference / denominator)  # 0/0 (both exactly 0) is no deviation
    return float(np.max(ratio))


def logged_series(dumps: list[dict[str, float]]) -> dict[str, list[float]]:
    keys = sorted({key for dump in dumps for key in dump})
    return {key: [dump.get(key, float("nan")) for dump in dumps] for key in keys}


def deviations(found: dict[str, Any], stored: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """Per kind, the largest deviation of one stage's outputs and where it is."""
    out: dict[str, tuple[float, str]] = {}
    groups: dict[str, list[tuple[str, Any, Any]]] = {kind: [] for kind in KINDS}
    if "logged" in stored:
        if len(found["logged"]) != len(stored["logged"]):
            groups["logged"].append(("number of dumps", [len(found["logged"])], [len(stored["logged"])]))
        else:
            mine, theirs = logged_series(found["logged"]), logged_series(stored["logged"])
            for key in sorted(set(mine) | set(theirs)):
                groups["logged"].append((key, mine.get(key, [np.nan]), theirs.get(key, [])))
    for key in ACTION_KEYS:
        groups["actions"].append((key, found["actions"][key], stored["actions"][key]))
    for key in sorted(set(found["weights"]) | set(stored["weights"])) if "weights" in stored else []:
        mine_w, theirs_w = found["weights"].get(key), stored["weights"].get(key)
        if mine_w is None or theirs_w is None:
            groups["weights"].append((key, [np.nan], []))
        else:
            groups["weights"].append((key, mine_w.double().numpy(), theirs_w.double().numpy()))
    for kind, members in groups.items():
        if not members:
            continue
        worst = max(((relative_deviation(a, b), where) for where, a, b in members), key=lambda item: item[0])
        out[kind] = worst
    return out


# stored outputs -------------------------------------------------------------------------------
def load_stored() -> dict[str, Any]:
    """The stored outputs, with each stage's weights as tensors from the safetensors file."""
    stored = json.loads(STORED.read_text())
    tensors = load_file(STORED_WEIGHTS)
    for name, case in stored["cases"].items():
        for stage in TRAINED_STAGES:
            prefix = f"{name}/{stage}/"
            case[stage]["weights"] = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return stored


def to_json(outputs: dict[str, Any]) -> dict[str, Any]:
    """A stage's outputs for regression.json: the weights by hash (the values go to safetensors)."""
    out = {key: value for key, value in outputs.items() if key != "weights"}
    out["weights_sha256"] = {key: sha256(tensor) for key, tensor in outputs["weights"].items()}
    return out


def write_outputs(all_outputs: dict[str, dict[str, Any]], json_path: Path, weights_path: Path) -> None:
    tensors = {
        f"{name}/{stage}/{key}": tensor
        for name, stages in all_outputs.items()
        for stage in TRAINED_STAGES
        for key, tensor in stages[stage]["weights"].items()
    }
    save_file(tensors, str(weights_path))
    cases = {name: {stage: to_json(stages[stage]) for stage in STAGES} for name, stages in all_outputs.items()}
    payload = {"machine": machine(), "cases": cases}
    json_path.write_text(json.dumps(payload, indent=1) + "\n")


def regenerate(checkpoints: bool) -> None:
    """Write the stored outputs (and, with ``checkpoints``, tests/data/checkpoints/<case>/) from
    the code as it is."""
    all_outputs = {}
    for name in CASES:
        model, run = run_case(name)
        if checkpoints:
            model.save(CHECKPOINTS / name, include_optimizer=True)
        all_outputs[name] = {"run": run, **resume_case(name, CHECKPOINTS / name)}
        print(f"{name}: {len(run['weights'])} tensors, {len(run['logged'])} dumps")
    write_outputs(all_outputs, STORED, STORED_WEIGHTS)


# measuring the tolerances ---------------------------------------------------------------------
def measure() -> None:
    """Run every case under every kernel path (a subprocess each), record each stage's and kind's
    deviation from the stored outputs, and write the tolerances derived from them."""
    stored = load_stored()["cases"]
    paths = []
    with tempfile.TemporaryDirectory() as folder:
        for i, env in enumerate(KERNEL_PATHS):
            json_path, weights_path = Path(folder, f"{i}.json"), Path(folder, f"{i}.safetensors")
            command = [sys.executable, "-m", "tests.regression_cases", "--write-to", str(json_path), str(weights_path)]
            subprocess.run(command, env={**os.environ, **env}, check=True, cwd=DATA.parent.parent)
            found = json.loads(json_path.read_text())
            tensors = load_file(weights_path)
            record: dict[str, Any] = {"env": env, "machine": found["machine"], "cases": {}}
            for name, case in found["cases"].items():
                record["cases"][name] = {}
                for stage in STAGES:
                    prefix = f"{name}/{stage}/"
                    if stage in TRAINED_STAGES:
                        case[stage]["weights"] = {
                            k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
                        }
                    worst = deviations(case[stage], stored[name][stage])
                    record["cases"][name][stage] = {kind: value for kind, (value, _) in worst.items()}
            paths.append(record)
            label = " ".join(f"{k}={v}" for k, v in env.items()) or "the machine's own"
            largest = max(v for case in record["cases"].values() for stage in case.values() for v in stage.values())
            print(f"{label}: largest deviation {largest:.3g}")
    tolerances: dict[str, dict[str, dict[str, float]]] = {}
    for name in CASES:
        tolerances[name] = {}
        for stage in STAGES:
            tolerances[name][stage] = {}
            for kind in KINDS:
                if kind not in stored[name][stage]:
                    continue
                spread = max(path["cases"][name][stage].get(kind, 0.0) for path in paths)
                tolerances[name][stage][kind] = min(max(MARGIN * spread, MINIMUM), CEILING)
    payload = {
        "how": (
            "python -m tests.regression_cases --measure: every case under every kernel path; deviation = "
            f"|found - stored| / max(|stored|, {FLOOR} * group max); tolerance = min(max({MARGIN} x the largest "
            f"deviation over the paths, {MINIMUM}), {CEILING})"
        ),
        "measured_on": machine(),
        "paths": paths,
        "tolerances": tolerances,
    }
    TOLERANCES.write_text(json.dumps(payload, indent=1) + "\n")


def write_to(json_path: Path, weights_path: Path) -> None:
    """This process's outputs of every case, written where ``measure`` reads them."""
    write_outputs({name: case_outputs(name) for name in CASES}, json_path, weights_path)


if __name__ == "__main__":
    if os.environ.get("OMP_NUM_THREADS") != "1":
        sys.exit("run with OMP_NUM_THREADS=1, as the tests do")
    torch.set_num_threads(1)
    arguments = sys.argv[1:]
    if arguments[:1] == ["--write-to"]:
        write_to(Path(arguments[1]), Path(arguments[2]))
    elif arguments == ["--measure"]:
        measure()
    else:
        regenerate(checkpoints="--checkpoints" in arguments)
