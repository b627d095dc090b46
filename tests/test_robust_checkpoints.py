"""Bad checkpoints: every corruption is a clean error naming the file; nothing executes code."""

import json
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import dql_agent
from dql_agent import CheckpointError, DiffusionQL

# What a bad checkpoint may raise: our CheckpointError (a ValueError) or FileNotFoundError.
CLEAN_ERRORS = (CheckpointError, FileNotFoundError)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, request):
    import numpy as np

    from dql_agent import OfflineBuffer
    from tests.settings import TINY

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(50, 3)).astype(np.float32)
    model = DiffusionQL(
        OfflineBuffer(obs, rng.uniform(-1, 1, (50, 1)), rng.normal(size=50), obs, np.zeros(50, bool)),
        seed=0,
        device="cpu",
        **TINY,
    ).learn(2)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    model.save(path, include_optimizer=True)
    return path


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def nested_dict_space(depth):
    space = {"type": "Box", "shape": [3], "dtype": "float32", "low": [0, 0, 0], "high": [1, 1, 1]}
    for _ in range(depth):
        space = {"type": "Dict", "spaces": {"x": space}}
    return space


def edit_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.bad_input("checkpoint", "clear error")
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(extra=1), r"unknown key\(s\) \['extra'\]"),
        (lambda c: c.pop("action_space"), r"missing key\(s\) \['action_space'\]"),
        (lambda c: c.update(format_version=99), "format_version 99, newer than this dql_agent supports"),
        (lambda c: c.update(format_version="1"), "format_version must be an int"),
        (lambda c: c.update(num_timesteps="many"), "num_timesteps must be a int"),
        (lambda c: c["config"].update(hidden_dim=48), "shapes disagree with config.json"),
        (lambda c: c["config"].update(bogus=1), r"unknown DiffusionQLConfig key\(s\) \['bogus'\]"),
        (lambda c: c["config"].update(batch_size=-1), "batch_size must be an int >= 1"),
        (lambda c: c.update(algorithm="QVPO2"), "holds a QVPO2 model"),
        (lambda c: c["observation_space"].update(type="Tuple"), "observation_space.type must be 'Box' or 'Dict'"),
        (lambda c: c["action_space"].pop("low"), "action_space.low must be a list of 1 numbers"),
        (lambda c: c.update(format_version=-1), "format_version must be >= 1, got -1"),
        (lambda c: c.update(num_timesteps=-5), "num_timesteps must be >= 0, got -5"),
        (lambda c: c.update(seed=None), r"seed must be an int, got None"),
        (lambda c: c.update(seed=10**20), r"seed must be an int in \[0, 2\*\*63 - 1\]"),
        (lambda c: c.update(seed="abc"), "seed must be an int, got 'abc'"),
        (lambda c: c.update(model_sha256="x"), "model_sha256 must be a 64-digit hex SHA-256"),
        (
            lambda c: c["action_space"].update(shape=["1"]),
            r"action_space.shape must be a list of ints >= 0, got \['1'\]",
        ),
        (lambda c: c["action_space"].update(shape=[True]), r"action_space.shape must be a list of ints >= 0"),
        (lambda c: c["action_space"].update(dtype="int64"), "action_space must have a float dtype"),
        (lambda c: c["action_space"].update(dtype="object"), "action_space.dtype must be one of"),
        (lambda c: c["action_space"].update(dtype="int8", low=["-inf"]), "action_space.low must be finite and within"),
        (lambda c: c["observation_space"].update(low=[1e300] * 3), "beyond float32's range"),
        (lambda c: c.update(observation_space={"type": "Dict", "spaces": [1, 2]}), "observation_space.spaces must be"),
        (lambda c: c.update(observation_space=nested_dict_space(300)), "nests Dict spaces more than 16 deep"),
        (lambda c: c["config"].update(max_q_backup="False"), r"max_q_backup must be bool \(JSON's false/true"),
        (lambda c: c["config"].update(act_with_ema="no"), "act_with_ema must be bool"),
        (lambda c: c["config"].update(lr_decay="0"), "lr_decay must be bool"),
        (lambda c: c["config"].update(ema_start_step=1.5), "ema_start_step must be int, got 1.5"),
        (lambda c: c["config"].update(ema_start_step=True), "ema_start_step must be int, got True"),
        (lambda c: c["config"].update(learning_rate="abc"), "learning_rate must be float, got 'abc'"),
        (lambda c: c["config"].update(gamma=None), "gamma must be float, got None"),
        (lambda c: c["config"].update(time_dim=16.0), "time_dim must be int, got 16.0"),
        (lambda c: c["config"].update(hidden_dim=40000), "hidden_dim must be <= 16,384"),
        (lambda c: c["config"].update(n_hidden=100000), "n_hidden must be <= 64"),
        (lambda c: c["config"].update(diffusion_steps=1e8), "diffusion_steps must be int"),
        (lambda c: c["config"].update(n_action_samples=10**9), "n_action_samples must be <= 100,000"),
        (lambda c: c["config"].update(hidden_dim=8192, n_hidden=8), "shapes disagree with config.json"),
    ],
)
def test_config_problems_name_the_file_and_field(saved, tmp_path, change, message):
    path = copy_checkpoint(saved, tmp_path / "bad")
    edit_config(path, change)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as error:
        DiffusionQL.load(path)
    assert str(path) in str(error.value)
    assert time.perf_counter() - start < 5  # refused before building (or allocating) what it describes


