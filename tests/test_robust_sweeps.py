"""Sweeps that never lie: every spec is checked whole before Ray starts, and a sweep whose trials
failed, or a --resume of another spec's sweep, never exits 0.

Most cases need no Ray: a spec is refused when it is built (``SweepSpec``, ``from_yaml``) or at the
start of ``run``, before ``ray.init`` (each asserts Ray was not started). The last tests share one
local Ray (2 CPUs) and run one real sweep: two trials, one on a dataset that is a symlink to a
system file, through ``dql-agent sweep``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.adversarial import cli, deadline

ENV = "Pendulum-v1"
SWEEP_ERROR = ("sweep", "clear error")
SWEEP_RIGHT = ("sweep", "correct behaviour")
TINY_SPACE = {"hidden_dim": 16, "n_hidden": 2, "diffusion_steps": 3, "batch_size": 32, "n_action_samples": 4}


def sweeps():
    return pytest.importorskip("dql_agent.integrations.ray", reason="needs the ray extra: pip install dql_agent[ray]")


def bad(category_outcome: tuple[str, str], *values: object, **kwargs: object):  # one counted case
    return pytest.param(*values, marks=pytest.mark.bad_input(*category_outcome), **kwargs)


def ray_started() -> bool:
    import ray

    return ray.is_initialized()


def write_spec(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


# every field, checked before Ray starts ----------------------------------------------------------
@pytest.mark.parametrize(
    "line, fragments",
    [
        bad(SWEEP_ERROR, "eval_seed: abc", ["eval_seed", "'abc'"], id="eval-seed-text"),
        bad(SWEEP_ERROR, "eval_seed: -1", ["eval_seed", "-1"], id="eval-seed-negative"),
        bad(SWEEP_ERROR, "device: tpu", ["device", "'tpu'", "'cuda:N'"], id="device-tpu"),
        bad(SWEEP_ERROR, "device: cuda", ["device 'cuda'", "gpu"], id="device-cuda-without-gpu-resources"),
        bad(SWEEP_ERROR, "env: 5", ["env", "5"], id="env-number"),
        bad(SWEEP_ERROR, "metric: eval/reward", ["metric", "'eval/reward'", "eval/mean_reward"], id="metric-unknown"),
        bad(SWEEP_ERROR, "mode: best", ["mode", "'best'"], id="mode-unknown"),
        bad(SWEEP_ERROR, "pack_seeds: 'false'", ["pack_seeds", "'false'", "string"], id="pack-seeds-str-false"),
        bad(SWEEP_ERROR, "pack_seeds: 'no'", ["pack_seeds", "'no'"], id="pack-seeds-string-no"),
        bad(SWEEP_ERROR, "download: 'no'", ["download", "'no'"], id="download-string-no"),
        bad(SWEEP_ERROR, "tensorboard: 'off'", ["tensorboard", "'off'"], id="tensorboard-string"),
        bad(SWEEP_ERROR, "wait_for_resources: 1", ["wait_for_resources", "1"], id="wait-for-resources-int"),
        bad(SWEEP_ERROR, "seeds: 3", ["seeds", "3"], id="seeds-not-a-list"),
        bad(SWEEP_ERROR, "seeds: [0, 0]", ["seeds", "distinct", "[0, 0]"], id="seeds-repeated"),
        bad(SWEEP_ERROR, "seeds: [0, x]", ["seeds", "'x'"], id="seed-text"),
        bad(SWEEP_ERROR, "total_timesteps: 10.5", ["total_timesteps", "10.5"], id="timesteps-float"),
        bad(SWEEP_ERROR, "num_samples: 0", ["num_samples", "0"], id="num-samples-zero"),
        bad(SWEEP_ERROR, "max_failures: true", ["max_failures", "True"], id="max-failures-bool"),
        bad(SWEEP_ERROR, "max_trials: 0", ["max_trials", "0"], id="max-trials-zero"),
        bad(SWEEP_ERROR, "resources: {cpu: -1}", ["resources", "-1"], id="resources-negative"),
        bad(SWEEP_ERROR, "resources: {cpu: .nan}", ["resources", "nan"], id="resources-nan"),
        bad(SWEEP_ERROR, "resources: {cpu: yes}", ["resources", "True"], id="resources-bool"),
        bad(SWEEP_ERROR, "resources: {cpu: 1, CPU: 2}", ["resources", "'cpu'", "'CPU'"], id="resources-cpu-twice"),
        bad(SWEEP_ERROR, "name: ../../elsewhere", ["name", "'../../elsewhere'"], id="name-leaves-storage"),
        bad(SWEEP_ERROR, "storage: [a]", ["storage", "['a']"], id="storage-list"),
        bad(SWEEP_ERROR, "algo: [dql]", ["algo", "['dql']"], id="algo-list"),
        bad(SWEEP_ERROR, "datasets: [data.npz, data.npz]", ["datasets", "once"], id="datasets-repeated"),
        bad(SWEEP_ERROR, "scheduler: {asha: {reduction_factor: 1}}", ["scheduler", "Reduction"], id="asha-assert"),
        bad(SWEEP_ERROR, "scheduler: {asha: [1, 2]}", ["scheduler", "[1, 2]"], id="asha-options-list"),
        bad(SWEEP_ERROR, "scheduler: {asha: {bogus: 1}}", ["scheduler", "bogus"], id="asha-unknown-option"),
    ],
)
def test_a_field_that_cannot_run_is_refused_with_its_name(tmp_path, line, fragments):
    base = "datasets: [data.npz]\n" if not line.startswith("datasets") else ""
    spec = write_spec(tmp_path, base + line + "\n")
    with pytest.raises((ValueError, TypeError)) as caught:
        sweeps().SweepSpec.from_yaml(spec)
    message = str(caught.value)
    assert message.startswith(str(spec)) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert not ray_started()


@pytest.mark.parametrize(
    "param_space, fragments",
    [
        bad(SWEEP_ERROR, {"batch_size": -3}, ["batch_size", ">= 1", "-3"], id="batch-size-negative"),
        bad(SWEEP_ERROR, {"batch_size": [32, -3]}, ["batch_size", "-3", "configuration"], id="grid-point-refused"),
        bad(SWEEP_ERROR, {"act_with_ema": ["yes"]}, ["act_with_ema", "'yes'"], id="bool-hp-string"),
        bad(SWEEP_ERROR, {"time_dim": 5}, ["time_dim", "5"], id="config-range-check"),
        bad(SWEEP_ERROR, {"eta": []}, ["param_space['eta']", "empty grid"], id="empty-grid"),
        bad(SWEEP_ERROR, {"eta": {"grid_search": []}}, ["param_space['eta']", "empty grid"], id="empty-tune-grid"),
        bad(SWEEP_ERROR, {"hidden_dim": {"choice": []}}, ["param_space['hidden_dim']", "no values"], id="empty-choice"),
        bad(SWEEP_ERROR, {"learning_rate": {"loguniform": [-1, 1]}}, ["learning_rate", "loguniform"], id="bad-sampler"),
        bad(SWEEP_ERROR, {"learning_rate": {"loguniform": "x"}}, ["learning_rate", "'x'"], id="sampler-args-text"),
        bad(SWEEP_ERROR, {"hidden_dim": {"randint": [8, 8]}}, ["hidden_dim", "lower bound 8"], id="empty-range"),
        bad(SWEEP_ERROR, {"learning_rate": {"uniform": [-1.0, 1e-3]}}, ["learning_rate", "-1.0"], id="range-end"),
        bad(SWEEP_ERROR, {"preset": 5}, ["preset", "5"], id="preset-number"),
        bad(SWEEP_ERROR, {"preset": "bogus"}, ["preset", "'bogus'"], id="preset-unknown"),
        bad(SWEEP_ERROR, {"etaa": [1.0]}, ["['etaa']", "not dql hyperparameters"], id="unknown-hyperparameter"),
    ],
)
def test_every_configuration_is_built_with_the_algorithms_config_before_ray(param_space, fragments):
    """What each trial would have refused after Ray started (and the sweep then exited 0 with an
    empty table) is refused here, naming the hyperparameter, the configuration and the value."""
    with pytest.raises((ValueError, TypeError)) as caught:
        sweeps().SweepSpec(datasets=["data.npz"], param_space=param_space)
    for fragment in fragments:
        assert fragment in str(caught.value), caught.value
    assert not ray_started()


@pytest.mark.bad_input(*SWEEP_RIGHT)
def test_valid_search_spaces_and_grids_pass_and_are_counted():
    spec = sweeps().SweepSpec(
        datasets=["a.npz", "b-v0"],
        seeds=[0, 1, 2],
        param_space={
            "eta": [0.5, 1.0],
            "learning_rate": {"loguniform": [1e-4, 1e-3]},
            "hidden_dim": {"randint": [16, 33]},
            "tau": {"grid_search": [0.005, 0.01]},
            "preset": ["hopper-medium"],
        },
        num_samples=2,
    )
    assert spec.trial_count() == 2 * 3 * 2 * 2 * 2
    assert spec.size_text() == "48 trial(s) (2 dataset(s) x 3 seed(s) x 4 configuration(s) x num_samples=2)"


# the grid's size ---------------------------------------------------------------------------------
MILLION = {name: [1e-4 * (i + 1) for i in range(10)] for name in ("learning_rate", "critic_learning_rate", "eta")}
MILLION |= {name: [0.9 + 0.001 * i for i in range(10)] for name in ("gamma", "ema_decay")}
MILLION |= {"tau": [0.001 * (i + 1) for i in range(10)]}


@pytest.mark.bad_input(*SWEEP_ERROR)
def test_a_million_point_grid_is_refused_at_once_with_its_size(tmp_path):
    spec = write_spec(tmp_path, yaml.safe_dump({"datasets": ["data.npz"], "param_space": MILLION}))
    with deadline(10), pytest.raises(ValueError) as caught:
        sweeps().SweepSpec.from_yaml(spec)
    assert "1,000,000 trial(s)" in str(caught.value) and "max_trials=10,000" in str(caught.value)
    assert "--force" in str(caught.value)
    assert not ray_started()


@pytest.mark.bad_input(*SWEEP_RIGHT)
def test_a_forced_large_grid_is_checked_value_by_value_and_accepted(tmp_path):
    with deadline(10):
        spec = sweeps().SweepSpec(datasets=["data.npz"], param_space=MILLION, max_trials=None)
    assert spec.trial_count() == 10**6
    bad_point = {**MILLION, "tau": [*MILLION["tau"][:-1], -1.0]}  # one bad value, last of its grid
    with deadline(10), pytest.raises(ValueError, match=r"tau .*-1\.0"):
        sweeps().SweepSpec(datasets=["data.npz"], param_space=bad_point, max_trials=None)


# YAML that is not a spec ---------------------------------------------------------------------------
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    "content, fragments",
    [
        bad(SWEEP_ERROR, "datasets: [a.npz\nseeds: 1\n", ["not valid YAML", "line 2"], id="malformed"),
        bad(SWEEP_ERROR, "datasets:\n\t- a.npz\n", ["not valid YAML", "'\\t'"], id="tab-indent"),
        bad(SWEEP_ERROR, BOMB, ["expands to more than 100,000 nodes"], id="billion-laughs"),
        bad(SWEEP_ERROR, "datasets: " + "[" * 5000 + "]" * 5000, ["nested deeper than 32"], id="deep-nesting"),
        bad(SWEEP_ERROR, "datasets: &a [a.npz, *a]\n", ["*a refers to itself"], id="recursive-alias"),
        bad(SWEEP_ERROR, "datasets: [a]\npack_seeds: false\npack_seeds: true\n", ["'pack_seeds'", "twice"], id="dup"),
        bad(SWEEP_ERROR, "datasets: !!python/object/apply:os.getcwd []\n", ["not valid YAML", "python"], id="py-tag"),
        bad(SWEEP_ERROR, "- a.npz\n", ["YAML mapping", "list"], id="not-a-mapping"),
        bad(SWEEP_ERROR, "datasets: [a.npz]\n1: 2\n", ["names", "[1]"], id="number-key"),
        bad(SWEEP_ERROR, "datasets: [a.npz]\nsteps: 10\n", ["unknown field(s) ['steps']"], id="unknown-field"),
        bad(SWEEP_ERROR, b"\xff\xfedatasets: [a.npz]\n", ["UTF-8", "byte 0"], id="not-utf8"),
        bad(SWEEP_ERROR, "# " + "x" * (1 << 20) + "\n", ["at most 1,048,576 bytes"], id="over-1-mib"),
    ],
)
def test_a_yaml_problem_is_one_line_naming_the_file_and_builds_nothing(tmp_path, content, fragments):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(content if isinstance(content, bytes) else content.encode())
    with deadline(10), pytest.raises(ValueError) as caught:
        sweeps().SweepSpec.from_yaml(spec)
    message = str(caught.value)
    assert message.startswith(str(spec)) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "kind, fragments",
    [
        bad(SWEEP_ERROR, "fifo", ["not a regular file", "FIFO"], id="fifo"),
        bad(SWEEP_ERROR, "device", ["not a regular file", "device"], id="dev-zero"),
        bad(SWEEP_ERROR, "folder", ["not a regular file", "directory"], id="folder"),
        bad(SWEEP_ERROR, "missing", ["no such file"], id="missing"),
    ],
)
def test_a_spec_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, kind, fragments):
    spec = tmp_path / "spec.yaml"
    if kind == "fifo":
        os.mkfifo(spec)  # no writer: opening it for reading would block forever
    elif kind == "device":
        spec.symlink_to("/dev/zero")  # endless: reading it whole would exhaust memory
    elif kind == "folder":
        spec.mkdir()
    with deadline(10), pytest.raises(FileNotFoundError if kind == "missing" else ValueError) as caught:
        sweeps().SweepSpec.from_yaml(spec)
    for fragment in [str(spec), *fragments]:
        assert fragment in str(caught.value), caught.value


YAML_PIECES = st.sampled_from(
    [*"[]{}:,-&*!?|>'\"# \n\tab01.", "&a ", "*a", "<<: ", "!!set ", "!!binary ", "? ", "--- ", "%YAML 1.1\n"]
)


@pytest.mark.bad_input(*SWEEP_ERROR)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(YAML_PIECES, max_size=60).map("".join))
def test_fuzzed_yaml_loads_or_is_refused_in_one_line(tmp_path, text):
    """Random YAML-ish text: the bounded loader returns a document or raises its one-line error,
    never a parser's traceback or a RecursionError."""
    from dql_agent.integrations.yaml_files import SpecFileError, load_yaml_file

    spec = write_spec(tmp_path, text)
    try:
        load_yaml_file(spec)
    except SpecFileError as error:
        assert str(error).startswith(str(spec)) and "\n" not in str(error), str(error)


