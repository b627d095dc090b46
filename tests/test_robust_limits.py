"""Saves that keep only what is the model's, and limits with names (issue 25, part B).

- A save carries over the regular files (and folders of them) a user put beside the weights,
  never a link or a special file (real symlinks, real FIFOs), and removes the temporary files
  and folders of killed saves (real processes killed in the middle of a save), never a live
  save's (a real process paused in the middle of its save, holding its lock).
- ``predict`` on a batch larger than one pass's working memory acts in passes, with the same
  actions; ``export`` refuses a fixed batch past its limit or the memory budget; a camera too
  large for a CNN is refused before anything is allocated; a device this machine lacks is a
  ValueError naming the device and the choices, also through ``load`` and the CLI.
- Variable-length HDF5 rows count against the memory budget; strings and references are refused.
- Hypothesis over ``.npy`` headers inside an ``.npz`` and over ``model.safetensors`` headers:
  a load either succeeds or raises the library's named error, and never allocates what the
  file only declares.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from gymnasium import spaces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dql_agent import CheckpointError, DiffusionQL, OfflineBuffer
from dql_agent import checkpoint as checkpoint_module
from dql_agent import policy as policy_module
from dql_agent.base import _out_of_memory
from dql_agent.encoders import MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_ENV, check_image_size
from dql_agent.limits import MEMORY_BUDGET_ENV, MemoryBudgetError, format_bytes
from dql_agent.readers.arrays import walk_hdf5
from tests.adversarial import (
    assert_one_line_error,
    cli,
    copy_checkpoint,
    d4rl_arrays,
    deadline,
    edit_config,
    npy_of,
    tiny_buffer,
    write_npz,
)
from tests.settings import TINY, tiny

SAVE_OK = pytest.mark.bad_input("save", "correct behaviour")
PREDICT_OK = pytest.mark.bad_input("predict", "correct behaviour")
EXPORT_ERROR = pytest.mark.bad_input("export", "clear error")
EXPORT_OK = pytest.mark.bad_input("export", "correct behaviour")
CAMERA_ERROR = pytest.mark.bad_input("camera", "clear error")
CAMERA_OK = pytest.mark.bad_input("camera", "correct behaviour")
DEVICE_ERROR = pytest.mark.bad_input("device", "clear error")
CLI_ERROR = pytest.mark.bad_input("cli", "clear error")
DATA_ERROR = pytest.mark.bad_input("data", "clear error")
DATA_OK = pytest.mark.bad_input("data", "correct behaviour")
CHECKPOINT_ERROR = pytest.mark.bad_input("checkpoint", "clear error")
LONG_AGO = 3600.0  # seconds: far past STALE_AFTER_S


@pytest.fixture(scope="module")
def model() -> DiffusionQL:
    """A tiny Diffusion-QL on 3-d observations and 1-d actions, trained 2 steps."""
    return DiffusionQL(tiny_buffer(), seed=0, device="cpu", **TINY).learn(2)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    """``model`` saved as a folder, with its optimizer state."""
    path = tmp_path_factory.mktemp("limits") / "model"
    model.save(path, include_optimizer=True)
    return path


def leftovers(path: Path) -> list[str]:
    """The hidden temporary files and folders of saves of ``path``, beside it."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def folder_bytes(folder: Path) -> int:
    return sum(f.lstat().st_size for f in folder.rglob("*"))


