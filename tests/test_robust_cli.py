"""The dql-agent command on bad input: one line, exit status 2.

Outputs are checked before any work (each refused case asks for 10^6 gradient steps: training
first would run into the timeout); a module named in a file (a model's or a dataset's env id) is
never imported; any user error prints ``dql-agent: error: ...`` and no traceback.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec

from dql_agent import DiffusionQL, OfflineBuffer
from dql_agent.demo_data import collect_pendulum_episodes
from dql_agent.integrations.minari import write_minari_dataset
from tests.adversarial import assert_one_line_error, cli

ENV_ID = "Pendulum-v1"
TINY = ["--set", "hidden_dim=16", "--set", "n_hidden=2", "--set", "diffusion_steps=3", "--set", "batch_size=32"]
QUIET = ["--episodes", "0", "--no-progress", "--device", "cpu"]
NEVER_FINISHES = ["--steps", "1000000"]  # a refused output must be refused before training starts


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, pendulum_arrays: dict) -> Path:
    """A folder with data.npz and model/ (a tiny DiffusionQL checkpoint)."""
    root = tmp_path_factory.mktemp("cli")
    np.savez(root / "data.npz", **pendulum_arrays)
    env = gym.make(ENV_ID)
    buffer = OfflineBuffer(**pendulum_arrays, observation_space=env.observation_space, action_space=env.action_space)
    model = DiffusionQL(buffer, env=ENV_ID, device="cpu", seed=0, hidden_dim=16, n_hidden=2, diffusion_steps=3)
    model.save(root / "model")
    return root


# item 16: every user error is one line ------------------------------------------------------------
def bad(category_outcome: tuple[str, str], *values: object, **kwargs: object):  # one counted case
    return pytest.param(*values, marks=pytest.mark.bad_input(*category_outcome), **kwargs)


CLI_ERROR = ("cli", "clear error")


@pytest.mark.parametrize(
    "args, fragments",
    [
        bad(CLI_ERROR, ["--set", "observation_space=1"], ["observation_space is not a hyperparameter"], id="set-space"),
        bad(CLI_ERROR, ["--set", "seed=1"], ["set by --seed"], id="set-seed"),
        bad(CLI_ERROR, ["--set", "max_q_backup=False"], ["max_q_backup", "--set max_q_backup=false"], id="set-False"),
        bad(CLI_ERROR, ["--set", "bogus_key=1"], ["bogus_key"], id="set-unknown-key"),
        bad(CLI_ERROR, ["--set", "noequals"], ["--set expects key=value"], id="set-no-equals"),
        bad(CLI_ERROR, ["--env", "Bogus-v9"], ["Bogus"], id="unknown-env"),
        bad(CLI_ERROR, ["--algo", "bogus"], ["--algo", "bogus"], id="unknown-algo"),
        bad(CLI_ERROR, ["--steps", "many"], ["--steps", "many"], id="steps-not-int"),
        bad(CLI_ERROR, ["--steps", "-3"], ["-3"], id="negative-steps"),
        bad(CLI_ERROR, ["--device", "bogus"], ["bogus"], id="unknown-device"),
    ],
)
def test_train_option_errors_are_one_line(workdir, tmp_path, args, fragments):
    result = cli("train", workdir / "data.npz", "--env", ENV_ID, "-o", tmp_path / "out", *QUIET, *args, cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.bad_input(*CLI_ERROR)
def test_tensorboard_log_without_tensorboard_is_one_line(workdir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what importlib sees where it is not installed
    args = ["--set", "tensorboard_log=tb"]
    result = cli("train", workdir / "data.npz", "--env", ENV_ID, "-o", tmp_path / "out", *QUIET, *args, cwd=tmp_path)
    assert_one_line_error(result, "pip install tensorboard")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, fragments",
    [
        bad(CLI_ERROR, b"garbage, not HDF5", ["data.hdf5"], id="garbage-hdf5"),
        bad(CLI_ERROR, b"", ["data.hdf5"], id="empty-hdf5"),
    ],
)
def test_unreadable_dataset_is_one_line(tmp_path, content, fragments):
    (tmp_path / "data.hdf5").write_bytes(content)
    result = cli("train", "data.hdf5", "--env", ENV_ID, "-o", "out", *QUIET, cwd=tmp_path)
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize(
    "dataset, fragments",
    [
        bad(CLI_ERROR, "missing.npz", ["missing.npz"], id="missing-npz"),
        bad(CLI_ERROR, "nosuch/dataset-v0", ["nosuch/dataset-v0"], id="missing-minari"),
    ],
)
def test_missing_dataset_is_one_line(tmp_path, dataset, fragments):
    assert_one_line_error(cli("train", dataset, "-o", "out", *QUIET, cwd=tmp_path), *fragments)


def _broken_models(root: Path) -> dict[str, Path]:
    """Checkpoints that cannot load, by what is wrong with them."""
    models = {}
    models["config-is-a-folder"] = root / "config_dir"
    (models["config-is-a-folder"] / "config.json").mkdir(parents=True)
    (models["config-is-a-folder"] / "model.safetensors").write_bytes(b"")
    models["config-not-json"] = root / "not_json"
    models["config-not-json"].mkdir()
    (models["config-not-json"] / "config.json").write_text("{not json")
    (models["config-not-json"] / "model.safetensors").write_bytes(b"")
    models["zip-not-a-zip"] = root / "fake.zip"
    models["zip-not-a-zip"].write_bytes(b"not a zip")
    return models


@pytest.mark.parametrize(
    "name",
    [bad(CLI_ERROR, name, id=name) for name in ("config-is-a-folder", "config-not-json", "zip-not-a-zip")],
)
def test_broken_model_is_one_line(tmp_path, name):
    model = _broken_models(tmp_path)[name]
    assert_one_line_error(cli("evaluate", model, "--env", ENV_ID, cwd=tmp_path), model.name)


@pytest.mark.parametrize(
    "model, fragments",
    [
        bad(CLI_ERROR, "/nonexistent/model", ["/nonexistent/model"], id="missing-absolute-path"),
        bad(CLI_ERROR, "nowhere/model", ["nowhere/model", "not in the local cache"], id="missing-repo-offline"),
    ],
)
def test_missing_model_is_one_line(tmp_path, model, fragments):
    assert_one_line_error(cli("evaluate", model, "--env", ENV_ID, cwd=tmp_path), *fragments)


@pytest.mark.bad_input(*CLI_ERROR)
def test_debug_env_var_shows_the_traceback(tmp_path):
    result = cli("evaluate", "nowhere/model", cwd=tmp_path, env={"DQL_AGENT_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "nowhere/model" in result.stderr


# item 4: outputs are checked before any work ------------------------------------------------------
def _not_a_checkpoint_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "mine")
    return path


@pytest.mark.parametrize(
    "output, fragments",
    [
        bad(CLI_ERROR, lambda d: d / "data.npz", ["is the input"], id="output-is-the-dataset"),
        bad(CLI_ERROR, lambda d: d / "notes.txt", ["not a checkpoint directory"], id="output-is-a-file"),
        bad(CLI_ERROR, lambda d: d, ["holds files but no config.json"], id="output-is-a-project-folder"),
        bad(CLI_ERROR, lambda d: _not_a_checkpoint_zip(d / "mine.zip"), ["not a checkpoint archive"], id="output-zip"),
        bad(CLI_ERROR, lambda d: d / "notes.txt" / "model", ["is not a folder"], id="output-under-a-file"),
        pytest.param(
            lambda d: Path("/proc/dql_agent_model"),
            ["not writable"],
            id="output-parent-not-writable",
            marks=[
                pytest.mark.bad_input(*CLI_ERROR),
                pytest.mark.skipif(
                    not Path("/proc/self").exists(), reason="needs Linux /proc (root can write anywhere else)"
                ),
            ],
        ),
    ],
)
def test_train_refuses_a_bad_output_before_training(tmp_path, pendulum_arrays, output, fragments):
    np.savez(tmp_path / "data.npz", **pendulum_arrays)
    (tmp_path / "notes.txt").write_text("mine")
    target = output(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = cli("train", "data.npz", "--env", ENV_ID, "-o", target, *NEVER_FINISHES, *QUIET, cwd=tmp_path)
    assert_one_line_error(result, str(target), *fragments)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched


@pytest.mark.parametrize(
    "command, fragments",
    [
        bad(CLI_ERROR, ["record", "model", "--env", ENV_ID, "-o", "folder"], ["must end in .mp4"], id="record-not-mp4"),
        bad(
            CLI_ERROR,
            ["record", "model", "--env", ENV_ID, "-o", "folder.mp4"],
            ["is a folder"],
            id="record-into-folder",
        ),
        bad(CLI_ERROR, ["export", "model", "-o", "policy.txt"], ["must end in .onnx or .pt2"], id="export-suffix"),
        bad(CLI_ERROR, ["export", "model", "-o", "nowhere/policy.pt2"], ["does not exist"], id="export-no-folder"),
        bad(CLI_ERROR, ["export", "model", "-o", "folder.pt2"], ["is a folder"], id="export-into-folder"),
        bad(CLI_ERROR, ["evaluate", "model", "--env", ENV_ID, "--json", "folder"], ["is a folder"], id="evaluate-json"),
    ],
)
def test_model_commands_refuse_a_bad_output_first(workdir, tmp_path, command, fragments):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "folder.pt2").mkdir()
    (tmp_path / "model").symlink_to(workdir / "model")
    assert_one_line_error(cli(*command, cwd=tmp_path), *fragments)


@pytest.mark.bad_input("cli", "correct behaviour")
def test_train_overwrites_an_existing_checkpoint(workdir, tmp_path):
    result = cli(
        "train", workdir / "data.npz", "--env", ENV_ID, "-o", "model", "--steps", "1", *QUIET, *TINY, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    result = cli(
        "train", workdir / "data.npz", "--env", ENV_ID, "-o", "model", "--steps", "2", *QUIET, *TINY, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert DiffusionQL.load(tmp_path / "model").num_timesteps == 2


# item 6: no module named in a file is imported ------------------------------------------------------
@pytest.fixture
def side_effect_module(tmp_path: Path) -> tuple[str, Path, dict[str, str]]:
    """A module that writes a marker file when imported: (its name, the marker, env to find it)."""
    name = f"dql_sidefx_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "modules"
    folder.mkdir()
    marker = tmp_path / "imported.txt"
    (folder / f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n")
    return name, marker, {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def _model_naming(workdir: Path, folder: Path, env_id: str) -> Path:
    config = json.loads((workdir / "model" / "config.json").read_text())
    config["metadata"]["env_id"] = env_id
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((workdir / "model" / "model.safetensors").read_bytes())
    return folder


@pytest.mark.parametrize(
    "command",
    [
        bad(CLI_ERROR, ["evaluate", "model", "--episodes", "1"], id="evaluate"),
        bad(CLI_ERROR, ["record", "model", "-o", "v.mp4", "--max-steps", "2"], id="record"),
        bad(CLI_ERROR, ["push", "model", "alice/repo", "--episodes", "1"], id="push"),
    ],
)
def test_model_env_id_never_imports_a_module(workdir, tmp_path, side_effect_module, command):
    name, marker, env = side_effect_module
    _model_naming(workdir, tmp_path / "model", f"{name}:{ENV_ID}")
    result = cli(*command, cwd=tmp_path, env=env)
    assert_one_line_error(result, f"{name}:{ENV_ID}", f"--env {name}:{ENV_ID}")
    assert not marker.exists()


@pytest.mark.bad_input(*CLI_ERROR)
def test_dataset_env_id_never_imports_a_module(tmp_path, side_effect_module, monkeypatch):
    name, marker, env = side_effect_module
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    pendulum = gym.make(ENV_ID)
    spec = EnvSpec(id=f"{name}:{ENV_ID}", entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv")
    episodes = collect_pendulum_episodes(n_good=1, n_noisy=0, seed=0)
    write_minari_dataset(
        "test/sidefx-v0",
        episodes,
        observation_space=pendulum.observation_space,
        action_space=pendulum.action_space,
        env_id=spec,
    )
    result = cli("train", "test/sidefx-v0", "-o", "out", *NEVER_FINISHES, *QUIET, cwd=tmp_path, env=env)
    assert_one_line_error(result, f"{name}:{ENV_ID}", "--env")
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.bad_input("cli", "correct behaviour")
def test_a_module_the_user_names_is_imported(workdir, tmp_path, side_effect_module):
    """The control: the module is importable, and --env module:Env imports it as gymnasium does."""
    name, marker, env = side_effect_module
    _model_naming(workdir, tmp_path / "model", f"{name}:{ENV_ID}")
    result = cli("evaluate", "model", "--env", f"{name}:{ENV_ID}", "--episodes", "1", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "mean return" in result.stdout and marker.read_text() == "imported"
