"""A user's first week (issue 26): own data, interrupted runs, repeatable evaluations, QVPO's
expectations, an honest export, a card whose install line works, one voice offline, output a user
can follow. Real envs, real Minari datasets on disk, real subprocesses for signals, the real
huggingface_hub client against the local fake Hub; nothing reaches the network."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

import dql_agent.qvpo as qvpo_module
from dql_agent import QVPO, DiffusionQL, OfflineBuffer
from dql_agent.cli import main
from dql_agent.evaluation import evaluate
from dql_agent.hub import INSTALL_ENV, install_command, make_model_card, write_hub_folder
from dql_agent.hub_access import HubUnreachableError
from dql_agent.readers.minari import MinariDatasetNotFoundError, load_minari_dataset
from dql_agent.sb3 import TimestepProgressBar
from tests.hub_server import aim_client, unreachable_endpoint
from tests.settings import TINY, tiny

ROOT = Path(__file__).resolve().parents[1]
ENV_ID = "Pendulum-v1"
CLI = [sys.executable, "-m", "dql_agent.cli"]
TRAIN = ["--env", ENV_ID, "--seed", "0", "--device", "cpu", "--threads", "1", "--episodes", "0", "--log-interval", "0"]
TRAIN_SET = [f"--set={key}={value}" for key, value in TINY.items()]
TRAIN_STEPS = 400
NOISE = re.compile(r"error|warning|traceback|exception", re.I)


def load_example(name: str):  # noqa: ANN201 - a module
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def npz(tmp_path, pendulum_arrays) -> str:
    path = tmp_path / "pendulum.npz"
    np.savez(path, **pendulum_arrays)
    return str(path)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


# 1. your own data --------------------------------------------------------------------------------
def test_own_data_example_writes_minari_and_npz_that_read_back_alike(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "unused"))  # the example sets its own
    out = load_example("own_data").main(
        ["--out", str(tmp_path / "own"), "--episodes", "1", "--max-steps", "30", "--steps", "3", "--device", "cpu"]
    )
    minari, npz = out["minari"], out["npz"]
    assert len(out["episodes"]) == 3 and len(minari) == len(npz) == 90  # scripted, SB3, one teleop episode
    for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        np.testing.assert_array_equal(np.asarray(getattr(minari, key)), np.asarray(getattr(npz, key)), err_msg=key)
    assert minari.metadata["env_id"] == ENV_ID and np.asarray(minari.timeouts).sum() == 3
    assert (tmp_path / "own" / "minari" / "me" / "pendulum" / "own-v0" / "data").is_dir()


def test_own_data_needs_no_jax():
    """The README's path to a dataset: minari[create] (jax) is not installed and not needed."""
    assert importlib.util.find_spec("jax") is None
    from dql_agent.integrations.minari import episodes_to_transitions, record_episode, write_minari_dataset

    assert callable(record_episode) and callable(write_minari_dataset) and callable(episodes_to_transitions)