def age(path: Path, seconds: float = LONG_AGO) -> None:
    """Make ``path`` look unchanged for ``seconds`` (a killed save's leftover is old)."""
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def save_messages(model: DiffusionQL, path: Path) -> list[str]:
    """Save ``model`` to ``path``; the messages of the warnings the save gave."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.save(path)
    return [str(w.message) for w in record]


# saves: what is carried over -------------------------------------------------------------------
@SAVE_OK
def test_a_folder_link_beside_the_model_is_left_out_of_the_next_save_with_a_warning(model, tmp_path):
    elsewhere = tmp_path / "datasets"
    elsewhere.mkdir()
    (elsewhere / "frames.bin").write_bytes(os.urandom(4 * 2**20))  # 4 MB that are not the model's
    path = tmp_path / "model"
    model.save(path)
    (path / "data").symlink_to(elsewhere, target_is_directory=True)
    link = re.escape(str(path / "data"))
    with pytest.warns(UserWarning, match=rf"saving {re.escape(str(path))}: left out {link} \(a link\)"):
        model.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert folder_bytes(path) < 2**20  # nothing of the 4 MB was copied
    assert (elsewhere / "frames.bin").stat().st_size == 4 * 2**20  # and nothing there was touched
    assert DiffusionQL.load(path, device="cpu").num_timesteps == 2


@SAVE_OK
@pytest.mark.parametrize("target", [".", ".."], ids=["self", "parent"])
def test_a_link_to_the_checkpoint_folder_or_above_is_left_out_and_later_saves_work(model, tmp_path, target):
    path = tmp_path / "model"
    model.save(path)
    (path / "loop").symlink_to(target, target_is_directory=True)
    with pytest.warns(UserWarning, match=rf"left out {re.escape(str(path / 'loop'))} \(a link\)"):
        model.save(path)
    assert not os.path.lexists(path / "loop")
    for _ in range(2):  # every later save goes through, without a word
        assert save_messages(model, path) == []
    assert DiffusionQL.load(path, device="cpu").num_timesteps == 2
    assert leftovers(path) == []


@SAVE_OK
def test_a_file_link_beside_the_model_is_left_out_and_its_target_kept(model, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not the model's")
    path = tmp_path / "model"
    model.save(path)
    (path / "README.md").symlink_to(secret)
    assert save_messages(model, path) == [
        f"saving {path}: left out {path / 'README.md'} (a link): a save keeps the regular files and folders "
        "beside the model, never links or special files"
    ]
    assert not os.path.lexists(path / "README.md")
    assert secret.read_text() == "not the model's"


@SAVE_OK
def test_user_files_and_folders_beside_the_model_are_carried_over(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    files = {
        "README.md": b"# my model\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
        "results/eval.json": b'{"return": -150.0}',
        "results/videos/episode-0.mp4": os.urandom(50_000),
    }
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    (path / "results" / "empty").mkdir()
    inode = (path / "results/videos/episode-0.mp4").stat().st_ino
    assert save_messages(model, path) == []
    for name, data in files.items():
        assert (path / name).read_bytes() == data, name
    assert (path / "results" / "empty").is_dir()
    assert (path / "results/videos/episode-0.mp4").stat().st_ino == inode  # hard-linked, not copied
    assert leftovers(path) == []
    assert DiffusionQL.load(path, device="cpu").num_timesteps == 2


@SAVE_OK
def test_fifos_beside_the_model_are_left_out_without_blocking(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    os.mkfifo(path / "pipe")
    (path / "logs").mkdir()
    (path / "logs" / "train.log").write_text("step 1\n")
    os.mkfifo(path / "logs" / "live")
    with deadline(20):  # opening a FIFO to copy it would wait here for a writer
        (message,) = save_messages(model, path)
    assert f"left out {path / 'pipe'} (a FIFO (named pipe))" in message
    assert f"{path / 'logs' / 'live'} (a FIFO (named pipe))" in message
    assert not os.path.lexists(path / "pipe") and not os.path.lexists(path / "logs" / "live")
    assert (path / "logs" / "train.log").read_text() == "step 1\n"


# saves: temporary files of killed and live saves ------------------------------------------------
def fake_leftover(path: Path, token: str = "k1ll3d00") -> Path:
    """A temporary folder (folder saves) or file (zip saves) named as a save of ``path`` names its
    own, holding what a cut-off save holds."""
    if path.suffix == ".zip":
        leftover = path.parent / f".{path.name}.{token}.tmp"
        leftover.write_bytes(os.urandom(100_000))
    else:
        leftover = path.parent / f".{path.name}.{token}{checkpoint_module.SAVING_SUFFIX}"
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(os.urandom(100_000))
        (leftover / "config.json").write_text("{}")
    return leftover


@SAVE_OK
@pytest.mark.parametrize("suffix", ["", ".zip"], ids=["folder", "zip"])
def test_old_unlocked_temporary_files_of_a_cut_off_save_are_removed_by_the_next_save(model, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    model.save(path)
    stale = [fake_leftover(path, token) for token in ("k1ll3d00", "abc_1234")]
    for leftover in stale:
        age(leftover)
    model.save(path)
    assert leftovers(path) == []
    assert DiffusionQL.load(path, device="cpu").num_timesteps == 2


@SAVE_OK
@pytest.mark.parametrize("suffix", ["", ".zip"], ids=["folder", "zip"])
def test_a_fresh_unlocked_temporary_file_is_kept(model, tmp_path, suffix):
    # Younger than STALE_AFTER_S: it may be a save between creating its folder and locking it.
    path = tmp_path / f"model{suffix}"
    model.save(path)
    fresh = fake_leftover(path)
    model.save(path)
    assert leftovers(path) == [fresh.name]
    age(fresh, checkpoint_module.STALE_AFTER_S + 1)
    model.save(path)
    assert leftovers(path) == []


@SAVE_OK
def test_the_temporary_names_of_other_models_and_user_files_are_left_alone(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    others = [
        fake_leftover(tmp_path / "other"),  # another model's save
        fake_leftover(tmp_path / "model.zip"),  # the zip beside this folder: only its own saves clean it
        tmp_path / f".model.notes{checkpoint_module.SAVING_SUFFIX}",  # not a save's 8-character token
    ]
    others[-1].mkdir()
    for other in others:
        age(other)
    model.save(path)
    assert all(other.exists() for other in others)


@SAVE_OK
def test_a_link_named_as_a_killed_save_is_not_followed(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.bin").write_bytes(b"keep me")
    link = tmp_path / f".model.k1ll3d00{checkpoint_module.SAVING_SUFFIX}"
    link.symlink_to(precious, target_is_directory=True)
    age(link)
    model.save(path)
    assert (precious / "data.bin").read_bytes() == b"keep me"


# A real save, paused where it holds its temporary folder (folder) or file (zip), until told to go
# on; the test may instead kill it there, as a crash or the OOM killer would.
PAUSED_SAVE = textwrap.dedent("""
    import os, sys
    import numpy as np
    from dql_agent import DiffusionQL, OfflineBuffer
    from dql_agent import checkpoint
    path = sys.argv[1]
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(40, 3)).astype(np.float32)
    buffer = OfflineBuffer(obs, rng.uniform(-1, 1, (40, 1)), rng.normal(size=40), obs, np.zeros(40, bool))
    model = DiffusionQL(buffer, seed=1, device="cpu", hidden_dim=32, n_hidden=2, diffusion_steps=3)
    model.num_timesteps = 1234

    def pausing(real):
        def paused(source, target, *args):
            if str(source).endswith((".tmp", ".saving")):
                print("staged", flush=True)
                sys.stdin.readline()
            return real(source, target, *args)
        return paused

    checkpoint._swap_in = pausing(checkpoint._swap_in)  # folder: the staged folder, before it is swapped in
    os.replace = pausing(os.replace)  # zip: the written temporary file, before it is renamed
    model.save(path)
    print("saved", flush=True)