def test_anchors_that_expand_modestly_still_work(tmp_path):
    text = "datasets: [a.npz]\nparam_space: &space {eta: [0.5, 1.0]}\nresources: {cpu: 1}\n"
    spec = sweeps().SweepSpec.from_yaml(write_spec(tmp_path, text))
    assert spec.param_space == {"eta": [0.5, 1.0]} and spec.trial_count() == 2


# hypothesis over the spec's fields ------------------------------------------------------------------
ODD_VALUES = st.one_of(
    st.sampled_from(["false", "no", "off", "true", "yes", "", "tpu", "abc", "../x", "1e9"]),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(-2, 2), st.text(max_size=2)), max_size=2),
)
FIELDS = [
    "algo",
    "env",
    "seeds",
    "param_space",
    "total_timesteps",
    "eval_every",
    "eval_episodes",
    "eval_seed",
    "resources",
    "storage",
    "name",
    "pack_seeds",
    "num_samples",
    "scheduler",
    "metric",
    "mode",
    "max_failures",
    "device",
    "download",
    "tensorboard",
    "wandb_project",
    "max_trials",
    "wait_for_resources",
]
BOOLS = ("pack_seeds", "download", "tensorboard", "wait_for_resources")


@pytest.mark.bad_input(*SWEEP_ERROR)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FIELDS), value=ODD_VALUES)
def test_fuzzed_fields_are_refused_by_name_or_kept_with_their_type(tmp_path, name, value):
    """Any value of any field, through YAML: either the spec is refused with that field named (no
    other exception), or the field holds a value of its declared kind (a bool is a bool)."""
    SweepSpec = sweeps().SweepSpec
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({"datasets": ["a.npz"], name: value}))
    try:
        spec = SweepSpec.from_yaml(spec_file)
    except ImportError as error:  # tensorboard: true or a wandb_project, without that package
        assert name in ("tensorboard", "wandb_project") and "pip install" in str(error)
        return
    except (ValueError, TypeError) as error:
        message = str(error)
        assert "\n" not in message
        named = name if name != "param_space" or not isinstance(value, dict) else "param_space"
        assert named in message or (name == "scheduler" and "ASHA" in message), message
        return
    kept = getattr(spec, name)
    if name in BOOLS:
        assert isinstance(kept, bool)
    elif name in ("total_timesteps", "eval_every", "eval_episodes", "num_samples", "eval_seed"):
        assert isinstance(kept, int) and not isinstance(kept, bool) and kept >= 0
    elif name in ("algo", "metric", "mode", "device", "storage", "name"):
        assert isinstance(kept, str) and kept
    elif name == "seeds":
        assert kept and all(isinstance(seed, int) and not isinstance(seed, bool) for seed in kept)
    elif name == "resources":
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in kept.values())