# 2. interrupted runs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, pendulum_arrays) -> tuple[str, Path]:
    """The dataset file and the weights of an uninterrupted `dql-agent train` of TRAIN_STEPS steps."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    np.savez(folder / "data.npz", **pendulum_arrays)
    done = subprocess.run(
        [*CLI, "train", str(folder / "data.npz"), "-o", str(folder / "ref"), "--steps", str(TRAIN_STEPS)]
        + TRAIN
        + TRAIN_SET,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return str(folder / "data.npz"), folder / "ref"


def interrupt_after_progress(command: list[str], sig: signal.Signals) -> subprocess.CompletedProcess:
    """Run ``command``, send ``sig`` once it reports its first progress line, wait for it."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("timestep "):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, "".join(lines) + out, err)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_cli_train_saves_on_a_signal_and_resumes_bit_identical(sig, status, uninterrupted, tmp_path):
    data, reference = uninterrupted
    out = tmp_path / "run"
    first = interrupt_after_progress(
        [*CLI, "train", data, "-o", str(out), "--steps", str(TRAIN_STEPS), *TRAIN, *TRAIN_SET], sig
    )
    assert first.returncode == status, first.stderr
    assert f"{sig.name}: training stopped after timestep" in first.stdout
    assert f"dql-agent train --resume {shlex.quote(str(out))}" in first.stdout
    assert not [line for line in (first.stdout + first.stderr).splitlines() if NOISE.search(line)], first
    saved = json.loads((out / "config.json").read_text())
    assert 0 < saved["num_timesteps"] < TRAIN_STEPS and (out / "optimizer.safetensors").is_file()

    resumed = subprocess.run(
        [*CLI, "train", "--resume", str(out), "--device", "cpu", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at timestep {saved['num_timesteps']:,} of {TRAIN_STEPS}" in resumed.stdout
    assert json.loads((out / "config.json").read_text())["num_timesteps"] == TRAIN_STEPS
    assert not (out / "optimizer.safetensors").exists()  # as the uninterrupted run saved it
    assert same_weights(out, reference)


BAR_RATE = re.compile(rb"\d it/s")  # the live bar once training runs (before, it shows "? it/s")


def run_in_terminal(command: list[str], sig: signal.Signals, timeout: float = 120) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as its stdin/stdout/stderr (so rich draws its live
    bar), send ``sig`` once the bar shows a rate, return its exit status and everything it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out, sent, deadline = b"", False, time.time() + timeout
    while time.time() < deadline:
        if not sent and BAR_RATE.search(out):
            proc.send_signal(sig)
            sent = True
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            out += data
        elif proc.poll() is not None:
            break
    if proc.poll() is None:
        proc.kill()
    os.close(master)
    return proc.wait(), out.decode(errors="replace")


SHUTDOWN_ERRORS = ("sys.meta_path is None", "Exception ignored", "ImportError")


def test_ctrl_c_on_the_qvpo_cli_in_a_terminal_saves_and_exits_cleanly(tmp_path):
    """The issue's ``ImportError: sys.meta_path is None``: the live bar of an interrupted learn was
    never closed, and rich imported a module when tqdm's __del__ closed it at interpreter shutdown."""
    command = [*CLI, "train", "--algo", "qvpo", "-o", str(tmp_path / "q"), "--steps", "5000", *TRAIN]
    command += [f"--set={key}={value}" for key, value in tiny("QVPO").items()]
    status, out = run_in_terminal(command, signal.SIGINT)
    assert status == 130, out
    assert "SIGINT: training stopped after timestep" in out and "dql-agent train --resume" in out, out
    assert not [text for text in (*SHUTDOWN_ERRORS, "Traceback") if text in out], out
    assert (tmp_path / "q" / "optimizer.safetensors").is_file()


def test_ctrl_c_on_learn_with_a_bar_in_a_terminal_leaves_no_shutdown_error(tmp_path):
    script = (
        "from dql_agent import QVPO\n"
        f"QVPO('{ENV_ID}', seed=0, device='cpu', **{tiny('QVPO')!r}).learn(5000, progress_bar=True)\n"
    )
    status, out = run_in_terminal([sys.executable, "-c", script], signal.SIGINT)
    assert status != 0 and "KeyboardInterrupt: training interrupted after timestep" in out, out
    assert not [text for text in SHUTDOWN_ERRORS if text in out], out


def test_load_with_buffer_resumes_in_one_line_bit_identical(pendulum_buffer, tmp_path):
    model = DiffusionQL(pendulum_buffer, seed=3, device="cpu", **TINY).learn(12)
    model.save(tmp_path / "ckpt", include_optimizer=True)
    resumed = DiffusionQL.load(tmp_path / "ckpt", buffer=pendulum_buffer, device="cpu")
    resumed.learn(8, reset_num_timesteps=False)
    straight = DiffusionQL(pendulum_buffer, seed=3, device="cpu", **TINY).learn(20)
    assert resumed.num_timesteps == 20
    for key, value in straight.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[key], value), key


def test_load_buffer_is_checked(pendulum_buffer, tmp_path):
    DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY).save(tmp_path / "m")
    with pytest.raises(TypeError, match="buffer must be an OfflineBuffer or None, got dict"):
        DiffusionQL.load(tmp_path / "m", buffer={"observations": []})
    QVPO(ENV_ID, seed=0, device="cpu", **tiny("QVPO")).save(tmp_path / "q")
    with pytest.raises(ValueError, match="QVPO collects its own experience: pass env="):
        QVPO.load(tmp_path / "q", buffer=pendulum_buffer)