""")


def start_paused_save(path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    saver = subprocess.Popen(
        [sys.executable, "-c", PAUSED_SAVE, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        with deadline(60):
            assert saver.stdout.readline().strip() == "staged"
    except BaseException:
        saver.kill()
        saver.wait()
        raise
    return saver


@SAVE_OK
@pytest.mark.parametrize("suffix", ["", ".zip"], ids=["folder", "zip"])
def test_a_live_save_keeps_its_temporary_files_while_another_save_cleans(model, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    saver = start_paused_save(path)
    try:
        (held,) = leftovers(path)
        age(tmp_path / held)  # as old as a killed save's: only its lock tells it apart
        model.save(path)  # a save beside the live one removes killed saves' leftovers
        assert leftovers(path) == [held]
        assert DiffusionQL.load(path, device="cpu").num_timesteps == 2
        with deadline(60):
            saver.stdin.write("go on\n")
            saver.stdin.flush()
            assert saver.stdout.readline().strip() == "saved"
        assert saver.wait(timeout=60) == 0
    finally:
        saver.kill()
        saver.wait()
    assert DiffusionQL.load(path, device="cpu").num_timesteps == 1234  # the live save's, whole
    assert leftovers(path) == []


@SAVE_OK
@pytest.mark.parametrize("suffix", ["", ".zip"], ids=["folder", "zip"])
def test_the_temporary_files_of_a_killed_save_are_removed_by_the_next_save(model, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    saver = start_paused_save(path)
    saver.send_signal(signal.SIGKILL)
    saver.wait(timeout=60)
    (killed,) = leftovers(path)
    model.save(path)  # still fresh: kept (the killed save could be one about to lock it)
    assert leftovers(path) == [killed]
    age(tmp_path / killed)
    model.save(path)
    assert leftovers(path) == []
    assert DiffusionQL.load(path, device="cpu").num_timesteps == 2


# predict in passes ----------------------------------------------------------------------------
def passes_of(monkeypatch: pytest.MonkeyPatch, model: DiffusionQL, rows: int) -> list[int]:
    """Make one pass of ``predict`` hold ``rows`` rows; returns the rows of each pass as they run."""
    policy = model.policy
    monkeypatch.setattr(policy_module, "PREDICT_PASS_BYTES", rows * policy.acting_bytes_per_row)
    assert policy.rows_per_pass() == rows
    seen: list[int] = []
    select_action = policy.select_action

    def counted(observations, *args, **kwargs):
        seen.append(policy_module.rows_of(observations))
        return select_action(observations, *args, **kwargs)

    monkeypatch.setattr(policy, "select_action", counted)
    return seen


def in_slices(act, batch, rows: int, n: int) -> np.ndarray:
    """``act`` on rows ``[i, i + rows)`` of ``batch`` (an array or a dict of them), each a call of
    its own, concatenated: what passes of ``rows`` must give."""

    def rows_of(start: int):
        if isinstance(batch, dict):
            return {key: value[start : start + rows] for key, value in batch.items()}
        return batch[start : start + rows]

    return np.concatenate([act(rows_of(start)) for start in range(0, n, rows)])


def same_rows(actions: np.ndarray, *expected: np.ndarray) -> None:
    """``actions`` are ``expected``, row for row. To float rounding only: a matrix product's
    kernel, and so its last bit, depends on the rows it is given and on their address in memory
    (two calls on equal rows at other offsets can differ in the last bit), not on the pass."""
    assert len(np.unique(actions)) >= 8  # not all at a bound: a row out of place would show
    for other in expected:
        np.testing.assert_allclose(actions, other, rtol=0, atol=1e-6)


def acting_model(**changes) -> DiffusionQL:
    """An untrained tiny model; one candidate per observation keeps its actions off the bounds."""
    return DiffusionQL(tiny_buffer(), seed=0, device="cpu", **tiny(**{"n_action_samples": 1, **changes}))


@PREDICT_OK
def test_a_flat_batch_in_passes_gives_the_actions_of_one_pass(monkeypatch):
    model = acting_model()
    observations = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    one_pass, _ = model.predict(observations, deterministic=True)
    sliced = in_slices(lambda x: model.predict(x, deterministic=True)[0], observations, 7, 50)
    seen = passes_of(monkeypatch, model, 7)
    actions, _ = model.predict(observations, deterministic=True)
    assert seen == [7] * 7 + [1]
    same_rows(actions, sliced, one_pass)


@PREDICT_OK
def test_a_stochastic_batch_in_passes_draws_each_pass_in_turn(monkeypatch):
    model = acting_model(n_action_samples=8)
    observations = np.random.default_rng(2).normal(size=(50, 3)).astype(np.float32)
    model.policy.set_seed(5)
    sliced = in_slices(lambda x: model.predict(x)[0], observations, 7, 50)
    seen = passes_of(monkeypatch, model, 7)
    model.policy.set_seed(5)
    actions, _ = model.predict(observations)
    assert len(seen) == 8
    assert actions.shape == (50, 1) and np.isfinite(actions).all()
    assert np.all(np.abs(actions) <= 1.0) and len(np.unique(actions)) > 1
    same_rows(actions, sliced)  # the same draws, in the same order


CAMERA_SETTINGS = {**TINY, "batch_size": 16, "cnn_channels": 4, "image_features": 8, "n_action_samples": 1}
CAMERA = spaces.Dict({"image": spaces.Box(0, 255, (20, 20, 3), np.uint8), "state": spaces.Box(-1, 1, (2,), np.float32)})


@PREDICT_OK
def test_a_camera_batch_in_passes_gives_the_actions_of_one_pass(monkeypatch):
    rng = np.random.default_rng(3)
    model = DiffusionQL(
        observation_space=CAMERA, action_space=spaces.Box(-1, 1, (2,), np.float32), seed=0, device="cpu",
        **CAMERA_SETTINGS,
    )  # fmt: skip
    batch = {
        "image": rng.integers(0, 256, (20, 20, 20, 3), dtype=np.uint8),
        "state": rng.uniform(-1, 1, (20, 2)).astype(np.float32),
    }
    one_pass, _ = model.predict(batch, deterministic=True)
    sliced = in_slices(lambda x: model.predict(x, deterministic=True)[0], batch, 3, 20)
    seen = passes_of(monkeypatch, model, 3)
    actions, _ = model.predict(batch, deterministic=True)
    assert seen == [3] * 6 + [2]
    same_rows(actions, sliced, one_pass)


CHUNKS = {"action_horizon": 4, "n_action_steps": 3, "n_obs_steps": 3}


@PREDICT_OK
def test_chunks_from_histories_in_passes_are_the_chunks_of_one_pass(monkeypatch):
    model = acting_model(n_action_samples=8, **CHUNKS)
    histories = np.random.default_rng(4).normal(size=(20, 3, 3)).astype(np.float32)
    observations = histories[:, -1]
    one_pass = model.predict_chunk(histories, deterministic=True)
    first, _ = model.predict(observations, deterministic=True)
    sliced = in_slices(lambda x: model.predict_chunk(x, deterministic=True), histories, 3, 20)
    seen = passes_of(monkeypatch, model, 3)
    chunks = model.predict_chunk(histories, deterministic=True)
    assert seen == [3] * 6 + [2] and chunks.shape == (20, 4, 1)
    same_rows(chunks, sliced, one_pass)
    # predict plans every env's chunk (from its first observation repeated) in passes too
    seen.clear()
    actions, state = model.predict(observations, deterministic=True)
    assert seen == [3] * 6 + [2]
    np.testing.assert_allclose(actions, first, rtol=0, atol=1e-6)
    assert state.pending.shape == (20, 4, 1) and np.isfinite(state.pending).all()


@pytest.mark.parametrize(("observation_dim", "action_dim"), [(3, 1), (17, 6), (39, 8)])
def test_a_default_width_model_acts_on_a_normal_batch_in_one_pass(observation_dim, action_dim):
    model = DiffusionQL(
        observation_space=spaces.Box(-1, 1, (observation_dim,), np.float32),
        action_space=spaces.Box(-1, 1, (action_dim,), np.float32),
        seed=0,
        device="cpu",
    )
    assert model.policy.rows_per_pass() >= 1000
    # and the estimate covers the networks: at least one float per candidate and bias
    biases = sum(p.numel() for n, p in model.policy.named_parameters() if n.endswith("bias"))
    assert model.policy.acting_bytes_per_row >= 4 * model.config.n_action_samples * biases


# export batch ---------------------------------------------------------------------------------
@EXPORT_ERROR
def test_export_with_a_batch_past_the_limit_is_refused_and_writes_nothing(model, tmp_path):
    old = tmp_path / "policy.onnx"
    old.write_bytes(b"an earlier export")
    with pytest.raises(ValueError, match=r"batch must be 'dynamic' or an int from 1 to 1,048,576 .*got 1,000,000,000"):
        model.export(old, batch=10**9)
    assert [p.name for p in tmp_path.iterdir()] == ["policy.onnx"]  # no temporary file either
    assert old.read_bytes() == b"an earlier export"


@EXPORT_ERROR
def test_export_with_a_fixed_batch_over_the_memory_budget_names_the_budget(model, tmp_path, monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "64KiB")
    with pytest.raises(
        MemoryBudgetError,
        match=r"export with batch=10,000 \(its example inputs\) needs 117\.2 KiB \(120,000 bytes\), more than the "
        r"memory budget of 64\.0 KiB \(\$DQL_AGENT_MEMORY_BUDGET; .*\): export with batch='dynamic'",
    ):
        model.export(tmp_path / "policy.onnx", batch=10_000)
    assert list(tmp_path.iterdir()) == []


@EXPORT_OK
def test_a_dynamic_export_under_a_tiny_memory_budget_still_exports(model, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setenv(MEMORY_BUDGET_ENV, "64KiB")
    path = model.export(tmp_path / "policy.onnx")
    observations = np.random.default_rng(5).normal(size=(3, 3)).astype(np.float32)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (actions,) = session.run(["action"], {"observation": observations})
    np.testing.assert_allclose(actions, model.predict(observations, deterministic=True)[0], atol=1e-5)


# camera size ----------------------------------------------------------------------------------
ACTIONS = spaces.Box(-1, 1, (2,), np.float32)
HUGE_CAMERA = re.escape(
    "has 4096x4096 frames (16,777,216 pixels), more than the 1,048,576 a CNN is built for (about 1024x1024)"
)


@CAMERA_ERROR
@pytest.mark.parametrize(
    ("space", "key"),
    [
        (spaces.Box(0, 255, (4096, 4096, 3), np.uint8), "observation"),
        (spaces.Dict({"wrist": spaces.Box(0, 255, (3, 4096, 4096), np.uint8), "state": ACTIONS}), "wrist"),
    ],
    ids=["box-hwc", "dict-chw"],
)
def test_a_4096_camera_is_refused_at_construction_naming_the_key_and_the_variable(space, key):
    with pytest.raises(ValueError, match=rf"camera '{key}' {HUGE_CAMERA}: .*set {MAX_IMAGE_PIXELS_ENV} to raise"):
        DiffusionQL(observation_space=space, action_space=ACTIONS, seed=0, device="cpu")


# Builds the default CNN for a 4096x4096 camera in an address space capped at 256 MiB above what the
# imports took: refused at once; then, with the limit raised, the same build runs out of memory
# under the cap, so the cap would have caught an allocation made before the check.
CAPPED_BUILD = textwrap.dedent("""
    import os, resource
    import numpy as np
    from gymnasium import spaces
    from dql_agent import DiffusionQL
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + 2**28, size + 2**28))
    camera = spaces.Box(0, 255, (4096, 4096, 3), np.uint8)
    for limit in ("", str(4096 * 4096)):
        os.environ["DQL_AGENT_MAX_IMAGE_PIXELS"] = limit
        try:
            DiffusionQL(observation_space=camera, action_space=spaces.Box(-1, 1, (2,), np.float32), device="cpu")
            print("built")
        except (ValueError, RuntimeError, MemoryError) as error:
            out_of_memory = isinstance(error, MemoryError) or "allocate" in str(error)
            print("out of memory" if out_of_memory else f"{type(error).__name__} {str(error)[:40]}")