@pytest.mark.bad_input("checkpoint", "clear error")
def test_weight_file_problems(saved, tmp_path):
    data = (saved / "model.safetensors").read_bytes()
    for name, content in {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}.items():
        path = copy_checkpoint(saved, tmp_path / name)
        (path / "model.safetensors").write_bytes(content)
        with pytest.raises(CheckpointError, match=r"model\.safetensors does not match config.json"):
            DiffusionQL.load(path)
    flipped = bytearray(data)
    flipped[-1] ^= 0x01  # one bit in the tensor data: the header still parses
    path = copy_checkpoint(saved, tmp_path / "bitrot")
    (path / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupted or a save was interrupted"):
        DiffusionQL.load(path)
    path = copy_checkpoint(saved, tmp_path / "missing")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        DiffusionQL.load(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        DiffusionQL.load(tmp_path / "nowhere")


class Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.mark.bad_input("checkpoint", "clear error")
def test_a_pickle_pretending_to_be_a_checkpoint_never_runs(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps(Boom())
    path = copy_checkpoint(saved, tmp_path / "pickled")
    (path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError):
        DiffusionQL.load(path)
    (tmp_path / "model.zip").write_bytes(payload)
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a zip"):
        DiffusionQL.load(tmp_path / "model.zip")
    (path / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    (path / "config.json").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        DiffusionQL.load(path)
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("config.json", (saved / "config.json").read_text())
        archive.writestr("model.safetensors", payload)
    with pytest.raises(CheckpointError):
        DiffusionQL.load(tmp_path / "evil.zip")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.bad_input("checkpoint", "clear error")
def test_optimizer_state_problems(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "opt")
    data = (path / "optimizer.safetensors").read_bytes()
    (path / "optimizer.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors"):
        DiffusionQL.load(path)
    assert DiffusionQL.load(path, include_optimizer=False).num_timesteps == 2  # weights alone still load


@pytest.mark.bad_input("checkpoint", "clear error")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=2048), target=st.sampled_from(["config.json", "model.safetensors", "optimizer.safetensors"])
)
def test_fuzz_random_bytes(saved, tmp_path_factory, data, target):
    path = copy_checkpoint(saved, tmp_path_factory.mktemp("fuzz") / "m")
    (path / target).write_bytes(data)
    try:
        DiffusionQL.load(path)
    except CLEAN_ERRORS:
        pass  # a clean, named error; a successful load is fine too (e.g. valid bytes by chance)


@pytest.mark.bad_input("checkpoint", "clear error")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(["config.json", "model.safetensors"]),
    position=st.floats(0, 1),
    replacement=st.binary(min_size=1, max_size=8),
    truncate=st.booleans(),
)
def test_fuzz_mutated_real_checkpoints(saved, tmp_path_factory, target, position, replacement, truncate):
    path = copy_checkpoint(saved, tmp_path_factory.mktemp("mut") / "m")
    data = bytearray((path / target).read_bytes())
    at = int(position * (len(data) - 1))
    data = data[:at] if truncate else data[:at] + replacement + data[at + len(replacement) :]
    (path / target).write_bytes(bytes(data))
    for load in (DiffusionQL.load, dql_agent.load_from_hub):
        try:
            load(path, device="cpu")
        except CLEAN_ERRORS:
            pass


def rewrite_tensors(path: Path, name: str, change) -> None:
    """Change the tensors of ``name`` and record the new file's SHA-256 in config.json, so only
    the content checks (not the hash) can catch the change."""
    import hashlib

    from safetensors import safe_open

    with safe_open(path / name, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path / name)
    change(tensors)
    save_file(tensors, path / name, metadata=metadata)
    key = "model_sha256" if name == "model.safetensors" else "optimizer_sha256"
    digest = hashlib.sha256((path / name).read_bytes()).hexdigest()
    edit_config(path, lambda c: c.update({key: digest}))


def first_key(tensors, part):
    return next(k for k in tensors if part in k)


@pytest.mark.bad_input("checkpoint", "clear error")
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t[next(iter(t))].fill_(float("nan")), "holds NaN or inf values"),
        (
            lambda t: t.update({k: t[k].to(torch.int8) for k in list(t)[:1]}),
            "has dtype torch.int8, expected torch.float32",
        ),
        (lambda t: t.update({k: t[k].bool() for k in list(t)[:1]}), "has dtype torch.bool"),
        (lambda t: t.update({k: t[k].double().fill_(1e300) for k in list(t)[:1]}), "has dtype torch.float64"),
    ],
)
def test_weights_with_a_matching_hash_are_still_checked(saved, tmp_path, change, message):
    path = copy_checkpoint(saved, tmp_path / "w")
    rewrite_tensors(path, "model.safetensors", change)
    with pytest.raises(CheckpointError, match=message):
        DiffusionQL.load(path)


