"""The contract every algorithm keeps, written once and run for all three.

DiffusionQL and DiffusionDICE train offline on the Pendulum buffer; QVPO trains online on
Pendulum-v1. Each test builds its models through :class:`Case` (``case.make()`` is an untrained tiny
model attached to its data), so the tests read the same for every algorithm. ``num_timesteps`` is
gradient steps offline and env steps online; QVPO's ``learning_starts`` (10) is below every step
count used here at which it matters, so it has updated by then.

Covered: SB3 callbacks, logger and progress bar inside ``learn``; stopping from a callback;
``predict`` on one observation, a batch and Dict observations; ``evaluate_policy`` on an env and a
VecEnv; save/load as a directory and a ``.zip``; resuming from a checkpoint; seeding; the Hub round
trip; Ctrl-C and callback errors during ``learn``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

import dql_agent
from dql_agent import QVPO, DiffusionDICE, DiffusionQL, OfflineBuffer
from dql_agent.base import BaseAgent
from tests.settings import TINY, TINY_SETTINGS, tiny

ENV_ID = "Pendulum-v1"
EPISODE = 25  # Pendulum-v1 cut to 25 steps: evaluations and QVPO's episode-end log dumps stay cheap
WORST_REWARD = -(np.pi**2 + 0.1 * 8.0**2 + 0.001 * 2.0**2)  # Pendulum's cost at max angle, speed and torque
# Pendulum's observation [cos th, sin th, thdot] as a Dict: "a" holds the first two entries, "b" the last.
DICT_SPACE = spaces.Dict({"a": spaces.Box(-1.0, 1.0, (2,), np.float32), "b": spaces.Box(-8.0, 8.0, (1,), np.float32)})


class DictPendulum(gym.ObservationWrapper):
    """Pendulum-v1 with Dict observations ``{"a": obs[:2], "b": obs[2:]}`` (flattens back to obs)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = DICT_SPACE

    def observation(self, observation: np.ndarray) -> dict[str, np.ndarray]:
        return {"a": observation[:2], "b": observation[2:]}


def pendulum_env(dict_obs: bool = False) -> gym.Env:
    env = gym.make(ENV_ID, max_episode_steps=EPISODE)
    return DictPendulum(env) if dict_obs else env


# the algorithms --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Algorithm:
    """What differs between the algorithms: class, tiny settings, data, logged keys."""

    cls: type[BaseAgent]
    hyperparameters: dict[str, Any]
    online: bool
    """Expected: online algorithms collect their own experience (checked against ``cls.online``)."""
    log_keys: tuple[str, ...]
    resume_settings: dict[str, Any]
    """Settings that put a schedule boundary inside the resumed window of ``test_resume``."""


ALGORITHMS = {
    "DiffusionQL": Algorithm(
        DiffusionQL,
        TINY,
        online=False,
        log_keys=("train/critic_loss", "train/actor_loss", "train/bc_loss", "train/q_loss", "time/fps"),
        resume_settings={"ema_start_step": 12, "ema_update_every": 2},  # the EMA starts after the save
    ),
    "DiffusionDICE": Algorithm(
        DiffusionDICE,
        TINY_SETTINGS["DiffusionDICE"],
        online=False,
        log_keys=("train/critic_loss", "train/value_loss", "train/guidance_loss", "train/bc_loss", "time/fps"),
        # The behaviour model stops training, and the cosine decay runs, inside the resumed window.
        resume_settings={"behavior_steps": 12, "lr_decay": True, "lr_decay_steps": 30},
    ),
    "QVPO": Algorithm(
        QVPO,
        tiny("QVPO", learning_starts=10),
        online=True,
        log_keys=("train/critic_loss", "train/actor_loss", "train/entropy_coef", "rollout/ep_rew_mean", "time/fps"),
        resume_settings={},
    ),
}