""")


@CAMERA_ERROR
def test_a_4096_camera_is_refused_before_anything_is_allocated():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", CAPPED_BUILD], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.splitlines() == [
        "ValueError camera 'observation' has 4096x4096 frame",
        "out of memory",
    ], result.stdout + result.stderr


@CAMERA_OK
def test_raising_the_pixel_limit_lets_a_just_larger_camera_through(monkeypatch):
    camera = spaces.Box(0, 255, (1025, 1024, 3), np.uint8)  # one row past the default limit
    with pytest.raises(ValueError, match=r"camera 'observation' has 1025x1024 frames \(1,049,600 pixels\)"):
        DiffusionQL(observation_space=camera, action_space=ACTIONS, seed=0, device="cpu", **CAMERA_SETTINGS)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, "1049600")
    model = DiffusionQL(observation_space=camera, action_space=ACTIONS, seed=0, device="cpu", **CAMERA_SETTINGS)
    frame = np.random.default_rng(6).integers(0, 256, (1025, 1024, 3), dtype=np.uint8)
    action, _ = model.predict(frame, deterministic=True)
    assert action.shape == (2,) and np.isfinite(action).all()


def test_the_pixel_limit_is_inclusive(monkeypatch):
    check_image_size("cam", 1024, 1024)  # the default limit itself
    assert MAX_IMAGE_PIXELS == 1024 * 1024
    with pytest.raises(ValueError, match=r"camera 'cam' has 1x1048577 frames \(1,048,577 pixels\), more than"):
        check_image_size("cam", 1, 1024 * 1024 + 1)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, " 100 ")
    check_image_size("cam", 10, 10)
    with pytest.raises(ValueError, match=r"more than the 100 a CNN is built for \(about 10x10\)"):
        check_image_size("cam", 10, 11)


@CAMERA_ERROR
@pytest.mark.parametrize("value", ["abc", "0", "-5", "1e6", "2.5", "4GiB"])
def test_a_bad_pixel_limit_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, value)
    camera = spaces.Box(0, 255, (20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match=rf"{MAX_IMAGE_PIXELS_ENV} must be a number of pixels >= 1, got '{value}'"):
        DiffusionQL(observation_space=camera, action_space=ACTIONS, seed=0, device="cpu", **CAMERA_SETTINGS)
    # a model without a camera never reads it
    DiffusionQL(observation_space=spaces.Box(-1, 1, (3,), np.float32), action_space=ACTIONS, device="cpu", **TINY)


# devices --------------------------------------------------------------------------------------
CHOICES = re.escape("use 'auto', 'cpu', 'cuda' or 'cuda:N' (or 'mps' on Apple silicon)")
MUST_BE = re.escape("device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (or 'mps' on Apple silicon), got ")


def device_message(device: str) -> str | None:
    """The message (a regex) of the ValueError that ``device`` gives on this machine; None for a
    CUDA device this machine has."""
    if re.fullmatch(r"cuda(:\d+)?", device):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available():
            return rf"device='{device}' but this torch sees no CUDA device; use device='auto' or 'cpu'"
        if index >= torch.cuda.device_count():
            return rf"device='{device}' but this machine has \d+ CUDA device\(s\), cuda:0 to cuda:\d+"
        return None
    return {
        "meta": rf"device='meta' holds shapes without data: a model can neither train nor act there; {CHOICES}",
        "mps": r"device='mps' \(Apple's Metal\) but this torch has no MPS device .*; use device='auto' or 'cpu'",
        "xla": rf"device type 'xla' is not one dql_agent runs on: {CHOICES}",
        "hpu": rf"device type 'hpu' is not one dql_agent runs on: {CHOICES}",
    }.get(device, rf"{MUST_BE}{re.escape(repr(device))}")


DEVICES = [
    "meta",
    "mps",
    "cuda",
    "cuda:3",
    "xla",
    "hpu",
    "tpu",
    "gpu0",
    "",
    "cuda:-1",
    "CPU",
    "cpu:0:1",
]


@DEVICE_ERROR
@pytest.mark.parametrize("device", DEVICES)
def test_a_device_this_machine_lacks_is_a_value_error_naming_it_and_the_choices(device):
    expected = device_message(device)
    if expected is None:  # a GPU machine has it: the model is built there
        assert DiffusionQL(tiny_buffer(), device=device, **TINY).device == torch.device(device)
        return
    with pytest.raises(ValueError, match=expected):
        DiffusionQL(tiny_buffer(), seed=0, device=device, **TINY)


@DEVICE_ERROR
@pytest.mark.parametrize("device", ["meta", "mps", "cuda:3", "xla", "tpu", "gpu0"])
def test_loading_onto_a_device_this_machine_lacks_names_the_device_not_memory(saved, device):
    expected = device_message(device)
    if expected is None:
        assert DiffusionQL.load(saved, device=device).device == torch.device(device)
        return
    with pytest.raises(ValueError, match=expected) as raised:
        DiffusionQL.load(saved, device=device)
    assert "memory" not in str(raised.value)


@CLI_ERROR
@pytest.mark.parametrize("device", ["meta", "mps", "cuda:99", "xla", "gpu0"])
def test_evaluate_on_a_device_this_machine_lacks_is_one_line(saved, tmp_path, device):

    result = cli("evaluate", saved, "--env", "Pendulum-v1", "--episodes", "1", "--device", device, cwd=tmp_path)
    line = assert_one_line_error(result, device)
    assert "memory" not in line, line
    if not torch.cuda.is_available():  # the choices, cpu among them (a GPU machine's says how many it has)
        assert "cpu" in line, line


def test_only_allocator_failures_count_as_out_of_memory():
    with pytest.raises(RuntimeError) as allocation:
        torch.empty(2**62, dtype=torch.uint8)  # a real allocator failure, nothing allocated
    with pytest.raises(RuntimeError) as shapes:
        torch.zeros(2, 3) @ torch.zeros(2, 3)
    assert _out_of_memory(allocation.value) and _out_of_memory(MemoryError())
    assert not _out_of_memory(shapes.value) and not _out_of_memory(RuntimeError("CUDA error: device-side assert"))


# variable-length HDF5 rows, strings and references -------------------------------------------
PIXELS_ID = "test/pixels-v0"


@pytest.fixture
def pixel_dataset(tmp_path, monkeypatch) -> Path:
    """A real two-episode PixelReach Minari dataset (16x16 frames); returns its main_data.hdf5."""
    from dql_agent.pixel_reach import write_pixel_reach_dataset

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    write_pixel_reach_dataset(PIXELS_ID, 2, size=16, n_reference_episodes=1)
    return tmp_path / "minari" / "test" / "pixels-v0" / "data" / "main_data.hdf5"


def frame_bytes(path: Path) -> int:
    with h5py.File(path) as f:
        return sum(f[key]["observations"].nbytes for key in f if key.startswith("episode_"))


@DATA_OK
def test_a_minari_camera_dataset_loads(pixel_dataset):
    buffer = OfflineBuffer.from_minari(PIXELS_ID)
    with h5py.File(pixel_dataset) as f:
        steps = sum(len(f[key]["actions"]) for key in f)
        first = f["episode_0"]["observations"][0]
    assert len(buffer) == steps
    assert buffer.observation_space == spaces.Box(0, 255, (16, 16, 3), np.uint8)
    (frames,) = buffer.observations.values()  # a camera is kept as a tree of uint8 frames
    np.testing.assert_array_equal(frames[0].numpy(), first)


@DATA_ERROR
def test_a_minari_camera_dataset_over_the_memory_budget_names_the_budget(pixel_dataset, monkeypatch):
    budget = frame_bytes(pixel_dataset) - 1
    monkeypatch.setenv(MEMORY_BUDGET_ENV, str(budget))
    shown = re.escape(format_bytes(budget))
    with pytest.raises(
        MemoryBudgetError, match=rf"reading .*main_data\.hdf5 needs .* more than the memory budget of {shown} \(\$DQL"
    ):
        OfflineBuffer.from_minari(PIXELS_ID)


def as_variable_length_rows(path: Path, key: str) -> int:
    """Store ``key`` of each episode as variable-length flat rows, as Minari stores some frames;
    returns the rows' bytes."""
    total = 0
    with h5py.File(path, "a") as f:
        for episode in [name for name in f if name.startswith("episode_")]:
            frames = f[episode][key][()]
            del f[episode][key]
            rows = f[episode].create_dataset(key, (len(frames),), dtype=h5py.vlen_dtype(frames.dtype))
            for i, frame in enumerate(frames):
                rows[i] = frame.ravel()
            total += frames.nbytes
    return total