def test_resume_refuses_what_would_change_the_run(npz, tmp_path, capsys):
    out = tmp_path / "m"
    main(["train", npz, "-o", str(out), "--steps", "6", "--no-progress", *TRAIN, *TRAIN_SET])
    for extra, expected in (
        (["--set", "eta=2"], "--set cannot change it"),
        ([], "holds no optimizer state"),
    ):
        with pytest.raises(SystemExit) as info:
            main(["train", "--resume", str(out), *extra])
        assert info.value.code == 2 and expected in capsys.readouterr().err
    # A finished run keeps no record of its data (no local paths in a model that may be pushed):
    # continuing it takes the DATASET and the new total.
    main(["train", npz, "-o", str(out), "--steps", "6", "--no-progress", "--include-optimizer", *TRAIN, *TRAIN_SET])
    assert "dql_agent_train" not in json.loads((out / "config.json").read_text())["metadata"]
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(out)])
    assert "records no unfinished `dql-agent train` run" in capsys.readouterr().err
    main(["train", npz, "--resume", str(out), "--steps", "9", "--no-progress", "--device", "cpu"])
    assert DiffusionQL.load(out).num_timesteps == 9


# 3. repeatable evaluations --------------------------------------------------------------------------
def test_evaluate_with_a_seed_repeats_exactly_and_records_the_seeds(tiny_model):
    env = Monitor(gym.make(ENV_ID))
    first, second = (evaluate(tiny_model, env, n_eval_episodes=3, seed=11) for _ in range(2))
    assert (first["mean_reward"], first["std_reward"]) == (second["mean_reward"], second["std_reward"])
    assert first["seed"] == 11 and first["episode_seeds"] == [11, 12, 13] and first["env_seeds"] is None
    other = evaluate(tiny_model, env, n_eval_episodes=3, seed=12)
    assert other["mean_reward"] != first["mean_reward"]

    vec = DummyVecEnv([lambda: Monitor(gym.make(ENV_ID)) for _ in range(2)])
    a, b = (evaluate(tiny_model, vec, n_eval_episodes=4, seed=5) for _ in range(2))
    assert a["mean_reward"] == b["mean_reward"] and a["env_seeds"] == [5, 6] and a["episode_seeds"] is None

    generator = tiny_model.policy.generator
    before = generator.get_state()
    s1, s2 = (evaluate(tiny_model, env, n_eval_episodes=2, deterministic=False, seed=3) for _ in range(2))
    assert s1["mean_reward"] == s2["mean_reward"]
    assert torch.equal(generator.get_state(), before)  # the model's own stream is left as it was
    with pytest.raises(ValueError, match="seed must be an int >= 0 or None, got -1"):
        evaluate(tiny_model, env, seed=-1)


def test_cli_evaluate_seed_repeats_and_is_recorded(tiny_model, tmp_path, capsys):
    tiny_model.save(tmp_path / "m")
    lines = []
    for name in ("a", "b"):
        main(["evaluate", str(tmp_path / "m"), "--episodes", "2", "--seed", "4", "--json", str(tmp_path / name)])
        lines.append(capsys.readouterr().out)
    assert lines[0] == lines[1]
    results = json.loads((tmp_path / "a").read_text())
    assert results["seed"] == 4 and results["episode_seeds"] == [4, 5]