@dataclass(frozen=True)
class Case:
    """One algorithm bound to its data: the factory the tests build every model with."""

    name: str
    algorithm: Algorithm
    arrays: dict[str, np.ndarray]

    @property
    def cls(self) -> type[BaseAgent]:
        return self.algorithm.cls

    @property
    def resumes_exactly(self) -> bool:
        """Offline checkpoints hold all the training state; QVPO's replay buffer is not saved."""
        return not self.algorithm.online

    def data(self, dict_obs: bool = False) -> OfflineBuffer | gym.Env:
        """What a model learns from: the Pendulum buffer (offline) or a Pendulum env (online)."""
        if self.algorithm.online:
            return pendulum_env(dict_obs)
        env = gym.make(ENV_ID)
        space = DICT_SPACE if dict_obs else env.observation_space
        return OfflineBuffer(**self.arrays, observation_space=space, action_space=env.action_space)

    def make(self, seed: int = 0, dict_obs: bool = False, **overrides: Any) -> BaseAgent:
        """An untrained tiny model on its data; offline ones also get an env for SB3's callbacks."""
        settings = {**self.algorithm.hyperparameters, **overrides}
        if self.algorithm.online:
            return self.cls(self.data(dict_obs), seed=seed, device="cpu", **settings)
        return self.cls(self.data(dict_obs), env=pendulum_env(dict_obs), seed=seed, device="cpu", **settings)

    def updates_by(self, timestep: int) -> int:
        """Gradient steps taken by the end of ``timestep``: one per step, online from ``learning_starts`` on."""
        if not self.algorithm.online:
            return timestep
        return max(0, timestep - self.algorithm.hyperparameters["learning_starts"] + 1)

    def attach(self, model: BaseAgent) -> None:
        """Give a loaded model its data back (checkpoints hold none)."""
        if self.algorithm.online:
            model.set_env(self.data())
        else:
            model.set_buffer(self.data())


def test_the_contract_covers_every_registered_algorithm():
    """A new algorithm is registered by its class statement: it needs an entry here and tiny
    settings in tests/settings.py before the contract runs over it."""
    from dql_agent.registry import load_builtin_algorithms

    registered = set(load_builtin_algorithms())
    assert set(ALGORITHMS) == registered, f"add {sorted(registered - set(ALGORITHMS))} to ALGORITHMS above"
    assert set(TINY_SETTINGS) == registered, f"add {sorted(registered - set(TINY_SETTINGS))} to tests/settings.py"


@pytest.fixture(scope="module", params=list(ALGORITHMS))
def case(request: pytest.FixtureRequest, pendulum_arrays: dict) -> Case:
    return Case(request.param, ALGORITHMS[request.param], pendulum_arrays)


@pytest.fixture(scope="module")
def trained(case: Case) -> BaseAgent:
    """A tiny model after 20 steps (QVPO updates from step 10 on). Tests must not train it further."""
    return case.make().learn(20)


# helpers ---------------------------------------------------------------------------------------
def observations(n: int = 5) -> np.ndarray:
    env = gym.make(ENV_ID)
    return np.stack([env.reset(seed=seed)[0] for seed in range(n)])  # (n, 3)


def assert_same_weights(a: BaseAgent, b: BaseAgent) -> None:
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_same_training_state(a: BaseAgent, b: BaseAgent) -> None:
    """Weights, counters, RNG and schedule state, and every optimizer's state (moments, step, lr)."""
    assert_same_weights(a, b)
    assert (a.num_timesteps, a.n_updates) == (b.num_timesteps, b.n_updates)
    (rng_a, meta_a), (rng_b, meta_b) = a.training_state(), b.training_state()
    assert meta_a == meta_b
    assert rng_a.keys() == rng_b.keys() and all(torch.equal(rng_a[k], rng_b[k]) for k in rng_a)
    optimizers_a, optimizers_b = a.optimizers(), b.optimizers()
    assert optimizers_a.keys() == optimizers_b.keys()
    for name, optimizer in optimizers_a.items():
        state_a, state_b = optimizer.state_dict(), optimizers_b[name].state_dict()
        assert [g["lr"] for g in state_a["param_groups"]] == [g["lr"] for g in state_b["param_groups"]], name
        assert state_a["state"].keys() == state_b["state"].keys(), name
        for index, values in state_a["state"].items():
            for key, value in values.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b["state"][index][key])), (name, key)


def assert_pendulum_returns(returns: Any, n_steps: int = EPISODE) -> None:
    returns = np.asarray(returns, dtype=np.float64)
    assert np.all(returns >= WORST_REWARD * n_steps) and np.all(returns <= 0.0), returns


