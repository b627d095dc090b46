"""A save never destroys the last good checkpoint: failed writes, kills and concurrent writers.

Each case first saves a good checkpoint (2 timesteps, with optimizer state), trains one more
step, then saves again while something goes wrong. Whatever happened, the path must load, and
load either the old checkpoint or the new one, whole (config.json hashes both weight files).
"""

import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from dql_agent import DiffusionQL, OfflineBuffer
from dql_agent import checkpoint as checkpoint_module
from tests.adversarial import start_saver
from tests.settings import TINY


def tiny_buffer(seed: int = 0) -> OfflineBuffer:
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(40, 3)).astype(np.float32)
    return OfflineBuffer(obs, rng.uniform(-1, 1, (40, 1)), rng.normal(size=40), obs, np.zeros(40, bool))


def weights(model: DiffusionQL) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.policy.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(path) -> list[str]:
    return [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


class FailAt:
    """Replaces ``module.name`` so that its ``k``-th call raises ENOSPC (earlier calls run)."""

    def __init__(self, monkeypatch, module, name: str, k: int):
        self.real, self.k, self.calls = getattr(module, name), k, 0
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.k:
            raise OSError(28, "No space left on device (injected)")
        return self.real(*args, **kwargs)


# What a save calls that can fail, per kind of checkpoint: the data writes, the fsyncs, the atomic
# exchange or rename, and (directory) the hard links of files kept beside the weights, which fall
# back to a copy instead of failing.
FAULTS = [
    ("", os, "fsync"),
    ("", checkpoint_module, "_write_synced"),
    ("", checkpoint_module, "_exchange"),
    ("", os, "link"),
    (".zip", os, "fsync"),
    (".zip", os, "fdopen"),
    (".zip", os, "replace"),
]


@pytest.mark.bad_input("save", "correct behaviour")
@pytest.mark.parametrize(("suffix", "module", "name"), FAULTS, ids=[f"{name}{suffix}" for suffix, _, name in FAULTS])
def test_a_failure_at_every_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, suffix, module, name):
    path = tmp_path / f"model{suffix}"
    model = DiffusionQL(tiny_buffer(), seed=0, device="cpu", **TINY).learn(2)
    model.save(path, include_optimizer=True)
    if not suffix:
        (path / "README.md").write_text("a model card saved beside the weights")
    old = weights(model)
    model.learn(1, reset_num_timesteps=False)
    failures = 0
    for k in range(1, 40):  # fail the k-th call, for every k until the save gets through
        with monkeypatch.context() as patch:
            FailAt(patch, module, name, k)
            try:
                model.save(path, include_optimizer=True)
                break
            except OSError:
                failures += 1
        loaded = DiffusionQL.load(path, device="cpu")  # the old checkpoint, whole
        assert loaded.num_timesteps == 2 and loaded.n_updates == 2 and same_weights(weights(loaded), old)
        assert leftovers(path) == []
    assert failures == (0 if name == "link" else k - 1) and (name == "link" or failures >= 1)
    loaded = DiffusionQL.load(path, device="cpu")
    assert loaded.num_timesteps == 3 and same_weights(weights(loaded), weights(model))
    if not suffix:
        assert (path / "README.md").read_text() == "a model card saved beside the weights"


@pytest.mark.bad_input("save", "correct behaviour")
@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_sigkill_at_random_points_of_a_save_leaves_a_loadable_checkpoint(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    rng = random.Random(0)
    for seed in range(1, 3):  # two processes, each killed at a random point of its save loop
        saver = start_saver(path, seed)
        assert saver.stdout.readline().strip() == "ready"
        assert saver.stdout.readline().strip() == "saved"
        time.sleep(rng.uniform(0.05, 0.6))
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        loaded = DiffusionQL.load(path, device="cpu")  # hashes of both weight files checked
        assert loaded.num_timesteps // 1000 == seed and loaded.n_updates == 1


@pytest.mark.bad_input("save", "correct behaviour")
def test_two_processes_saving_to_one_path_leave_one_whole_checkpoint(tmp_path):
    path = tmp_path / "model"
    savers = [start_saver(path, seed, count=25) for seed in (1, 2)]
    loads = 0
    while any(s.poll() is None for s in savers):
        try:
            loaded = DiffusionQL.load(path, device="cpu")  # a reader during the saves sees whole ones
        except FileNotFoundError:
            continue  # before the first save
        assert loaded.num_timesteps // 1000 in (1, 2)
        loads += 1
    assert [s.wait() for s in savers] == [0, 0]
    loaded = DiffusionQL.load(path, device="cpu")
    assert loaded.num_timesteps in (1024, 2024)
    assert leftovers(path) == []
    assert loads >= 1


@pytest.mark.bad_input("save", "clear error")
def test_saving_over_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')")
    model = DiffusionQL(tiny_buffer(), seed=0, device="cpu", **TINY)
    with pytest.raises(FileExistsError, match=r"refusing to save into .*project: it holds files but no config\.json"):
        model.save(project)
    assert (project / "train.py").read_text() == "print('mine')"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="a file of that name exists"):
        model.save(tmp_path / "file")


def test_a_save_without_atomic_exchange_is_recovered_between_its_renames(tmp_path, monkeypatch):
    # Where renameat2 is missing (macOS, some filesystems) the swap is two renames; a crash between
    # them leaves the old copy moved aside, and load finds it.
    path = tmp_path / "model"
    model = DiffusionQL(tiny_buffer(), seed=0, device="cpu", **TINY).learn(2)
    model.save(path, include_optimizer=True)
    old = weights(model)
    model.learn(1, reset_num_timesteps=False)
    monkeypatch.setattr(checkpoint_module, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename_then_crash(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new directory's move into place
            raise KeyboardInterrupt("killed between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_then_crash)
    with pytest.raises(KeyboardInterrupt):
        model.save(path, include_optimizer=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not path.exists()
    with pytest.warns(UserWarning, match="loading the copy a cut-off save moved aside"):
        loaded = DiffusionQL.load(path, device="cpu")
    assert loaded.num_timesteps == 2 and same_weights(weights(loaded), old)
    model.save(path, include_optimizer=True)  # without the fault: the two-rename path works
    assert DiffusionQL.load(path, device="cpu").num_timesteps == 3