# resources no node has: refused before Ray starts (this machine) ------------------------------------
@pytest.fixture
def data_folder(tmp_path: Path, pendulum_arrays: dict) -> Path:
    np.savez(tmp_path / "data.npz", **pendulum_arrays)
    return tmp_path


def _too_many_gpus() -> int:
    import torch

    return torch.cuda.device_count() + 1


@pytest.mark.parametrize(
    "resources, fragments",
    [
        bad(SWEEP_ERROR, {"cpu": 1000}, ["no node of this machine", "CPU"], id="cpu-1000"),
        bad(SWEEP_ERROR, {"gpu": "more"}, ["no node of this machine", "GPU"], id="gpu-without-enough-gpus"),
        bad(SWEEP_ERROR, {"cpu": 1, "TPU": 1}, ["no node of this machine", "TPU"], id="custom-resource"),
    ],
)
def test_resources_no_node_has_are_refused_instead_of_waiting_forever(data_folder, resources, fragments):
    if resources.get("gpu") == "more":
        resources = {"cpu": 1, "gpu": _too_many_gpus()}
    spec = sweeps().SweepSpec(datasets=["data.npz"], env=ENV, resources=resources, root=str(data_folder))
    with deadline(20), pytest.raises(ValueError) as caught:
        spec.run(verbose=0)
    for fragment in [*fragments, "wait_for_resources", "--force"]:
        assert fragment in str(caught.value), caught.value
    assert not ray_started() and not spec.path.exists()


