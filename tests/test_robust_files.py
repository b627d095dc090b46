"""Files that are not files, sizes that files declare, HDF5 that reads other files.

Every path the library opens is checked to be a regular file before a byte is read, without
blocking (real FIFOs made with ``os.mkfifo``, real devices, real symlinks); what a header declares
(an ``.npy`` shape, an HDF5 extent, a safetensors header, Minari's ``total_episodes``) is checked
against the file's real contents and the memory budget before anything of that size is allocated;
HDF5 external storage, virtual datasets and external links are refused. A case that could block
runs under a deadline (``signal.setitimer``), so a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from dql_agent import CheckpointError, DiffusionQL, OfflineBuffer
from dql_agent.checkpoint import load_checkpoint
from dql_agent.limits import MEMORY_BUDGET_ENV, MemoryBudgetError
from dql_agent.readers.minari import minari_to_transitions
from tests.adversarial import (
    assert_one_line_error,
    cli,
    copy_checkpoint,
    d4rl_arrays,
    deadline,
    edit_config,
    npy,
    npy_of,
    start_saver,
    tiny_buffer,
    write_npz,
    zip_of,
)
from tests.settings import TINY

CHECKPOINT_ERROR = pytest.mark.bad_input("checkpoint", "clear error")
CHECKPOINT_OK = pytest.mark.bad_input("checkpoint", "correct behaviour")
DATA_ERROR = pytest.mark.bad_input("data", "clear error")
DATA_OK = pytest.mark.bad_input("data", "correct behaviour")
SPARSE_SIZE = 8 * 2**30  # a sparse file: 8 GB to a reader, nothing on disk


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A tiny checkpoint folder with optimizer state, 2 timesteps."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    DiffusionQL(tiny_buffer(), seed=0, device="cpu", **TINY).learn(2).save(path, include_optimizer=True)
    return path


# paths that are not regular files -------------------------------------------------------------
@CHECKPOINT_ERROR
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "optimizer.safetensors"])
def test_a_fifo_in_a_checkpoint_folder_is_refused_without_blocking(saved, tmp_path, name):
    path = copy_checkpoint(saved, tmp_path / "m")
    (path / name).unlink()
    os.mkfifo(path / name)
    with deadline(), pytest.raises(CheckpointError, match=rf"{name} is not a regular file: it is a FIFO"):
        DiffusionQL.load(path, device="cpu")


@CHECKPOINT_OK
def test_a_fifo_optimizer_file_is_never_opened_without_include_optimizer(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "m")
    (path / "optimizer.safetensors").unlink()
    os.mkfifo(path / "optimizer.safetensors")
    with deadline():
        assert DiffusionQL.load(path, device="cpu", include_optimizer=False).num_timesteps == 2


@CHECKPOINT_ERROR
def test_a_fifo_named_model_zip_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.zip")
    with deadline(), pytest.raises(CheckpointError, match=r"model\.zip is not a regular file: it is a FIFO"):
        DiffusionQL.load(tmp_path / "model.zip")


ISOLATED = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))  # a regression fails, not the machine
    from dql_agent import DiffusionQL, OfflineBuffer
    load = DiffusionQL.load if sys.argv[1] == "model" else OfflineBuffer.from_d4rl
    try:
        load(sys.argv[2])
    except Exception as error:
        print(type(error).__name__, str(error).splitlines()[0])
""")