def test_the_demo_table_repeats_exactly(tmp_path, monkeypatch):
    """The demo's evaluation run twice on the same model prints the same table."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    from dql_agent.cli import demo_table
    from dql_agent.demo_data import build_pendulum_dataset

    info = build_pendulum_dataset("test/pendulum/demo-v0", n_good=1, n_noisy=1, n_reference_episodes=1)
    model = DiffusionQL(OfflineBuffer.from_minari(info.dataset), env=ENV_ID, seed=0, device="cpu", **TINY).learn(5)
    (first, table), (second, again) = (demo_table(model, info, episodes=2, seed=0) for _ in range(2))
    assert table == again and first["episode_seeds"] == [0, 1]


def test_hub_folder_results_record_their_seeds(tiny_model, tmp_path):
    folder = write_hub_folder(tiny_model, tmp_path / "hub", eval_env=gym.make(ENV_ID), n_eval_episodes=2, video=False)
    results = json.loads((folder / "results.json").read_text())
    assert results["seed"] == 0 and results["episode_seeds"] == [0, 1]


# 4. QVPO's expectations -------------------------------------------------------------------------------
def test_qvpo_warns_when_a_learn_call_makes_no_or_few_updates():
    settings = tiny("QVPO", learning_starts=10_000)
    model = QVPO(ENV_ID, seed=0, device="cpu", **settings)
    with pytest.warns(UserWarning, match=r"env steps 0 to 30\) will make no gradient update.*learning_starts=10,000"):
        model.learn(30)
    model = QVPO(ENV_ID, seed=0, device="cpu", **tiny("QVPO", learning_starts=25))
    with pytest.warns(UserWarning, match=r"only 6 of this learn call's 30 env steps will be followed by gradient"):
        model.learn(30)
    assert model.n_updates == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.learn(10, reset_num_timesteps=False)  # past the warm-up: every step updates


def test_qvpo_chunked_sampling_changes_no_bit(monkeypatch):
    """The CPU speed-up (chains in chunks of rows) gives the weights of one pass, bit for bit."""
    settings = tiny("QVPO", learning_starts=8, n_diffusion_samples=16, batch_size=100)
    runs = []
    for rows in (0, 512):  # 0: one pass; 512: chunks of 34, 33 and 33 states
        monkeypatch.setattr(qvpo_module, "CPU_CHUNK_ROWS", rows)
        runs.append(QVPO(ENV_ID, seed=1, device="cpu", **settings).learn(14).policy.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(runs[1][key], value), key


# 6. a card whose first line works ----------------------------------------------------------------------
def _card_install_line(model) -> str:
    text = str(make_model_card(model))
    block = text.split("## Usage", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    return block.strip()


def test_card_install_line_is_what_pip_can_install_here(tiny_model, tmp_path):
    line = _card_install_line(tiny_model)
    assert line == install_command()[0] and line.startswith("pip install ")
    target = shlex.split(line)[2:]
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation"]
        + ["--quiet", "--report", str(report), *target],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "license" not in done.stderr.lower(), done.stderr  # no setuptools license deprecation
    installs = json.loads(report.read_text())["install"]
    from dql_agent.checkpoint import library_version

    assert [(i["metadata"]["name"], i["metadata"]["version"]) for i in installs] == [("dql_agent", library_version())]


def test_card_install_line_follows_the_setting_and_the_metadata(tiny_model, monkeypatch):
    monkeypatch.setenv(INSTALL_ENV, 'pip install "dql_agent @ git+https://github.com/me/dql_agent@v0.1.0"')
    assert _card_install_line(tiny_model) == 'pip install "dql_agent @ git+https://github.com/me/dql_agent@v0.1.0"'
    monkeypatch.delenv(INSTALL_ENV)

    def installed(direct_url: dict | None, installer: str = "pip"):  # noqa: ANN202
        files = {"INSTALLER": installer, "direct_url.json": None if direct_url is None else json.dumps(direct_url)}
        dist = SimpleNamespace(read_text=files.get)
        monkeypatch.setattr("importlib.metadata.distributions", lambda name=None: [dist])

    vcs = {"url": "https://github.com/me/dql_agent", "vcs_info": {"vcs": "git", "commit_id": "abc123"}}
    installed(vcs)
    assert install_command() == ('pip install "dql_agent @ git+https://github.com/me/dql_agent@abc123"', "vcs")
    installed({"url": "https://example.org/dql_agent-0.1.0.tar.gz", "archive_info": {}})
    assert install_command()[0] == 'pip install "dql_agent @ https://example.org/dql_agent-0.1.0.tar.gz"'
    installed(None)
    assert install_command()[1] == "index" and install_command()[0].startswith("pip install dql_agent==")
    installed({"url": "file:///home/me/dql_agent", "dir_info": {"editable": True}})
    assert install_command() == ("pip install /home/me/dql_agent", "local")


def test_pyproject_license_and_ray_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT" and (ROOT / "LICENSE").is_file()
    assert any(req.startswith("setuptools>=77") for req in project["build-system"]["requires"])
    assert "matplotlib" in project["project"]["optional-dependencies"]["ray"]


# 7. one voice offline ------------------------------------------------------------------------------------
FAST = 5.0  # seconds: an unreachable remote is reported after one probe (3 s connect timeout)


@pytest.mark.parametrize("kind", ["refused", "blackhole"])
def test_minari_download_without_a_network_is_one_fast_line(kind, hub_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.delenv("MINARI_REMOTE", raising=False)
    with unreachable_endpoint(kind) as url:
        aim_client(monkeypatch, url, tmp_path / "hf_home")
        start = time.monotonic()
        with pytest.raises(HubUnreachableError) as info:
            OfflineBuffer.from_minari("mujoco/hopper/medium-v0", download=True)
        assert time.monotonic() - start < FAST
    message = str(info.value)
    assert "\n" not in message and info.value.__cause__ is None and info.value.__suppress_context__
    assert (
        f"cannot download Minari dataset 'mujoco/hopper/medium-v0' from hf://farama-minari: no connection to {url}"
        in message
    )
    for offline_route in ("minari download mujoco/hopper/medium-v0", "MINARI_DATASETS_PATH", "write_minari_dataset"):
        assert offline_route in message


def test_minari_download_in_offline_mode_says_so(hub_server, hub_offline, monkeypatch, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    hub_offline()
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE is set .unset it to download.. To work offline"):
        load_minari_dataset("mujoco/hopper/medium-v0", download=True)
    assert not hub_server.requests


def test_cli_download_without_a_network_is_one_line(hub_server, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.delenv("DQL_AGENT_DEBUG", raising=False)
    with unreachable_endpoint("refused") as url:
        aim_client(monkeypatch, url, tmp_path / "hf_home")
        with pytest.raises(SystemExit) as info:
            main(["train", "mujoco/hopper/medium-v0", "--download", "-o", str(tmp_path / "m"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("dql-agent: error: cannot download")
    assert "Errno" not in err.split("(")[0] and "minari download mujoco/hopper/medium-v0" in err


def test_missing_dataset_names_the_way_to_download_of_each_interface(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(MinariDatasetNotFoundError, match="Pass download=True to fetch it") as info:
        OfflineBuffer.from_minari("test/absent-v0")
    assert info.value.dataset_id == "test/absent-v0" and "--download" not in str(info.value)
    with pytest.raises(SystemExit):
        main(["train", "test/absent-v0", "-o", str(tmp_path / "m"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "Pass --download to fetch it" in err and "download=True" not in err


def test_a_sweep_checks_its_datasets_before_ray_starts(monkeypatch, tmp_path):
    pytest.importorskip("ray")
    from dql_agent.integrations.ray import SweepSpec

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    spec = SweepSpec(datasets=["test/absent-v0"], root=str(tmp_path))
    with pytest.raises(MinariDatasetNotFoundError, match="Set download: true in the sweep spec"):
        spec.check_datasets()


# 8. output a user can follow ------------------------------------------------------------------------------
def test_progress_without_a_terminal_is_lines_every_tenth(pendulum_buffer, caplog, monkeypatch):
    monkeypatch.setattr("dql_agent.sb3._console_is_interactive", lambda: False)  # as under a redirect (`-s` too)
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY)
    with caplog.at_level(logging.INFO, logger="dql_agent"):
        model.learn(40, progress_bar=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("timestep ")]
    assert len(lines) == 10 and lines[0].startswith("timestep 4/40 (10%)") and lines[-1].startswith("timestep 40/40")
    assert "timesteps/s" in lines[0] and "left" in lines[0]


def test_progress_lines_come_at_least_every_line_seconds(pendulum_buffer, caplog):
    bar = TimestepProgressBar(terminal=False, line_seconds=1e-9, line_fraction=1.0)
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY)
    with caplog.at_level(logging.INFO, logger="dql_agent"):
        model.learn(5, callback=bar)
    assert sum(r.getMessage().startswith("timestep ") for r in caplog.records) == 5


def test_progress_in_a_redirected_cli_run(npz, tmp_path):
    done = subprocess.run(
        [*CLI, "train", npz, "-o", str(tmp_path / "m"), "--steps", "50", *TRAIN, *TRAIN_SET],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"^timestep 5/50 \(10%\)", done.stdout, re.M) and "timestep 50/50 (100%)" in done.stdout


def test_sweep_notes_use_the_package_wording_not_tunes():
    pytest.importorskip("ray")
    from dql_agent.integrations import ray as sweeps

    pending = SimpleNamespace(path="/s/trial_1", config={"dataset": "d", "seeds": [0]}, error=None)
    failed = SimpleNamespace(path="/s/trial_2", config={"dataset": "d", "seeds": [1]}, error=RuntimeError("a\nboom"))
    assert sweeps._no_report_note(pending, 100) == (
        "trial trial_1 (d, seeds [0]) had not reached its first evaluation (100 steps) when the sweep stopped: "
        "`dql-agent sweep SPEC.yaml --resume` (run_sweep(..., resume=True)) continues it"
    )
    assert (
        sweeps._no_report_note(failed, 100) == "trial trial_2 (d, seeds [1]) failed before its first evaluation: boom"
    )
    logger = logging.getLogger("ray.tune.tune")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with sweeps._tune_hints_replaced():
            logger.warning('Experiment has been interrupted...\nResume experiment with: Tuner.restore(path="x")')
            logger.error("Trials did not complete: [trial_1]")
            logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something else"]


# the benchmarks behind the README's numbers, with tiny budgets ----------------------------------------------
def test_qvpo_speed_benchmark_runs(tmp_path, capsys):
    from benchmarks import qvpo_speed

    sets = [f"--set={key}={value}" for key, value in tiny("QVPO").items() if key != "learning_starts"]
    argv = ["--seconds", "0.2", "--warmup", "40", "--repeats", "1", *sets, "--out", str(tmp_path / "q")]
    result = qvpo_speed.main(argv)
    assert result["timesteps_per_s"] > 0 and result["timed_steps"] >= 1
    assert set(result["phase_seconds"]) == {"target", "actor chains", "actor loss", "critic"}
    assert json.loads((tmp_path / "q").read_text())["gflop_per_update"] == result["gflop_per_update"]


def test_export_agreement_benchmark_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from benchmarks import export_agreement

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    from dql_agent.demo_data import build_pendulum_dataset

    info = build_pendulum_dataset("test/pendulum/agree-v0", n_good=1, n_noisy=1, n_reference_episodes=1)
    model = DiffusionQL(OfflineBuffer.from_minari(info.dataset), seed=0, device="cpu", **TINY).learn(20)
    model.save(tmp_path / "m")
    result = export_agreement.main(["--model", str(tmp_path / "m"), "--dataset", "test/pendulum/agree-v0", "--n", "20"])
    assert result["observations"] == 20 and result["same_pick_count"] + result["other_pick_count"] == 20
    assert result["predict_vs_own_argmax_max_diff"] == 0.0 and result["max_action_diff_same_pick"] < 1e-4


# 5. an export says nothing about the exporter itself ------------------------------------------------------------
def test_export_prints_no_exporter_notes(tmp_path):
    """torch's ONNX exporter logs four 'torchvision is not installed' lines and pytree a
    FutureWarning on a first export in a process: none concerns the user, none is shown."""
    pytest.importorskip("onnxscript")
    script = f"""
import gymnasium as gym, numpy as np
from dql_agent import DiffusionQL, OfflineBuffer
env = gym.make("{ENV_ID}")
rng = np.random.default_rng(0)
obs = rng.normal(size=(64, 3)).astype(np.float32)
buffer = OfflineBuffer(obs, rng.uniform(-2, 2, (64, 1)), rng.normal(size=64), obs, np.zeros(64, bool),
                       observation_space=env.observation_space, action_space=env.action_space)
model = DiffusionQL(buffer, seed=0, device="cpu", **{TINY!r})
model.export(r"{tmp_path / "p.onnx"}")
model.export(r"{tmp_path / "p.pt2"}")
print("exported")
"""
    done = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "exported" and done.stderr == "", done.stderr
