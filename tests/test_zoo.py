"""rl-zoo3's real enjoy / record_video on saved dql_agent models, SB3's load keywords, and the
huggingface_sb3 habits (load_from_hub works on a zip; package_to_hub is refused early)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from dql_agent import QVPO, DiffusionDICE, DiffusionQL, OfflineBuffer
from dql_agent.integrations import zoo

ENV_ID = "Pendulum-v1"
TINY = {"hidden_dim": 16, "n_hidden": 2, "diffusion_steps": 3, "n_action_samples": 4}
# rl_zoo3 is imported inside the tests, not here: importing it patches gymnasium's TimeLimit for
# the whole process, and collecting this module must not change what the other modules' tests see.


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> DiffusionQL:
    """A tiny DiffusionQL trained 5 steps on random Pendulum-shaped transitions."""
    env = gym.make(ENV_ID)
    rng = np.random.default_rng(0)
    obs = rng.uniform(-1, 1, (64, 3)).astype(np.float32)
    buffer = OfflineBuffer(
        obs,
        rng.uniform(-2, 2, (64, 1)),
        rng.normal(size=64),
        np.roll(obs, -1, 0),
        np.zeros(64, bool),
        observation_space=env.observation_space,
        action_space=env.action_space,
    )
    return DiffusionQL(buffer, env=ENV_ID, device="cpu", seed=0, batch_size=32, **TINY).learn(5)


@pytest.fixture(scope="module")
def qvpo() -> QVPO:
    """A tiny, untrained QVPO (acting is what the zoo scripts use)."""
    return QVPO(ENV_ID, device="cpu", seed=0, **TINY)


@pytest.fixture
def zoo_algos():
    """rl_zoo3.ALGOS (the dict rl-zoo3's scripts read), restored after the test."""
    from rl_zoo3 import ALGOS

    before = dict(ALGOS)
    yield ALGOS
    ALGOS.clear()
    ALGOS.update(before)


def replay_rewards(agent, n_steps: int, deterministic: bool = True, seed: int = 0) -> list[float]:
    """The episode returns enjoy should print: ``agent`` on rl-zoo3's test env seeded ``seed``."""
    from rl_zoo3 import create_test_env

    env = create_test_env(ENV_ID, n_envs=1, seed=seed, should_render=False, hyperparams={})
    obs, returns, total = env.reset(), [], 0.0
    for _ in range(n_steps):
        obs, reward, done, _ = env.step(agent.predict(obs, deterministic=deterministic)[0])
        total += float(reward[0])
        if done[0]:
            returns.append(total)
            total = 0.0
    return returns


def printed_rewards(out: str) -> list[str]:
    return re.findall(r"^Episode Reward: (-?[\d.]+)$", out, re.M)


def run_zoo(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["zoo", *argv])
    zoo.main()


# rl-zoo3's scripts -------------------------------------------------------------------------------
def test_registers_short_names(zoo_algos):
    assert zoo.register_algorithms() == {"dql": DiffusionQL, "dice": DiffusionDICE, "qvpo": QVPO}
    assert zoo_algos["dql"] is DiffusionQL and zoo_algos["qvpo"] is QVPO and zoo_algos["dice"] is DiffusionDICE
    assert zoo_algos["sac"].__name__ == "SAC"  # rl-zoo3's own stay


@pytest.mark.bad_input("habits", "clear error")
def test_short_name_taken_by_another_class(zoo_algos):
    zoo_algos["dql"] = object
    with pytest.raises(ValueError, match=r"already has \['dql'\]"):
        zoo.register_algorithms()
    assert zoo_algos["dql"] is object


@pytest.mark.parametrize("agent", ["model", "qvpo"])
def test_enjoy_runs_the_saved_model(agent, request, zoo_algos, tmp_path, monkeypatch, capsys):
    agent = request.getfixturevalue(agent)
    (tmp_path / "logs" / agent.short_name / f"{ENV_ID}_3").mkdir(parents=True)  # an older run, no model
    path = zoo.save_to_zoo(agent, tmp_path / "logs")
    assert path == tmp_path / "logs" / agent.short_name / f"{ENV_ID}_4" / f"{ENV_ID}.zip"
    monkeypatch.chdir(tmp_path)
    argv = ["enjoy", "--algo", agent.short_name, "--env", ENV_ID, "-f", "logs/", "--no-render", "-n", "400"]
    run_zoo(monkeypatch, [*argv, "--device", "cpu"])  # the replay below acts on the CPU too
    out = capsys.readouterr().out
    assert f"Loading logs/{agent.short_name}/{ENV_ID}_4/{ENV_ID}.zip" in out
    # 400 steps: 2 Pendulum episodes, deterministic (enjoy's default), each the model's return.
    assert printed_rewards(out) == [f"{r:.2f}" for r in replay_rewards(agent, 400)]
    assert "2 Episodes" in out


def test_enjoy_stochastic_follows_seed(model, zoo_algos, tmp_path, monkeypatch, capsys):
    path = zoo.save_to_zoo(model, tmp_path)
    argv = ["enjoy", "--algo", "dql", "--env", ENV_ID, "-f", str(tmp_path), "--no-render", "-n", "200"]
    run_zoo(monkeypatch, [*argv, "--stochastic", "--seed", "3", "--device", "cpu"])
    (found,) = printed_rewards(capsys.readouterr().out)
    # enjoy seeds the env and loads with seed=3, which seeds stochastic acting as a model built with seed=3
    reseeded = DiffusionQL.load(path, seed=3)
    assert found == f"{replay_rewards(reseeded, 200, deterministic=False, seed=3)[0]:.2f}"
    saved_seed = DiffusionQL.load(path)
    assert found != f"{replay_rewards(saved_seed, 200, deterministic=False, seed=3)[0]:.2f}"


def test_record_video_writes_mp4(model, zoo_algos, tmp_path, monkeypatch, capsys):
    zoo.save_to_zoo(model, tmp_path / "logs")
    video_dir = tmp_path / "videos"
    argv = ["--algo", "dql", "--env", ENV_ID, "-f", str(tmp_path / "logs"), "-n", "20", "-o", str(video_dir)]
    run_zoo(monkeypatch, ["record_video", *argv, "--no-render"])
    (video,) = video_dir.glob("*.mp4")
    assert video.name == f"final-model-dql-{ENV_ID}-step-0-to-step-20.mp4"
    frames = iio.imread(video, plugin="FFMPEG")
    assert frames.shape[0] == 21 and frames.shape[-1] == 3 and frames.std() > 0  # the reset frame + 20 steps


def test_documented_command(model, tmp_path):
    """The README's one-line command, in a fresh interpreter."""
    zoo.save_to_zoo(model, tmp_path / "logs")
    command = "enjoy --algo dql --env Pendulum-v1 -f logs/ --no-render -n 200"
    result = subprocess.run(
        [sys.executable, "-m", "dql_agent.integrations.zoo", *command.split()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},  # device="auto": the CPU, as here
    )
    assert result.returncode == 0, result.stderr
    assert printed_rewards(result.stdout) == [f"{replay_rewards(model, 200)[0]:.2f}"]


@pytest.mark.parametrize("argv", [[], ["train", "--algo", "dql"]])
@pytest.mark.bad_input("habits", "clear error")
def test_unknown_script(argv, capsys):
    with pytest.raises(SystemExit) as info:
        zoo.main(argv)
    assert info.value.code == 2
    assert "must be one of ['enjoy', 'record_video']" in capsys.readouterr().err


@pytest.mark.bad_input("habits", "clear error")
def test_missing_zoo_extra(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rl_zoo3", None)  # what `import rl_zoo3` finds when it is not installed
    with pytest.raises(ImportError, match=r"pip install dql_agent\[zoo\]"):
        zoo.main(["enjoy", "--algo", "dql"])
    monkeypatch.setitem(sys.modules, "huggingface_sb3", None)
    with pytest.raises(ImportError, match=r"pip install dql_agent\[zoo\]"):
        zoo.save_to_zoo(model, tmp_path)


def test_save_to_zoo_numbers_runs_as_rl_zoo3(model, tmp_path):
    from rl_zoo3 import get_latest_run_id

    algo_dir = tmp_path / "dql"
    for name in (f"{ENV_ID}_7", f"{ENV_ID}_x", f"{ENV_ID}_9_1", "Other-v0_12", f"{ENV_ID}_5"):
        (algo_dir / name).mkdir(parents=True)
    path = zoo.save_to_zoo(model, tmp_path)
    assert path == algo_dir / f"{ENV_ID}_8" / f"{ENV_ID}.zip"
    assert get_latest_run_id(str(algo_dir), ENV_ID) == 8
    path = zoo.save_to_zoo(model, tmp_path, env_id="gymnasium_robotics/FetchReach-v4")  # rl-zoo3's name: no slash
    assert path == algo_dir / "gymnasium_robotics-FetchReach-v4_1" / "gymnasium_robotics-FetchReach-v4.zip"


@pytest.mark.bad_input("habits", "clear error")
def test_save_to_zoo_needs_an_env_id(tmp_path):
    env = gym.make(ENV_ID)
    agent = DiffusionQL(
        observation_space=env.observation_space, action_space=env.action_space, device="cpu", seed=0, **TINY
    )
    with pytest.raises(ValueError, match=r"pass env_id=\.\.\."):
        zoo.save_to_zoo(agent, tmp_path)
    assert not (tmp_path / "dql").exists()


def test_save_to_zoo_env_id_from_the_env(tmp_path):
    env = gym.make(ENV_ID)
    agent = DiffusionQL(
        observation_space=env.observation_space, action_space=env.action_space, device="cpu", seed=0, **TINY
    )
    agent.set_env(env)  # no env id in the metadata: the env's spec names it
    assert zoo.save_to_zoo(agent, tmp_path) == tmp_path / "dql" / f"{ENV_ID}_1" / f"{ENV_ID}.zip"


# SB3's load keywords -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "model.zip"
    model.save(path)
    return path


def _actions(agent, deterministic: bool = True) -> np.ndarray:
    observations = np.stack([gym.make(ENV_ID).reset(seed=s)[0] for s in range(4)])
    return agent.predict(observations, deterministic=deterministic)[0]


def test_load_accepts_what_rl_zoo3_passes(model, saved):
    custom_objects = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0, "clip_range": lambda _: 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = DiffusionQL.load(saved, custom_objects=custom_objects, device="cpu", seed=0, buffer_size=1)
        DiffusionQL.load(saved, custom_objects={}, optimize_memory_usage=False)
    np.testing.assert_array_equal(_actions(loaded), _actions(model))
    assert loaded.config == model.config  # nothing in custom_objects was applied


@pytest.mark.bad_input("habits", "correct behaviour")
def test_load_warns_on_other_custom_objects(model, saved):
    with pytest.warns(UserWarning, match=r"ignores custom_objects \['n_action_samples', 'observation_space'\]"):
        loaded = DiffusionQL.load(saved, custom_objects={"observation_space": None, "n_action_samples": 2})
    assert loaded.config.n_action_samples == model.config.n_action_samples


def test_load_print_system_info(saved, caplog):
    caplog.set_level("INFO", logger="dql_agent")
    DiffusionQL.load(saved, print_system_info=True)
    out = "".join(f"{record.getMessage()}\n" for record in caplog.records)
    assert out.startswith("== CURRENT SYSTEM INFO ==\n")
    assert f"- PyTorch: {torch.__version__}\n" in out and f"- Numpy: {np.__version__}\n" in out
    assert re.search(r"== SAVED MODEL SYSTEM INFO ==\n- dql_agent: \S+\n- format_version: \d+\n$", out)


def test_load_seed_reseeds_acting(model, saved):
    reseeded = DiffusionQL.load(saved, seed=5)
    assert reseeded.seed == 5
    np.testing.assert_array_equal(_actions(reseeded), _actions(model))  # deterministic: fixed noise
    stochastic = _actions(reseeded, deterministic=False)
    np.testing.assert_array_equal(stochastic, _actions(DiffusionQL.load(saved, seed=5), deterministic=False))
    assert not np.array_equal(stochastic, _actions(DiffusionQL.load(saved), deterministic=False))


def test_load_force_reset_and_buffer_size_on_qvpo(qvpo, tmp_path):
    qvpo.save(tmp_path / "q.zip")
    for force_reset in (True, False):
        loaded = QVPO.load(tmp_path / "q.zip", env=ENV_ID, force_reset=force_reset, buffer_size=10)
        assert loaded._last_obs is None  # the next learn starts from env.reset() either way
        assert loaded.config.buffer_size == 10  # a QVPO hyperparameter, so applied
        loaded.learn(2)
    assert loaded.num_timesteps == 2


def test_load_keeps_hyperparameter_overrides(saved):
    assert DiffusionQL.load(saved, n_action_samples=2).config.n_action_samples == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"policy_kwargs": {}}, r"unknown keyword\(s\) \['policy_kwargs'\]"),
        ({"buffer_sise": 1}, r"unknown keyword\(s\) \['buffer_sise'\]"),
        ({"custom_objects": ["learning_rate"]}, "custom_objects must be a dict or None"),
        ({"print_system_info": "yes"}, "print_system_info must be a bool"),
        ({"force_reset": 1}, "force_reset must be a bool"),
    ],
)
@pytest.mark.bad_input("habits", "clear error")
def test_load_refuses(saved, kwargs, message):
    with pytest.raises(TypeError, match=message):
        DiffusionQL.load(saved, **kwargs)