def load_isolated(kind: str, path: str | Path) -> str:
    """What loading ``path`` raises, in a subprocess capped at 3 GiB and 60 s: a reader that reads
    a device until memory runs out fails there instead of taking the test machine down."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", ISOLATED, kind, str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=env).stdout.strip()


@CHECKPOINT_ERROR
def test_loading_dev_zero_is_refused_before_reading():
    assert load_isolated("model", "/dev/zero") == (
        "CheckpointError /dev/zero is not a regular file: it is a character device; refused"
    )


@CHECKPOINT_ERROR
def test_a_model_zip_linked_to_dev_zero_is_refused(tmp_path):
    (tmp_path / "model.zip").symlink_to("/dev/zero")
    assert load_isolated("model", tmp_path / "model.zip") == (
        f"CheckpointError {tmp_path}/model.zip is not a regular file: it is a character device; refused"
    )


@CHECKPOINT_ERROR
def test_a_weights_link_out_of_the_checkpoint_folder_is_refused(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "m")
    elsewhere = tmp_path / "elsewhere.safetensors"
    (path / "model.safetensors").rename(elsewhere)
    (path / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a link that leads out of the checkpoint folder"):
        DiffusionQL.load(path, device="cpu")


@CHECKPOINT_OK
def test_a_weights_link_inside_the_checkpoint_folder_loads(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "m")
    (path / "weights").mkdir()
    (path / "model.safetensors").rename(path / "weights" / "v1.safetensors")
    (path / "model.safetensors").symlink_to(Path("weights") / "v1.safetensors")
    assert DiffusionQL.load(path, device="cpu").num_timesteps == 2


@pytest.mark.bad_input("cli", "clear error")
def test_evaluate_on_a_fifo_model_is_one_line_and_returns(saved, tmp_path):

    path = copy_checkpoint(saved, tmp_path / "m")
    (path / "model.safetensors").unlink()
    os.mkfifo(path / "model.safetensors")
    result = cli("evaluate", path, "--env", "Pendulum-v1", "--device", "cpu", cwd=tmp_path, timeout=60)
    assert_one_line_error(result, "model.safetensors is not a regular file")


@DATA_ERROR
@pytest.mark.parametrize("name", ["data.npz", "data.hdf5"])
def test_a_fifo_dataset_is_refused_without_blocking(tmp_path, name):
    os.mkfifo(tmp_path / name)
    with deadline(), pytest.raises(ValueError, match=rf"{name} is not a regular file: it is a FIFO"):
        OfflineBuffer.from_d4rl(tmp_path / name)


@DATA_ERROR
def test_a_dataset_linked_to_a_device_is_refused(tmp_path):
    (tmp_path / "data.npz").symlink_to("/dev/zero")
    assert load_isolated("data", tmp_path / "data.npz") == (
        f"ValueError {tmp_path}/data.npz is not a regular file: it is a character device; refused"
    )


# Minari ----------------------------------------------------------------------------------------
MINARI_OBS = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
MINARI_ACT = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)


@pytest.fixture
def minari_data(tmp_path, monkeypatch) -> Path:
    """A two-episode Minari dataset "test/files-v0" under tmp_path; returns its data folder."""
    from dql_agent.integrations.minari import write_minari_dataset

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    episodes = []
    for length in (3, 4):
        steps = np.arange(length + 1, dtype=np.float32)
        ends = np.zeros(length, bool)
        ends[-1] = True
        episodes.append(
            {
                "observations": np.stack([steps, steps], axis=1),
                "actions": np.zeros((length, 1), np.float32),
                "rewards": np.ones(length),
                "terminations": ends,
                "truncations": np.zeros(length, bool),
            }
        )
    write_minari_dataset("test/files-v0", episodes, observation_space=MINARI_OBS, action_space=MINARI_ACT)
    return tmp_path / "minari" / "test" / "files-v0" / "data"


@DATA_ERROR
@pytest.mark.parametrize("name", ["metadata.json", "main_data.hdf5"])
def test_a_fifo_in_a_minari_dataset_is_refused_without_blocking(minari_data, name):
    (minari_data / name).unlink()
    os.mkfifo(minari_data / name)
    with deadline(), pytest.raises(ValueError, match=rf"{name} is not a regular file: it is a FIFO"):
        OfflineBuffer.from_minari("test/files-v0")


@DATA_ERROR
def test_a_minari_file_linked_out_of_the_dataset_is_refused(minari_data, tmp_path):
    outside = tmp_path / "outside.hdf5"
    (minari_data / "main_data.hdf5").rename(outside)
    (minari_data / "main_data.hdf5").symlink_to(outside)
    with pytest.raises(ValueError, match=r"main_data\.hdf5 is a link that leads out of the dataset"):
        OfflineBuffer.from_minari("test/files-v0")


def edit_metadata(data: Path, **changes: object) -> None:
    metadata = json.loads((data / "metadata.json").read_text())
    metadata.update(changes)
    (data / "metadata.json").write_text(json.dumps(metadata))


@DATA_ERROR
def test_minari_total_episodes_beyond_the_data_is_refused_before_minari_allocates(minari_data):
    edit_metadata(minari_data, total_episodes=10**9)
    with pytest.raises(ValueError, match=r"declares total_episodes 1,000,000,000, but the data .* holds 2 episodes"):
        minari_to_transitions("test/files-v0")


@DATA_ERROR
def test_minari_total_episodes_as_a_float_is_refused(minari_data):
    text = (minari_data / "metadata.json").read_text()
    (minari_data / "metadata.json").write_text(text.replace('"total_episodes": 2', '"total_episodes": 1e9'))
    with pytest.raises(ValueError, match=r"total_episodes must be an int >= 0, got 1000000000\.0"):
        minari_to_transitions("test/files-v0")


@DATA_ERROR
def test_a_minari_space_declaring_a_huge_box_is_refused(minari_data):
    space = {"type": "Box", "dtype": "float32", "shape": [10**10], "low": 0.0, "high": 1.0}
    edit_metadata(minari_data, observation_space=json.dumps(space))
    with pytest.raises(MemoryBudgetError, match=r"observation_space \(the bounds of 10,000,000,000 elements\) needs"):
        minari_to_transitions("test/files-v0")


@DATA_ERROR
def test_a_minari_episode_linking_another_file_is_refused(minari_data, tmp_path):
    with h5py.File(tmp_path / "secret.hdf5", "w") as f:
        f["rewards"] = np.arange(3.0)
    with h5py.File(minari_data / "main_data.hdf5", "a") as f:
        del f["episode_0/rewards"]
        f["episode_0/rewards"] = h5py.ExternalLink(str(tmp_path / "secret.hdf5"), "/rewards")
    with pytest.raises(ValueError, match=r"episode_0/rewards is an external link to .*secret\.hdf5:/rewards; refused"):
        minari_to_transitions("test/files-v0")


# sizes that files declare -----------------------------------------------------------------------


@DATA_ERROR
def test_an_npz_member_declaring_1e10_rows_is_refused_before_allocating(tmp_path):
    members = {key: npy_of(value) for key, value in d4rl_arrays().items()}
    members["observations"] = npy((10**10, 3), "<f4", bytes(240))
    path = write_npz(tmp_path / "data.npz", members)
    assert path.stat().st_size < 6000
    with pytest.raises(ValueError, match=r"'observations\.npy' declares shape \(10000000000, 3\) of float32 "):
        OfflineBuffer.from_d4rl(path)


@DATA_OK
def test_an_unused_npz_member_declaring_1e10_rows_is_never_read(tmp_path):
    members = {key: npy_of(value) for key, value in d4rl_arrays().items()}
    members["infos/qpos"] = npy((10**10, 3), "<f4", bytes(240))
    members["metadata"] = b"not even an array"
    buffer = OfflineBuffer.from_d4rl(write_npz(tmp_path / "data.npz", members))
    assert len(buffer) == 20


@DATA_ERROR
def test_npz_columns_over_the_memory_budget_are_refused_with_the_budget_named(tmp_path, monkeypatch):
    path = tmp_path / "data.npz"
    np.savez(path, **d4rl_arrays(200))
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "4KiB")
    with pytest.raises(MemoryBudgetError, match=r"more than the memory budget of 4\.0 KiB \(\$DQL_AGENT_MEMORY_BUDGET"):
        OfflineBuffer.from_d4rl(path)


def write_hdf5(path: Path, **declared: dict) -> Path:
    """The D4RL columns, with the datasets named in ``declared`` made by ``create_dataset(**kwargs)``."""
    with h5py.File(path, "w") as f:
        for key, value in d4rl_arrays().items():
            if key in declared:
                f.create_dataset(key, **declared[key])
            else:
                f[key] = value
    return path


@DATA_ERROR
def test_an_hdf5_chunked_dataset_declaring_1e10_rows_is_refused(tmp_path):
    path = write_hdf5(tmp_path / "data.hdf5", observations={"shape": (10**10, 3), "chunks": (1024, 3), "dtype": "f4"})
    assert path.stat().st_size < 10_000
    with pytest.raises(ValueError, match=r"observations declares shape \(10000000000, 3\) .* holds only 0 of its"):
        OfflineBuffer.from_d4rl(path)


@DATA_ERROR
def test_an_hdf5_contiguous_dataset_declaring_more_than_it_stores_is_refused(tmp_path):
    path = write_hdf5(tmp_path / "data.hdf5", rewards={"shape": (10**9,), "dtype": "f8"})
    with pytest.raises(ValueError, match=r"rewards declares shape \(1000000000,\) .* the file holds 0 bytes of it"):
        OfflineBuffer.from_d4rl(path)


@DATA_OK
def test_an_unused_hdf5_dataset_declaring_1e10_rows_is_never_read(tmp_path):
    path = write_hdf5(tmp_path / "data.hdf5")
    with h5py.File(path, "a") as f:
        f.create_dataset("infos/qpos", shape=(10**10, 3), chunks=(1024, 3), dtype="f4")
    assert len(OfflineBuffer.from_d4rl(path)) == 20


@DATA_ERROR
def test_hdf5_columns_over_the_memory_budget_are_refused_with_the_budget_named(tmp_path, monkeypatch):
    path = write_hdf5(tmp_path / "data.hdf5")  # 740 bytes of columns
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "512")
    with pytest.raises(MemoryBudgetError, match=r"data\.hdf5 needs 740 B .* more than the memory budget of 512 B"):
        OfflineBuffer.from_d4rl(path)


# HDF5 that reads another file ------------------------------------------------------------------
@pytest.fixture
def secret(tmp_path) -> Path:
    """A file the dataset must never read: 240 bytes that would load as 20 x 3 float32."""
    path = tmp_path / "secret.bin"
    path.write_bytes(b"SECRET!!" * 30)
    return path


@DATA_ERROR
def test_hdf5_external_storage_is_refused(tmp_path, secret):
    path = write_hdf5(
        tmp_path / "data.hdf5", observations={"shape": (20, 3), "dtype": "f4", "external": [(str(secret), 0, 240)]}
    )
    with pytest.raises(ValueError, match=rf"observations stores its data in another file \({secret}\)"):
        OfflineBuffer.from_d4rl(path)


@DATA_ERROR
def test_an_hdf5_virtual_dataset_is_refused(tmp_path):
    with h5py.File(tmp_path / "source.hdf5", "w") as f:
        f["obs"] = np.ones((20, 3), np.float32)
    layout = h5py.VirtualLayout(shape=(20, 3), dtype="f4")
    layout[:] = h5py.VirtualSource(str(tmp_path / "source.hdf5"), "obs", shape=(20, 3))
    path = write_hdf5(tmp_path / "data.hdf5", observations={"shape": (20, 3), "dtype": "f4"})
    with h5py.File(path, "a") as f:
        del f["observations"]
        f.create_virtual_dataset("observations", layout)
    with pytest.raises(ValueError, match=r"observations is a virtual dataset \(it maps data from other files\)"):
        OfflineBuffer.from_d4rl(path)


@DATA_ERROR
def test_an_hdf5_external_link_is_refused(tmp_path):
    with h5py.File(tmp_path / "other.hdf5", "w") as f:
        f["obs"] = np.ones((20, 3), np.float32)
    path = write_hdf5(tmp_path / "data.hdf5")
    with h5py.File(path, "a") as f:
        del f["observations"]
        f["observations"] = h5py.ExternalLink(str(tmp_path / "other.hdf5"), "/obs")
    with pytest.raises(ValueError, match=r"observations is an external link to .*other\.hdf5:/obs; refused"):
        OfflineBuffer.from_d4rl(path)


@DATA_ERROR
def test_an_hdf5_group_linked_into_itself_is_refused_not_walked_forever(tmp_path):
    path = tmp_path / "data.hdf5"
    with h5py.File(path, "w") as f:
        for key, value in d4rl_arrays().items():
            if key != "observations":
                f[key] = value
        f["observations/position"] = np.zeros((20, 3), np.float32)
        f["observations/again"] = f["observations"]  # a hard link: the group contains itself
    with deadline(), pytest.raises(ValueError, match=r"observations/again links back to a group already read"):
        OfflineBuffer.from_d4rl(path)


# weight files that declare more than they are ------------------------------------------------------
@CHECKPOINT_ERROR
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_a_sparse_8gb_weight_file_is_refused_without_reading_it(saved, tmp_path, name):
    path = copy_checkpoint(saved, tmp_path / "m")
    os.truncate(path / name, SPARSE_SIZE)  # the real header, then 8 GB of holes
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"{name} is not a valid safetensors file .* the file holds"):
        DiffusionQL.load(path, device="cpu")
    assert time.perf_counter() - start < 3


@CHECKPOINT_ERROR
def test_a_sparse_8gb_file_of_zeros_is_refused_without_reading_it(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"")
    os.truncate(path / "model.safetensors", SPARSE_SIZE)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        DiffusionQL.load(path, device="cpu")
    assert time.perf_counter() - start < 3


@CHECKPOINT_OK
def test_a_sparse_optimizer_file_is_never_read_without_include_optimizer(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "m")
    os.truncate(path / "optimizer.safetensors", SPARSE_SIZE)
    assert DiffusionQL.load(path, device="cpu", include_optimizer=False).num_timesteps == 2


LOAD_AND_MEASURE = textwrap.dedent("""
    import resource, sys
    from dql_agent.checkpoint import CheckpointError, load_checkpoint
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_checkpoint(sys.argv[1])
    except CheckpointError as error:
        print(str(error).splitlines()[0])
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


