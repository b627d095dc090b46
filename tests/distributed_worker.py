"""One rank of a data-parallel run for tests/test_distributed.py, started by the real ``torchrun``
(:func:`torchrun` here starts it; :func:`ranks` reads what each rank wrote):

    torchrun --nproc-per-node 2 -m tests.distributed_worker --out DIR --steps N [...]

Every rank trains the same tiny Diffusion-QL on the same Pendulum data with
``learn(distributed=True)`` and writes its final weights to ``DIR/rank<r>.safetensors`` (to
compare the ranks); rank 0 also saves the resumable checkpoint ``DIR/model``. ``--resume`` loads a
checkpoint on every rank first; ``--die-at K`` kills rank 1 (``os._exit``, no cleanup) at gradient
step K, as a crashed machine would; ``--checkpoint-every M`` has rank 0 save ``DIR/last`` every M
steps; ``--device cuda`` trains on each rank's GPU over NCCL (tests/test_cuda.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from stable_baselines3.common.callbacks import BaseCallback

from tests.settings import tiny

SEED = 3


def pendulum_buffer() -> Any:
    """The test data, rebuilt identically on every rank (the real Pendulum env, a fixed seed)."""
    import gymnasium as gym
    import numpy as np

    from dql_agent import OfflineBuffer
    from dql_agent.demo_data import collect_pendulum_episodes

    episodes = collect_pendulum_episodes(n_good=1, n_noisy=1, seed=0)
    env = gym.make("Pendulum-v1")
    return OfflineBuffer(
        np.concatenate([e["observations"][:-1] for e in episodes]),
        np.concatenate([e["actions"] for e in episodes]),
        np.concatenate([e["rewards"] for e in episodes]),
        np.concatenate([e["observations"][1:] for e in episodes]),
        terminals=np.concatenate([e["terminations"] for e in episodes]),
        timeouts=np.concatenate([e["truncations"] for e in episodes]),
        observation_space=env.observation_space,
        action_space=env.action_space,
    )


def build(buffer: Any, resume: str | None, device: str) -> Any:
    from dql_agent import DiffusionQL

    if resume:
        return DiffusionQL.load(resume, buffer=buffer, device=device)
    return DiffusionQL(buffer, seed=SEED, device=device, **tiny())


class SaveEvery(BaseCallback):
    """Rank 0's periodic resumable checkpoint (the library saves staged: a crash cannot tear it)."""

    def __init__(self, path: Path, every: int):
        super().__init__()
        self.path, self.every = path, every

    def _on_step(self) -> bool:
        if self.model.n_updates % self.every == 0:
            self.model.save(self.path, include_optimizer=True)
        return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resume")
    parser.add_argument("--die-at", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--device", default="cpu", help="'cpu' (gloo), or 'cuda' (NCCL, this rank's GPU)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = build(pendulum_buffer(), args.resume, args.device)
    if args.die_at is not None and rank == 1:
        step = model.train_step

        def dying_step() -> Any:
            if model.n_updates == args.die_at:
                os._exit(3)  # no cleanup, no goodbye to the peers: a crash
            return step()

        model.train_step = dying_step
    callback = SaveEvery(args.out / "last", args.checkpoint_every) if args.checkpoint_every else None
    model.learn(args.steps, callback=callback, reset_num_timesteps=args.resume is None, distributed=True)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.cpu().contiguous() for k, v in model.policy.state_dict().items()}, args.out / f"rank{rank}.safetensors"
    )
    if rank == 0:
        model.save(args.out / "model", include_optimizer=True)


ROOT = Path(__file__).resolve().parents[1]


def torchrun(out: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--tee",
        "3",
    ]
    command += ["--log-dir", str(out / "logs"), "-m", "tests.distributed_worker", "--out", str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def ranks(out: Path, n: int = 2) -> list[dict[str, torch.Tensor]]:
    return [load_file(out / f"rank{r}.safetensors") for r in range(n)]


def check_ran(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


if __name__ == "__main__":
    main()
