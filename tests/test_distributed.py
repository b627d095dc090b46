"""Data-parallel training on the CPU: 2 processes started by the real ``torchrun``, gloo backend.

The reference is one process that holds both ranks' models and averages their gradients itself:
rank 0's stream and rank 1's (reseeded at every step from (seed, 1, step)), the combined data of a
step, each gradient the mean of the two. Two threads run the two halves so that each optimizer
step can meet the other's (tests/distributed_worker.py is the torchrun side).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from dql_agent import DiffusionQL, scaling
from tests.distributed_worker import ROOT, SEED, check_ran, pendulum_buffer, ranks, torchrun
from tests.settings import tiny

# Measured: on the same machine the 2-process run and the threaded reference agree bit for bit (gloo
# sums two addends in either order to the same float). The bound leaves room for a machine whose
# gloo reduces in another order, about 1e-7 per step relative in float32.
TOLERANCE = 1e-5


class ThreadedAverage(scaling.StepHooks):
    """The reference's all-reduce: the two threads meet at a barrier and average their gradients."""

    def __init__(self, rank: int, slots: list[Any], barrier: threading.Barrier):
        super().__init__(world_size=2)
        self.rank, self.slots, self.barrier = rank, slots, barrier

    def reduce(self, params: Any, loss_ok: torch.Tensor | None) -> torch.Tensor | None:
        grads = [p.grad for p in params if p.grad is not None]
        self.slots[self.rank] = (torch.cat([g.reshape(-1) for g in grads]), loss_ok)
        self.barrier.wait()
        (flat0, ok0), (flat1, ok1) = self.slots
        total = flat0 + flat1
        self.barrier.wait()  # both have read the slots
        offset = 0
        for grad in grads:
            grad.copy_(total[offset : offset + grad.numel()].view_as(grad)).div_(2)
            offset += grad.numel()
        return None if loss_ok is None else ok0 & ok1


def reference(steps: int, start: Path | None = None) -> dict[str, torch.Tensor]:
    """Both ranks' training in one process: the weights after ``steps`` gradient steps."""
    buffer = pendulum_buffer()
    models = [
        DiffusionQL.load(start, buffer=buffer, device="cpu")
        if start
        else DiffusionQL(buffer, seed=SEED, device="cpu", **tiny())
        for _ in range(2)
    ]
    slots: list[Any] = [None, None]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        model = models[rank]
        model.policy.train()
        model._total_timesteps = model.num_timesteps + steps
        try:
            with scaling.use(ThreadedAverage(rank, slots, barrier)):
                for _ in range(steps):
                    if rank > 0:
                        model.generator.manual_seed(scaling.rank_stream_seed(model.seed, rank, model.n_updates))
                    model.timestep()
        except BaseException as error:  # surfaced in the test's thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return dict(models[0].policy.state_dict())


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def twenty_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp20")
    check_ran(torchrun(out, "--steps", "20"))
    return out


def test_two_ranks_hold_one_model_equal_to_one_process_averaging_both(twenty_steps: Path) -> None:
    rank0, rank1 = ranks(twenty_steps)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the ranks' weights differ"
    expected = reference(20)
    assert max_difference(rank0, expected) <= TOLERANCE
    # the rank streams differ: one process on rank 0's stream alone ends elsewhere
    alone = DiffusionQL(pendulum_buffer(), seed=SEED, device="cpu", **tiny()).learn(20)
    assert max_difference(rank0, dict(alone.policy.state_dict())) > 1e-3
    saved = DiffusionQL.load(twenty_steps / "model")
    assert (saved.num_timesteps, saved.n_updates) == (20, 20)


def test_a_resumed_run_continues_exactly_on_the_same_world_size(twenty_steps: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    check_ran(torchrun(first, "--steps", "12"))
    check_ran(torchrun(second, "--steps", "8", "--resume", str(first / "model")))
    assert max_difference(ranks(second)[0], ranks(twenty_steps)[0]) == 0.0


def test_resume_on_another_world_size(tmp_path: Path) -> None:
    # one process -> two: rank 0 goes on with the saved stream, rank 1 joins with its own
    alone = DiffusionQL(pendulum_buffer(), seed=SEED, device="cpu", **tiny()).learn(10)
    alone.save(tmp_path / "one", include_optimizer=True)
    check_ran(torchrun(tmp_path / "two", "--steps", "10", "--resume", str(tmp_path / "one")))
    assert max_difference(ranks(tmp_path / "two")[0], reference(10, start=tmp_path / "one")) <= TOLERANCE
    # two processes -> one: the single process continues rank 0's stream
    back = DiffusionQL.load(tmp_path / "two" / "model", buffer=pendulum_buffer(), device="cpu")
    before = {k: v.clone() for k, v in back.policy.state_dict().items()}
    back.learn(5, reset_num_timesteps=False)
    assert (back.num_timesteps, back.n_updates) == (25, 25)
    assert max_difference(before, dict(back.policy.state_dict())) > 0


def test_a_dying_rank_ends_the_run_with_a_clear_error_and_leaves_the_checkpoint_whole(tmp_path: Path) -> None:
    result = torchrun(tmp_path, "--steps", "30", "--die-at", "12", "--checkpoint-every", "5")
    assert result.returncode != 0
    logs = "".join(path.read_text() for path in (tmp_path / "logs").rglob("stderr.log"))
    assert "lost its peers in the middle of a training step" in logs
    assert not (tmp_path / "rank0.safetensors").exists()
    last = DiffusionQL.load(tmp_path / "last", buffer=pendulum_buffer(), device="cpu")
    assert last.n_updates == 10  # the save at step 10, whole; the step-15 save never came
    last.learn(2, reset_num_timesteps=False)  # and it resumes


def test_distributed_without_torchrun_says_how_to_start_it() -> None:
    model = DiffusionQL(pendulum_buffer(), seed=0, device="cpu", **tiny())
    env = {
        key: os.environ.pop(key) for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if key in os.environ
    }
    try:
        with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
            model.learn(1, distributed=True)
    finally:
        os.environ.update(env)
    with pytest.raises(TypeError, match="distributed must be a bool"):
        model.learn(1, distributed="yes")  # type: ignore[arg-type]


def test_the_command_line_trains_data_parallel_and_rank_0_alone_saves(tmp_path: Path) -> None:
    import numpy as np

    data = pendulum_buffer()
    arrays = {
        "observations": data.observations.numpy(),
        "actions": data.actions.numpy(),
        "rewards": data.rewards.numpy(),
        "next_observations": data.next_observations.numpy(),
        "terminals": data.terminals.numpy(),
        "timeouts": data.timeouts.numpy(),
    }
    np.savez(tmp_path / "data.npz", **arrays)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "dql_agent.cli",
    ]
    command += ["train", "data.npz", "--env", "Pendulum-v1", "--steps", "6", "-o", "out", "--distributed"]
    command += ["--episodes", "0", "--no-progress", "--seed", "1", "--set", "hidden_dim=16", "--set", "batch_size=32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    check_ran(result)
    assert result.stdout.count("saved to out") == 1
    model = DiffusionQL.load(tmp_path / "out")
    assert (model.num_timesteps, model.config.hidden_dim) == (6, 16)