@pytest.mark.bad_input(*SWEEP_RIGHT)
def test_wait_for_resources_lets_a_trial_wait_for_nodes_that_will_join():
    spec = sweeps().SweepSpec(datasets=["data.npz"], resources={"cpu": 1000}, wait_for_resources=True)
    spec.check_resources([{"CPU": 2.0}], "this machine")  # no error: the user says nodes will join
    with pytest.raises(ValueError, match="no node of the cluster"):
        spec.wait_for_resources = False
        spec.check_resources([{"CPU": 2.0}], "the cluster")


@pytest.mark.bad_input(*SWEEP_ERROR)
def test_fields_set_after_the_spec_was_made_are_checked_again_by_run(data_folder):
    spec = sweeps().SweepSpec(datasets=["data.npz"], env=ENV, root=str(data_folder))
    spec.download = "no"  # a YAML habit, in Python
    with pytest.raises(TypeError, match=r"download must be true or false .*got 'no'"):
        spec.run(verbose=0)
    assert not ray_started()


@pytest.mark.bad_input(*SWEEP_ERROR)
def test_a_dataset_that_is_a_fifo_is_refused_before_ray(tmp_path):
    os.mkfifo(tmp_path / "data.npz")
    spec = sweeps().SweepSpec(datasets=["data.npz"], env=ENV, root=str(tmp_path))
    with deadline(20), pytest.raises(ValueError, match=r"dataset file data\.npz .* is not a regular file"):
        spec.run(verbose=0)
    assert not ray_started()