@pytest.mark.bad_input("checkpoint", "clear error")
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t[first_key(t, "exp_avg_sq")].fill_(float("nan")), r"exp_avg_sq holds NaN or inf"),
        (lambda t: t.update({first_key(t, "exp_avg"): torch.zeros(7, 7)}), r"has shape \(7, 7\), its parameter"),
        (
            lambda t: t.update({"critic_optimizer.999.exp_avg": torch.zeros(1)}),
            "names no parameter of critic_optimizer",
        ),
        (lambda t: t.pop("rng.train"), "rng.train"),
        (lambda t: t.update({"rng.train": torch.zeros(3, dtype=torch.uint8)}), r"rng.train has shape \(3,\)"),
    ],
)
def test_optimizer_state_with_a_matching_hash_is_still_checked(saved, tmp_path, change, message):
    path = copy_checkpoint(saved, tmp_path / "o")
    rewrite_tensors(path, "optimizer.safetensors", change)
    with pytest.raises(CheckpointError, match=message):
        DiffusionQL.load(path)
    assert DiffusionQL.load(path, include_optimizer=False).num_timesteps == 2


@pytest.mark.bad_input("checkpoint", "clear error")
def test_stale_or_foreign_optimizer_files_are_refused(saved, tmp_path):
    from tests.settings import TINY

    stale = copy_checkpoint(saved, tmp_path / "stale")
    edit_config(stale, lambda c: c.update(optimizer_sha256=None))  # a save without optimizer state
    with pytest.raises(CheckpointError, match="is not part of this checkpoint"):
        DiffusionQL.load(stale)
    wider = DiffusionQL(
        observation_space=DiffusionQL.load(saved).observation_space,
        action_space=DiffusionQL.load(saved).action_space,
        seed=0,
        device="cpu",
        **{**TINY, "hidden_dim": 48},
    )
    wider.save(tmp_path / "wider", include_optimizer=True)
    foreign = copy_checkpoint(saved, tmp_path / "foreign")
    (foreign / "optimizer.safetensors").write_bytes((tmp_path / "wider" / "optimizer.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="the optimizer state is corrupted, stale or from another save"):
        DiffusionQL.load(foreign)


def zip_of(saved, path, compress_type=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compress_type) as archive:
        for file in saved.iterdir():
            archive.writestr(file.name, file.read_bytes())
    return path


@pytest.mark.bad_input("checkpoint", "clear error")
@pytest.mark.parametrize("problem", ["method 99", "encrypted", "inflation bomb", "config directory", "deep json"])
def test_hostile_archives_and_files(saved, tmp_path, problem):
    if problem in ("method 99", "encrypted"):
        data = bytearray(zip_of(saved, tmp_path / "m.zip").read_bytes())
        for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
            at = data.find(signature)
            while at >= 0:  # every local and central header
                if problem == "method 99":
                    data[at + method_at : at + method_at + 2] = (99).to_bytes(2, "little")
                else:
                    data[at + flag_at] |= 0x1
                at = data.find(signature, at + 4)
        (tmp_path / "m.zip").write_bytes(bytes(data))
        message = "zip compression method 99" if problem == "method 99" else "is encrypted"
        target = tmp_path / "m.zip"
    elif problem == "inflation bomb":
        target = tmp_path / "bomb.zip"
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("config.json", (saved / "config.json").read_bytes())
            with archive.open("model.safetensors", "w", force_zip64=True) as entry:
                for _ in range(64):
                    entry.write(bytes(2**20))  # 64 MiB of zeros deflate to ~64 kB
        message = "would inflate from"
    elif problem == "config directory":
        target = copy_checkpoint(saved, tmp_path / "d")
        (target / "config.json").unlink()
        (target / "config.json").mkdir()
        message = "config.json is not a regular file"
    else:
        target = copy_checkpoint(saved, tmp_path / "deep")
        (target / "config.json").write_text("[" * 100_000 + "]" * 100_000)
        message = "nested too deeply"
    with pytest.raises(CheckpointError, match=message):
        DiffusionQL.load(target)


@pytest.mark.bad_input("checkpoint", "clear error")
def test_hyperparameters_and_metadata_are_plain_json_from_numpy_and_torch(saved, tmp_path):
    import numpy as np

    model = DiffusionQL.load(saved, learning_rate=np.float32(1e-3), gamma=torch.tensor(0.9))
    assert type(model.config.learning_rate) is float and type(model.config.gamma) is float
    model.metadata = {"n": np.int64(3), "score": np.float32(0.5), "ok": np.bool_(True)}
    model.save(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["metadata"] == {
        "n": 3,
        "score": 0.5,
        "ok": True,
    }
    model.metadata = {"array": object()}
    with pytest.raises(TypeError, match=r"metadata\['array'\] must hold JSON values"):
        model.save(tmp_path / "plain")
    assert DiffusionQL.load(tmp_path / "plain").metadata["n"] == 3  # the failed save changed nothing


@pytest.mark.bad_input("checkpoint", "clear error")
def test_every_config_json_field_loads_or_names_itself_within_time_and_memory():
    # hypothesis over every field of three algorithms' config.json, in a subprocess whose address
    # space is capped at 2.5 GiB: any allocation past it would fail the run (see the script).
    script = Path(__file__).with_name("fuzz_config_json.py")
    result = subprocess.run(
        [sys.executable, str(script), str(2560 * 2**20), "400"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ok: 400 examples" in result.stdout


def test_a_checkpoint_with_a_cuda_generator_state_loads_and_resumes_on_the_cpu(saved, tmp_path):
    # What a save on CUDA writes: a 16-byte Philox state and rng_device "cuda" (found on an H200:
    # loading it on the CPU was refused). The weights and optimizer load; the stream starts afresh.
    import hashlib

    from safetensors import safe_open

    path = copy_checkpoint(saved, tmp_path / "from_cuda")
    with safe_open(path / "optimizer.safetensors", "pt") as f:
        metadata = f.metadata()
    state = json.loads(metadata["state"])
    state["rng_device"] = "cuda"
    tensors = load_file(path / "optimizer.safetensors")
    tensors["rng.train"] = torch.zeros(16, dtype=torch.uint8)
    save_file(tensors, path / "optimizer.safetensors", metadata={**metadata, "state": json.dumps(state)})
    digest = hashlib.sha256((path / "optimizer.safetensors").read_bytes()).hexdigest()
    edit_config(path, lambda c: c.update(optimizer_sha256=digest))
    with pytest.warns(UserWarning, match="training RNG state is a cuda generator's"):
        model = DiffusionQL.load(path, device="cpu")
    assert model.n_updates == 2
    original = DiffusionQL.load(saved, device="cpu")
    for name in ("actor_optimizer", "critic_optimizer"):
        a, b = getattr(model, name).state_dict()["state"], getattr(original, name).state_dict()["state"]
        assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
