"""Bad checkpoints: every corruption is a clean error naming the file; nothing executes code."""

import json
import pickle
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dql_agent
from dql_agent import CheckpointError, DiffusionQL

# What a bad checkpoint may raise: our CheckpointError (a ValueError) or FileNotFoundError.
CLEAN_ERRORS = (CheckpointError, FileNotFoundError)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, request):
    import numpy as np
    from conftest import TINY

    from dql_agent import OfflineBuffer

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


def edit_config(path, change):
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


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
    ],
)
def test_config_problems_name_the_file_and_field(saved, tmp_path, change, message):
    path = copy_checkpoint(saved, tmp_path / "bad")
    edit_config(path, change)
    with pytest.raises(CheckpointError, match=message) as error:
        DiffusionQL.load(path)
    assert str(path) in str(error.value)


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


def test_optimizer_state_problems(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "opt")
    data = (path / "optimizer.safetensors").read_bytes()
    (path / "optimizer.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors"):
        DiffusionQL.load(path)
    assert DiffusionQL.load(path, include_optimizer=False).num_timesteps == 2  # weights alone still load


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