# the CLI, before Ray ---------------------------------------------------------------------------------
@pytest.mark.bad_input("cli", "clear error")
def test_cli_sweep_with_a_bad_spec_is_one_line(tmp_path):
    write_spec(tmp_path, "datasets: [data.npz]\npack_seeds: 'no'\n")
    result = cli("sweep", "spec.yaml", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("dql-agent: error: ") and "pack_seeds" in lines[0] and "'no'" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.bad_input("cli", "clear error")
def test_cli_sweep_with_malformed_yaml_is_one_line(tmp_path):
    write_spec(tmp_path, "datasets: [data.npz\n")
    result = cli("sweep", "spec.yaml", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "not valid YAML" in lines[0], result.stderr


def test_cli_force_lifts_the_grid_limit(tmp_path):
    """With --force the million-point grid passes its size check; the missing dataset, checked
    next (still before Ray), is then what the command reports."""
    write_spec(tmp_path, yaml.safe_dump({"datasets": ["missing.npz"], "param_space": MILLION}))
    refused = cli("sweep", "spec.yaml", cwd=tmp_path, timeout=30)
    assert refused.returncode == 2 and "max_trials" in refused.stderr, refused.stderr
    forced = cli("sweep", "spec.yaml", "--force", cwd=tmp_path, timeout=30)
    assert forced.returncode == 2 and "dataset file missing.npz not found" in forced.stderr, forced.stderr
    assert not ray_started()


# with Ray: one local Ray for the rest of the module -----------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pendulum_arrays: dict) -> Iterator[Path]:
    """A local Ray (2 CPUs) and a folder holding pendulum.npz and system.npz, a symlink to a
    system file (what a trial must not train on)."""
    sweeps()
    import ray

    root = tmp_path_factory.mktemp("robust_sweep")
    np.savez(root / "pendulum.npz", **pendulum_arrays)
    (root / "system.npz").symlink_to("/etc/passwd" if Path("/etc/passwd").is_file() else sys.executable)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root
    ray.shutdown()


TRIAL_SPEC = f"""\
datasets: [pendulum.npz, system.npz]
env: {ENV}
total_timesteps: 2
eval_every: 2
eval_episodes: 1
max_failures: 0
storage: sweeps
name: mixed
param_space: {TINY_SPACE}
""".replace("'", "")


@pytest.mark.bad_input(*SWEEP_ERROR)
def test_a_failed_trial_makes_the_sweep_exit_1_naming_it_and_why(cluster, caplog):
    """One trial trains; the other's dataset is a symlink to a system file. The table shows the
    first, stderr names the second and its error, and the command exits 1 (it exited 0 before)."""
    write_spec(cluster, TRIAL_SPEC)
    with caplog.at_level(logging.INFO, logger="dql_agent"):
        result = cli("sweep", "spec.yaml", "--verbose", "0", cwd=cluster, timeout=240)
    assert "sweep mixed: 2 trial(s) (2 dataset(s) x 1 seed(s) x 1 configuration(s))" in caplog.text + result.stdout
    assert result.returncode == 1, result.stdout + result.stderr
    assert "| pendulum.npz |" in result.stdout  # the trial that worked is in the table
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[0] == "dql-agent: error: 1 of 2 trial(s) failed:", result.stderr
    assert "system.npz" in errors[1] and "trial_" in errors[1] and "Traceback" not in result.stderr, errors
    assert (cluster / "sweeps" / "mixed" / "sweep_spec.json").is_file()


@pytest.mark.bad_input(*SWEEP_ERROR)
def test_resuming_a_sweep_with_another_spec_is_refused_with_the_difference(cluster):
    """Spec B pointed with --resume at the folder where spec A ran: refused before Tune restores
    anything, each difference named (it printed A's table as B's before)."""
    if not (cluster / "sweeps" / "mixed" / "sweep_spec.json").is_file():
        pytest.skip("needs the sweep of the test before")
    other = TRIAL_SPEC.replace("eval_episodes: 1", "eval_episodes: 2").replace("max_failures: 0", "seeds: [1]")
    write_spec(cluster, other, name="other.yaml")
    result = cli("sweep", "other.yaml", "--resume", "--verbose", "0", cwd=cluster, timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    for fragment in ("holds a sweep started from another spec", "eval_episodes: 1 there, 2 in this spec"):
        assert fragment in lines[0], lines[0]
    assert "seeds: [0] there, [1] in this spec" in lines[0] and "max_failures: 0 there, 2" in lines[0]
    assert "| pendulum.npz |" not in result.stdout


@pytest.mark.bad_input(*SWEEP_ERROR)
def test_resources_no_node_of_the_cluster_has_are_refused(cluster):
    """Ray already runs (2 CPUs): the check reads its nodes."""
    spec = sweeps().SweepSpec(
        datasets=["pendulum.npz"], env=ENV, resources={"cpu": 3}, root=str(cluster), storage="sweeps", name="big"
    )
    with deadline(30), pytest.raises(ValueError, match=r"no node of the Ray cluster has them \(CPU 2\)"):
        spec.run(verbose=0)