@pytest.mark.bad_input("habits", "clear error")
def test_load_sb3_positional_custom_objects(saved):
    # SB3's 4th positional parameter is custom_objects; here it is include_optimizer
    with pytest.raises(TypeError, match="include_optimizer must be a bool, got {}"):
        DiffusionQL.load(saved, None, "cpu", {})


@pytest.mark.bad_input("habits", "clear error")
def test_load_bad_seed(saved):
    with pytest.raises(ValueError, match="seed"):
        DiffusionQL.load(saved, seed=-1)


# huggingface_sb3 ---------------------------------------------------------------------------------
def test_huggingface_sb3_load_from_hub_zip(model, saved, hub_server, monkeypatch):
    import huggingface_sb3
    from huggingface_hub import HfApi

    HfApi().create_repo("alice/dql-zip")
    HfApi().upload_file(path_or_fileobj=saved, path_in_repo="dql-Pendulum-v1.zip", repo_id="alice/dql-zip")
    monkeypatch.setenv("TRUST_REMOTE_CODE", "True")  # huggingface_sb3 assumes a pickle; this zip holds none
    path = huggingface_sb3.load_from_hub("alice/dql-zip", "dql-Pendulum-v1.zip")
    np.testing.assert_array_equal(_actions(DiffusionQL.load(path)), _actions(model))


def test_load_print_system_info_shows_without_a_logging_setup(saved):
    """A user who set up no logging still sees what they asked for, on stdout."""
    code = f"from dql_agent import DiffusionQL; DiffusionQL.load({str(saved)!r}, print_system_info=True)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("== CURRENT SYSTEM INFO ==\n") and "== SAVED MODEL SYSTEM INFO ==" in out


@pytest.mark.bad_input("habits", "correct behaviour")
def test_huggingface_sb3_package_to_hub_uploads_nothing(model, hub_server):
    """huggingface_sb3 packages SB3's pickled zips; a dql_agent model saves a folder, so its
    packaging fails at the zip it expects, before any upload (README: use model.push_to_hub)."""
    from huggingface_sb3 import package_to_hub

    with pytest.raises(FileNotFoundError, match=r"dql-Pendulum-v1\.zip"):
        package_to_hub(model, "dql-Pendulum-v1", "DiffusionQL", ENV_ID, gym.make(ENV_ID), "alice/sb3-habit")
    repo = hub_server.repos["alice/sb3-habit"]  # created before the model is saved, and left empty
    assert set(repo.commits[repo.branches["main"]].files) <= {".gitattributes"}