class At(BaseCallback):
    """Calls ``action()`` in ``on_step`` when ``num_timesteps`` reaches ``step``."""

    def __init__(self, step: int, action: Callable[[], None]):
        super().__init__()
        self.step, self.action = step, action

    def _on_step(self) -> bool:
        if self.num_timesteps == self.step:
            self.action()
        return True


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, delivered mid-learn


# learn and SB3 callbacks -----------------------------------------------------------------------
class CountSteps(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.calls, self.started, self.ended = 0, False, False

    def _on_training_start(self) -> None:
        self.started = True

    def _on_step(self) -> bool:
        self.calls += 1
        return True

    def _on_training_end(self) -> None:
        self.ended = True


@pytest.mark.filterwarnings("ignore::tqdm.TqdmExperimentalWarning")  # SB3 silences it outside pytest
def test_registered_with_the_expected_mode(case):
    algorithm = case.algorithm
    assert dql_agent.base.ALGORITHMS[algorithm.cls.algorithm] is algorithm.cls
    assert algorithm.cls.online is algorithm.online


def test_learn_drives_sb3_callbacks_logger_and_progress_bar(case, tmp_path, capsys, caplog):
    model = case.make()
    eval_cb = EvalCallback(
        Monitor(pendulum_env()),
        n_eval_episodes=1,
        eval_freq=10,
        best_model_save_path=str(tmp_path / "best"),
        log_path=str(tmp_path / "eval"),
    )
    checkpoints = CheckpointCallback(save_freq=15, save_path=str(tmp_path / "ckpt"))
    counter = CountSteps()
    model.set_logger(configure(str(tmp_path / "log"), ["csv"]))
    model.learn(30, callback=[eval_cb, checkpoints, counter], log_interval=1, progress_bar=True)

    assert model.num_timesteps == 30
    assert (counter.calls, counter.started, counter.ended) == (30, True, True)
    # the progress bar's last state: a line through the dql_agent logger when stdout is not a terminal
    assert "30/30" in capsys.readouterr().out + caplog.text

    evaluations = np.load(tmp_path / "eval" / "evaluations.npz")
    assert list(evaluations["timesteps"]) == [10, 20, 30]
    assert evaluations["ep_lengths"].tolist() == [[EPISODE]] * 3
    assert_pendulum_returns(evaluations["results"])
    best = case.cls.load(tmp_path / "best" / "best_model", device="cpu")
    assert type(best) is case.cls and best.num_timesteps in (10, 20, 30)

    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["rl_model_15_steps.zip", "rl_model_30_steps.zip"]
    for steps in (15, 30):
        loaded = case.cls.load(tmp_path / "ckpt" / f"rl_model_{steps}_steps.zip", device="cpu")
        assert loaded.num_timesteps == steps and loaded.config == model.config

    with open(tmp_path / "log" / "progress.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows and all(key in rows[0] for key in case.algorithm.log_keys), list(rows[0])
    critic_losses = [float(row["train/critic_loss"]) for row in rows if row["train/critic_loss"]]
    assert critic_losses and np.all(np.isfinite(critic_losses))


def test_a_callback_returning_false_stops_training(case):
    class StopAt(BaseCallback):
        def _on_step(self) -> bool:
            return self.num_timesteps < 15

    model = case.make()
    stop = StopAt()
    model.learn(50, callback=stop)
    assert model.num_timesteps == 15 and stop.n_calls == 15
    assert model.n_updates == case.updates_by(15)  # on_step runs after the step's updates, the last one too
    model.learn(5, reset_num_timesteps=False)  # stopping leaves the model ready to continue
    assert model.num_timesteps == 20 and model.n_updates == case.updates_by(20)


def test_same_seed_same_weights(case):
    a, b, c = (case.make(seed=seed).learn(15) for seed in (1, 1, 2))
    assert_same_weights(a, b)
    with pytest.raises(AssertionError):
        assert_same_weights(a, c)


# predict and evaluate_policy ---------------------------------------------------------------------
def test_predict_one_observation_a_batch_and_repeats(trained):
    obs = observations()
    action, state = trained.predict(obs[0], deterministic=True)
    assert action.shape == (1,) and action.dtype == np.float32 and state is None
    np.testing.assert_array_equal(trained.predict(obs[0], deterministic=True)[0], action)
    batch, _ = trained.predict(obs, deterministic=True)
    assert batch.shape == (5, 1) and np.all(np.abs(batch) <= 2.0)
    np.testing.assert_array_equal(trained.predict(obs, deterministic=True)[0], batch)
    np.testing.assert_allclose(batch[0], action, atol=1e-6)  # same observation, same action inside a batch
    stochastic = np.stack([trained.predict(obs[0])[0] for _ in range(20)])
    assert stochastic.std() > 0 and np.all(np.abs(stochastic) <= 2.0)

    with pytest.raises(ValueError, match=r"\(obs, info\) tuple"):
        trained.predict((obs[0], {}))
    with pytest.raises(ValueError, match=r"observation has shape \(4,\); expected \(3,\)"):
        trained.predict(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        trained.predict(np.array([np.nan, 0.0, 0.0], np.float32))


def test_dict_observations(case, tmp_path):
    model = case.make(dict_obs=True).learn(15)
    assert isinstance(model.observation_space, spaces.Dict) and list(model.observation_space.spaces) == ["a", "b"]
    env = pendulum_env(dict_obs=True)
    single, _ = env.reset(seed=0)
    action, _ = model.predict(single, deterministic=True)
    assert action.shape == (1,) and np.all(np.abs(action) <= 2.0)
    np.testing.assert_array_equal(model.predict(single, deterministic=True)[0], action)
    batch = {key: np.stack([value, -value, value]) for key, value in single.items()}
    actions, _ = model.predict(batch, deterministic=True)
    assert actions.shape == (3, 1) and np.all(np.abs(actions) <= 2.0)
    np.testing.assert_allclose(actions[[0, 2]], [action, action], atol=1e-6)
    with pytest.raises(ValueError, match="missing key"):
        model.predict({"a": single["a"]})

    returns, lengths = evaluate_policy(model, Monitor(env), n_eval_episodes=1, return_episode_rewards=True)
    assert lengths == [EPISODE]
    assert_pendulum_returns(returns)

    model.save(tmp_path / "dict.zip")
    loaded = case.cls.load(tmp_path / "dict.zip", device="cpu")
    assert list(loaded.observation_space.spaces) == ["a", "b"]
    np.testing.assert_array_equal(loaded.predict(batch, deterministic=True)[0], actions)


def test_evaluate_policy_on_an_env_and_a_vec_env(trained):
    mean, std = evaluate_policy(trained, Monitor(pendulum_env()), n_eval_episodes=2)
    assert_pendulum_returns(mean)
    assert std >= 0

    def seeded_vec_env() -> DummyVecEnv:
        env = DummyVecEnv([lambda: Monitor(pendulum_env())] * 2)
        env.seed(7)
        return env

    returns, lengths = evaluate_policy(trained, seeded_vec_env(), n_eval_episodes=2, return_episode_rewards=True)
    assert lengths == [EPISODE, EPISODE]
    assert_pendulum_returns(returns)
    again, _ = evaluate_policy(trained, seeded_vec_env(), n_eval_episodes=2, return_episode_rewards=True)
    assert again == returns  # deterministic actions on identically seeded envs


# checkpoints -----------------------------------------------------------------------------------
def test_save_and_load_as_a_directory_and_a_zip(case, trained, tmp_path):
    obs = observations()
    expected, _ = trained.predict(obs, deterministic=True)
    for path in (tmp_path / "model", tmp_path / "model.zip"):
        trained.save(path)
        loaded = case.cls.load(path, device="cpu")
        assert type(loaded) is case.cls and type(loaded.policy) is type(trained.policy)
        assert_same_weights(loaded, trained)
        np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], expected)
        assert (loaded.config, loaded.num_timesteps, loaded.seed) == (trained.config, 20, trained.seed)
        assert loaded.metadata == trained.metadata
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert zipfile.is_zipfile(tmp_path / "model.zip")


def test_resume(case, tmp_path):
    """Train N steps, ``save(include_optimizer=True)``, load, re-attach the data, train M more.

    Offline: bit-identical to N + M steps in one go. QVPO's checkpoint holds no replay buffer, and
    the resumed run starts a fresh episode, so it cannot match an uninterrupted run; instead the
    loaded model equals the saved one and two runs resumed from the same step N are identical.
    """
    n, m = 12, 8

    def resumed_run(path: Path) -> BaseAgent:
        first = case.make(seed=3, **case.algorithm.resume_settings).learn(n)
        first.save(path, include_optimizer=True)
        loaded = case.cls.load(path, device="cpu")
        assert_same_training_state(loaded, first)
        case.attach(loaded)
        loaded.learn(m, reset_num_timesteps=False)
        assert loaded.num_timesteps == n + m and loaded.n_updates == first.n_updates + m
        with pytest.raises(AssertionError):  # the M steps trained
            assert_same_weights(loaded, first)
        return loaded

    resumed = resumed_run(tmp_path / "a")
    if case.resumes_exactly:
        reference = case.make(seed=3, **case.algorithm.resume_settings).learn(n + m)
    else:
        reference = resumed_run(tmp_path / "b")
    assert_same_weights(reference, resumed)


def test_push_to_hub_and_load_from_hub(case, trained, hub_server):
    url = trained.push_to_hub("user/repo", eval_env=pendulum_env(), n_eval_episodes=1, video=False)
    repo = hub_server.repos["user/repo"]
    head = repo.commits[repo.branches["main"]]
    assert url.endswith(head.oid)
    assert {"config.json", "model.safetensors", "README.md", "results.json"} <= set(head.files)
    assert "replay.mp4" not in head.files
    results = json.loads(head.files["results.json"])
    assert results["env_id"] == ENV_ID and results["n_eval_episodes"] == 1
    assert_pendulum_returns(results["mean_reward"])
    assert f'{case.name}.load_from_hub("user/repo")' in head.files["README.md"].decode()

    loaded = dql_agent.load_from_hub("user/repo", device="cpu")
    assert type(loaded) is case.cls
    obs = observations()
    np.testing.assert_array_equal(
        loaded.predict(obs, deterministic=True)[0], trained.predict(obs, deterministic=True)[0]
    )


# interrupted training ----------------------------------------------------------------------------
def test_ctrl_c_finishes_the_step_and_leaves_a_resumable_checkpoint(case, tmp_path):
    """A SIGINT at step 13 of 20: learn finishes that step, saves, and raises KeyboardInterrupt.
    The checkpoint resumes (exactly, for the offline algorithms)."""
    handler_before = signal.getsignal(signal.SIGINT)
    model = case.make(seed=5)
    with warnings.catch_warnings(record=True) as caught:  # pytest.warns does not check under a KeyboardInterrupt
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            model.learn(20, callback=At(13, ctrl_c), interrupt_checkpoint=tmp_path / "interrupted")
    messages = [str(w.message) for w in caught]
    assert any(f"resumable checkpoint saved to {tmp_path / 'interrupted'}" in m for m in messages), messages
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert model.num_timesteps == 13
    assert model.predict(observations(), deterministic=True)[0].shape == (5, 1)  # still usable

    resumed = case.cls.load(tmp_path / "interrupted", device="cpu")
    assert_same_training_state(resumed, model)
    case.attach(resumed)
    resumed.learn(7, reset_num_timesteps=False)
    assert resumed.num_timesteps == 20
    if case.resumes_exactly:
        assert_same_weights(resumed, case.make(seed=5).learn(20))


def test_callback_error_leaves_a_resumable_checkpoint(case, tmp_path):
    def fail() -> None:
        raise RuntimeError("logger disk full")

    model = case.make(seed=6)
    with pytest.raises(RuntimeError, match="disk full"), pytest.warns(UserWarning, match="resumable checkpoint"):
        model.learn(18, callback=At(12, fail), interrupt_checkpoint=tmp_path / "ckpt")
    resumed = case.cls.load(tmp_path / "ckpt", device="cpu")
    assert_same_training_state(resumed, model)
    assert resumed.num_timesteps == 12
    case.attach(resumed)
    resumed.learn(6, reset_num_timesteps=False)
    assert resumed.num_timesteps == 18
    if case.resumes_exactly:
        assert_same_weights(resumed, case.make(seed=6).learn(18))