@CHECKPOINT_ERROR
def test_a_large_weight_file_that_is_not_the_saved_one_is_refused_before_it_is_read_into_memory(saved, tmp_path):
    # A well-formed header declaring 512 MiB of tensor data, then holes: its layout is valid, so only
    # the hash config.json records can tell; it is compared as the file streams from disk.
    path = copy_checkpoint(saved, tmp_path / "m")
    n = 512 * 2**20
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
    os.truncate(path / "model.safetensors", 8 + len(header) + n)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MEASURE, str(path)], capture_output=True, text=True, timeout=60, env=env
    )
    message, grown_mib = result.stdout.strip().splitlines()
    assert "model.safetensors does not match config.json" in message, result.stdout + result.stderr
    assert int(grown_mib) < 128, f"peak memory grew by {grown_mib} MiB while refusing a 512 MiB file"


@CHECKPOINT_ERROR
def test_a_zipped_weight_file_over_the_memory_budget_is_refused_with_the_budget_named(saved, tmp_path, monkeypatch):
    archive = zip_of(saved, tmp_path / "model.zip")
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "1KiB")
    with pytest.raises(CheckpointError, match=r"reading .*model\.safetensors needs .* memory budget of 1\.0 KiB"):
        DiffusionQL.load(archive, device="cpu")