@DATA_ERROR
def test_variable_length_frames_over_the_memory_budget_are_refused_naming_it(pixel_dataset, monkeypatch):
    frames = as_variable_length_rows(pixel_dataset, "observations")
    monkeypatch.setenv(MEMORY_BUDGET_ENV, str(frames // 2))
    shown = re.escape(format_bytes(frames // 2))
    with pytest.raises(
        MemoryBudgetError,
        match=rf"reading .*main_data\.hdf5: episode_\d+/observations \(variable-length rows\) needs .* more than "
        rf"the memory budget of {shown} \(\$DQL_AGENT_MEMORY_BUDGET",
    ):
        OfflineBuffer.from_minari(PIXELS_ID)


@DATA_OK
def test_variable_length_rows_are_counted_as_the_bytes_they_hold(tmp_path):
    lengths = [0, 1, 7, 300, 2, 4096]
    with h5py.File(tmp_path / "rows.hdf5", "w") as f:
        rows = f.create_dataset("observations", (len(lengths),), dtype=h5py.vlen_dtype(np.float32))
        for i, n in enumerate(lengths):
            rows[i] = np.arange(n, dtype=np.float32)
        f.create_dataset("grid", (2, 3), dtype=h5py.vlen_dtype(np.uint8))  # 2-d, rows written below
        for i in range(2):
            for j in range(3):
                f["grid"][i, j] = np.ones(i + j, np.uint8)
    with h5py.File(tmp_path / "rows.hdf5") as f:
        counted = {path: nbytes for path, _, nbytes in walk_hdf5(f, "rows.hdf5")}
    assert counted == {"observations": 4 * sum(lengths), "grid": sum(i + j for i in range(2) for j in range(3))}


def d4rl_hdf5(path: Path, **replaced) -> Path:
    """A D4RL-style .hdf5 of 20 rows; each of ``replaced`` is a function making that dataset."""
    with h5py.File(path, "w") as f:
        for key, value in d4rl_arrays().items():
            if key in replaced:
                replaced[key](f, key)
            else:
                f[key] = value
    return path


def strings(f: h5py.File, key: str) -> None:
    f[key] = np.array(["up", "down"] * 10, dtype=h5py.string_dtype())


def references(f: h5py.File, key: str) -> None:
    refs = f.create_dataset(key, (20,), dtype=h5py.ref_dtype)
    f["elsewhere"] = np.zeros(3)
    for i in range(20):
        refs[i] = f["elsewhere"].ref


def byte_rows(f: h5py.File, key: str) -> None:
    rows = f.create_dataset(key, (20,), dtype=h5py.vlen_dtype(bytes))
    for i in range(20):
        rows[i] = b"x" * i


@DATA_ERROR
@pytest.mark.parametrize(
    ("key", "make"),
    [("observations", strings), ("terminals", references), ("rewards", byte_rows)],
    ids=["strings", "references", "bytes"],
)
def test_strings_and_references_in_a_d4rl_hdf5_are_refused_naming_the_dataset(tmp_path, key, make):
    path = d4rl_hdf5(tmp_path / "data.hdf5", **{key: make})
    with pytest.raises(ValueError, match=rf"data\.hdf5: {key} holds strings, references or nested data \(dtype "):
        OfflineBuffer.from_d4rl(path)


@DATA_ERROR
def test_variable_length_number_rows_as_a_d4rl_column_are_a_clear_error(tmp_path):
    def rows(f: h5py.File, key: str) -> None:
        data = f.create_dataset(key, (20,), dtype=h5py.vlen_dtype(np.float32))
        for i in range(20):
            data[i] = np.zeros(3, np.float32)

    path = d4rl_hdf5(tmp_path / "data.hdf5", observations=rows)
    with pytest.raises(TypeError, match=r"observations must be numeric \(bool, int or float\), got dtype object"):
        OfflineBuffer.from_d4rl(path)


# hypothesis over .npy headers in an .npz ---------------------------------------------------------
PEAK_BYTES = 16 * 2**20  # what loading a file of a few kB may take at most, whatever it declares
SHAPES = st.one_of(
    st.sampled_from([(20,), (20, 1), (20, 2), (20, 3)]),  # the columns' own shapes
    st.tuples(st.integers(0, 40), st.integers(0, 4)),  # shapes a column could have
    st.tuples(st.integers(0, 10**12)),
    st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)),
    st.tuples(st.integers(0, 10**4), st.integers(0, 10**4), st.integers(0, 10**4)),
    st.just(()),
)


def npy_bytes(shape: tuple[int, ...], dtype: str, fortran: bool, version: tuple[int, int], data: bytes) -> bytes:
    out = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": fortran, "shape": shape}
    write = np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0
    write(out, header)
    return out.getvalue() + data


@DATA_ERROR
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(["observations", "actions", "rewards", "terminals", "next_observations", "infos/qpos"]),
    shape=SHAPES,
    dtype=st.sampled_from(["<f4", "<f8", "|u1", "<i8"]),
    fortran=st.booleans(),
    version=st.sampled_from([(1, 0), (2, 0)]),
    length=st.sampled_from(["exact", "short", "long", "random"]),
    delta=st.integers(1, 64),
    compression=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_npy_headers_load_or_raise_a_value_error_without_allocating(
    tmp_path_factory, target, shape, dtype, fortran, version, length, delta, compression, seed
):
    declared = math.prod(shape) * np.dtype(dtype).itemsize
    size = {"exact": declared, "short": declared - delta, "long": declared + delta}.get(length, delta * 8)
    size = max(0, min(size, 4096))  # a few kB on disk, whatever the header declares
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 4, size, dtype=np.uint8).tobytes()  # small numbers, whatever the dtype
    members = {key: npy_of(value) for key, value in d4rl_arrays().items()}
    members[target] = npy_bytes(shape, dtype, fortran, version, data)
    path = write_npz(tmp_path_factory.mktemp("npz") / "data.npz", members, compression)
    tracemalloc.start()
    try:
        buffer = OfflineBuffer.from_d4rl(path)
    except ValueError as error:  # MemoryBudgetError included; anything else fails the test
        assert target != "infos/qpos", f"a member the loader never uses was read: {error}"
        assert str(path) in str(error) or target in str(error), str(error)
    else:
        assert len(buffer) <= 40
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{peak:,} bytes allocated for a {path.stat().st_size:,}-byte file declaring {shape}"


# hypothesis over model.safetensors headers --------------------------------------------------------
def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


@CHECKPOINT_ERROR
def test_an_unchanged_header_rewritten_by_the_fuzzer_still_loads(saved, tmp_path):
    # The fuzz below rewrites headers as it does here: unchanged, the checkpoint must still load.
    path = copy_checkpoint(saved, tmp_path / "m")
    header, tail = split_safetensors((path / "model.safetensors").read_bytes())
    text = json.dumps(header).encode()
    write_weights(path, "model.safetensors", len(text).to_bytes(8, "little") + text + tail)
    assert DiffusionQL.load(path, device="cpu").num_timesteps == 2


def write_weights(path: Path, name: str, data: bytes) -> None:
    """``data`` as ``name``, with config.json recording its SHA-256: only the content checks can
    refuse it, not the hash."""
    (path / name).write_bytes(data)
    key = "model_sha256" if name == "model.safetensors" else "optimizer_sha256"
    edit_config(path, **{key: hashlib.sha256(data).hexdigest()})


ST_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X9", "", 5, None])
ST_SHAPES = st.lists(st.one_of(st.integers(-2, 8), st.integers(0, 2**62)), max_size=4)
ST_OFFSETS = st.one_of(
    st.lists(st.one_of(st.integers(-1, 4096), st.integers(0, 2**64)), max_size=3),
    st.just(None),
    st.text(max_size=3),
)


@CHECKPOINT_ERROR
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["model.safetensors", "optimizer.safetensors"]),
    pick=st.integers(0, 2**16),
    change=st.sampled_from(["dtype", "shape", "data_offsets", "drop", "add", "length", "tail"]),
    dtype=ST_DTYPES,
    shape=ST_SHAPES,
    offsets=ST_OFFSETS,
    length=st.one_of(st.integers(0, 2**64 - 1), st.integers(-16, 16)),
    tail=st.integers(-64, 64),
    hash_first=st.booleans(),
)
def test_fuzz_safetensors_headers_load_or_raise_a_checkpoint_error(
    saved, tmp_path_factory, name, pick, change, dtype, shape, offsets, length, tail, hash_first
):
    path = copy_checkpoint(saved, tmp_path_factory.mktemp("st") / "m")
    header, data = split_safetensors((path / name).read_bytes())
    keys = sorted(key for key in header if key != "__metadata__")
    key = keys[pick % len(keys)]
    if change == "drop":
        del header[key]
    elif change == "add":
        header["extra.weight"] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    elif change in ("dtype", "shape", "data_offsets"):
        header[key][change] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}[change]
    text = json.dumps(header).encode()
    declared = len(text)
    if change == "length":  # the header's length field: off by a few bytes, or anything
        declared = max(0, len(text) + length) if -16 <= length <= 16 else length
    if change == "tail":  # the tensors' bytes cut short or padded
        data = data[: len(data) + tail] if tail < 0 else data + bytes(tail)
    write_weights(path, name, declared.to_bytes(8, "little") + text + data)
    # Half the examples check the layout and hash as a large file's are, before reading it whole.
    hash_first_bytes = 0 if hash_first else checkpoint_module.HASH_FIRST_BYTES
    saved_limit, checkpoint_module.HASH_FIRST_BYTES = checkpoint_module.HASH_FIRST_BYTES, hash_first_bytes
    try:
        DiffusionQL.load(path, device="cpu")
    except CheckpointError as error:  # anything else fails the test
        assert name in str(error), str(error)
    finally:
        checkpoint_module.HASH_FIRST_BYTES = saved_limit
