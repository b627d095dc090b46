"""The dql-agent command, run in-process through main(argv)."""

import json
import os
import re
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from dql_agent import QVPO, DiffusionDICE, DiffusionQL, cli, load_from_hub
from dql_agent.cli import main

QUIET = ["--episodes", "0", "--no-progress", "--device", "cpu"]  # no evaluation, no bar
SMALL = ["--set", "hidden_dim=16", "--set", "n_hidden=2", "--set", "diffusion_steps=3", "--set", "batch_size=32"]


@pytest.fixture
def npz(tmp_path, pendulum_arrays):
    path = tmp_path / "pendulum.npz"
    np.savez(path, **pendulum_arrays)
    return str(path)


def test_train_evaluate_record_push(npz, tmp_path, capsys, hub_server):
    out = tmp_path / "model"
    main(
        [
            "train",
            npz,
            "--env",
            "Pendulum-v1",
            "--steps",
            "5",
            "-o",
            str(out),
            "--episodes",
            "1",
            "--no-progress",
            "--device",
            "cpu",
            "--seed",
            "0",
            "--set",
            "n_action_samples=4",
            *SMALL,
        ]
    )
    assert "mean return" in capsys.readouterr().out
    model = DiffusionQL.load(out)
    assert (model.num_timesteps, model.config.hidden_dim, model.config.n_action_samples) == (5, 16, 4)

    main(["evaluate", str(out), "--env", "Pendulum-v1", "--episodes", "2", "--json", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["n_eval_episodes"] == 2 and results["mean_reward"] < 0

    main(["record", str(out), "--env", "Pendulum-v1", "-o", str(tmp_path / "v.mp4"), "--max-steps", "12"])
    assert iio.imread(tmp_path / "v.mp4", plugin="FFMPEG").shape[0] == 12

    main(["push", str(out), "alice/cli-model", "--env", "Pendulum-v1", "--episodes", "1", "--video-length", "8"])
    assert "pushed:" in capsys.readouterr().out
    assert {"model.safetensors", "config.json", "README.md", "results.json", "replay.mp4"} <= set(
        hub_server.repos["alice/cli-model"].commits[hub_server.repos["alice/cli-model"].branches["main"]].files
    )
    loaded = load_from_hub("alice/cli-model", device="cpu")
    obs = np.zeros(3, np.float32)
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def test_train_dice_offline_and_qvpo_online(npz, tmp_path):
    main(
        [
            "train",
            npz,
            *"--algo dice --env Pendulum-v1 --steps 3 -o".split(),
            str(tmp_path / "dice"),
            *QUIET,
            *"--set n_action_samples=4 --set q_ensemble_size=2 --set behavior_batch_size=32 --set time_dim=8".split(),
            *SMALL,
        ]
    )
    assert type(load_from_hub(str(tmp_path / "dice"))) is DiffusionDICE
    main(
        [
            *"train --algo qvpo --env Pendulum-v1 --steps 40 -o".split(),
            str(tmp_path / "qvpo"),
            *QUIET,
            *"--set learning_starts=20 --set n_diffusion_samples=4 --set n_action_samples=4".split(),
            *SMALL,
        ]
    )
    assert load_from_hub(str(tmp_path / "qvpo")).num_timesteps == 40
    assert isinstance(load_from_hub(str(tmp_path / "qvpo")), QVPO)


def bad(argv: list[str], message: str):  # one adversarial input: a counted case
    return pytest.param(argv, message, marks=pytest.mark.bad_input("cli", "clear error"))


@pytest.mark.parametrize(
    "argv, message",
    [
        bad(["train", "--algo", "dql", "-o", "x"], "trains offline: pass a DATASET"),
        bad(["train", "data.npz", "--algo", "qvpo", "-o", "x"], "trains online"),
        bad(
            ["train", "data.npz", "--algo", "dice", "--preset", "hopper-medium", "-o", "x"],
            "--algo dice has no presets (--preset is for dql)",
        ),
        bad(["train", "missing.npz", "-o", "x"], "missing.npz"),
        bad(["train", "nosuch/dataset-v0", "-o", "x"], "nosuch/dataset-v0"),
        bad(["train", "data.npz", "--set", "noequals", "-o", "x"], "--set expects key=value"),
        bad(["evaluate", "nowhere/model"], "nowhere/model"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, tmp_path, monkeypatch, capsys, hub_server, hub_offline):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.delenv("DQL_AGENT_DEBUG", raising=False)
    hub_offline()  # a repo id must fail from the (empty) cache, never reach a real network
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dql-agent: error: ") and err.count("\n") == 1 and message in err, err


def test_demo_pipeline_smoke(tmp_path):
    """The demo's steps end to end with a tiny budget (the real budget runs under -m slow), as a
    user runs it: its own process, no display, and nothing on the screen that reads as an error."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}
    command = [sys.executable, "-m", "dql_agent.cli", "demo", "-o", str(tmp_path / "demo"), "--steps", "20"]
    done = subprocess.run(
        [*command, "--episodes", "1", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in ("[1/5]", "noisy half", "random actions", "[5/5]"):
        assert line in out
    own = "warning: the agent did not beat"  # the demo's own verdict on a 20-step budget
    lines = (out + done.stderr).splitlines()
    noise = [line for line in lines if re.search(r"error|warning|traceback", line, re.I) and own not in line]
    assert not noise, noise  # e.g. SDL's 'error: XDG_RUNTIME_DIR is invalid' when a video is rendered
    hub = tmp_path / "demo" / "hub"
    assert {p.name for p in hub.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "README.md",
        "results.json",
        "replay.mp4",
    }
    assert DiffusionQL.load(tmp_path / "demo" / "model").num_timesteps == 20


@pytest.mark.slow
def test_demo_beats_the_noisy_half_and_random_actions(tmp_path, capsys):
    main(["demo", "-o", str(tmp_path / "demo"), "--device", "cpu"])
    results = json.loads((tmp_path / "demo" / "hub" / "results.json").read_text())
    out = capsys.readouterr().out
    noisy = float(out.split("dataset noisy half")[1].split()[0])
    random = float(out.split("random actions")[1].split()[0])
    assert results["mean_reward"] > noisy + 200 and results["mean_reward"] > random + 200, (results, noisy, random)


@pytest.mark.parametrize("bug", [AttributeError("a bug"), AssertionError("a bug"), RuntimeError("a bug")])
def test_a_bug_keeps_its_traceback(bug, monkeypatch):
    """Only user errors become one line: anything else propagates (the console shows the traceback)."""

    def broken(args):
        raise bug

    monkeypatch.setattr(cli, "cmd_evaluate", broken)  # build_parser binds the command when main runs
    with pytest.raises(type(bug), match="a bug"):
        main(["evaluate", "model", "--device", "cpu"])