@CHECKPOINT_ERROR
def test_optimizer_state_nested_100k_levels_deep_is_a_clear_error(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "m")
    tensors = load_file(path / "optimizer.safetensors")
    save_file(
        tensors, path / "optimizer.safetensors", metadata={"format": "pt", "state": "[" * 100_000 + "]" * 100_000}
    )
    edit_config(path, optimizer_sha256=hashlib.sha256((path / "optimizer.safetensors").read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: its training state is nested too deeply"):
        DiffusionQL.load(path, device="cpu")
    assert DiffusionQL.load(path, device="cpu", include_optimizer=False).num_timesteps == 2


@CHECKPOINT_OK
def test_a_reader_beside_a_saving_process_always_gets_a_whole_checkpoint(tmp_path):

    path = tmp_path / "model"
    saver = start_saver(path, seed=1)
    try:
        assert saver.stdout.readline().strip() == "ready"
        assert saver.stdout.readline().strip() == "saved"
        loads, until = 0, time.monotonic() + 4
        while time.monotonic() < until:
            checkpoint = load_checkpoint(path)  # the old folder is removed as the new one is swapped in
            assert checkpoint.optimizer_tensors is not None and checkpoint.config["num_timesteps"] >= 1000
            loads += 1
    finally:
        saver.kill()
        saver.wait()
    assert loads >= 50
