"""Model selection without the environment (dql_agent.model_selection): episode splits, offline signals,
the selection callback, and SB3's EvalCallback saving a best model our load accepts."""

from __future__ import annotations

import csv
import math
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor

from dql_agent import DiffusionQL, OfflineBuffer, load_from_hub
from dql_agent.model_selection import (
    CRITERIA,
    DEFAULT_CRITERION,
    SIGNALS,
    OfflineSelectionCallback,
    episode_bounds,
    offline_signals,
    split_episodes,
)
from tests.settings import TINY

PENDULUM = gym.make("Pendulum-v1")
PENDULUM_ACTIONS: Any = PENDULUM.action_space  # a Box


def episodes_buffer(lengths: list[int], ends: list[str]) -> OfflineBuffer:
    """Episodes of the given lengths, each ending 'terminal', 'timeout' or '' (unfinished: only
    the last); observation column 0 holds the episode number, column 1 the row number."""
    rows = sum(lengths)
    episode = np.repeat(np.arange(len(lengths)), lengths)
    terminals, timeouts = np.zeros(rows, bool), np.zeros(rows, bool)
    for stop, end in zip(np.cumsum(lengths), ends, strict=True):
        if end == "terminal":
            terminals[stop - 1] = True
        elif end == "timeout":
            timeouts[stop - 1] = True
    obs = np.stack([episode, np.arange(rows), np.zeros(rows)], axis=1).astype(np.float32)
    return OfflineBuffer(
        obs,
        np.random.default_rng(0).uniform(-2, 2, (rows, 1)),
        -np.arange(rows, dtype=np.float32),
        obs + 0.5,
        terminals,
        timeouts,
        observation_space=PENDULUM.observation_space,
        action_space=PENDULUM_ACTIONS,
        metadata={"dataset_id": "test/episodes-v0", "ref_min_score": -1.0},
    )


LENGTHS = [5, 3, 7, 1, 4, 6, 2, 5, 3, 4]
ENDS = ["timeout", "terminal", "timeout", "terminal", "timeout", "timeout", "terminal", "timeout", "timeout", ""]


def episodes_of(buffer: OfflineBuffer) -> list[tuple[int, ...]]:
    """Each episode of ``buffer`` as the tuple of its original row numbers."""
    rows = buffer.observations[:, 1].long().tolist()
    return [tuple(rows[start:stop]) for start, stop in episode_bounds(buffer)]


def test_split_keeps_whole_episodes_is_seeded_and_keeps_spaces_and_metadata():
    buffer = episodes_buffer(LENGTHS, ENDS)
    original = episodes_of(buffer)
    assert len(original) == 10 and original[-1] == tuple(range(36, 40))  # the unfinished run is an episode
    train, validation = split_episodes(buffer, 0.3, seed=1)
    assert (len(episodes_of(train)), len(episodes_of(validation))) == (7, 3)
    assert sorted(episodes_of(train) + episodes_of(validation)) == sorted(original)  # whole, disjoint, all
    assert len(train) + len(validation) == len(buffer)
    for part in (train, validation):
        assert part is not buffer and part.metadata == buffer.metadata
        assert part.observation_space == buffer.observation_space and part.action_space == buffer.action_space
        rows = part.observations[:, 1].long()
        for name in ("actions", "rewards", "next_observations", "terminals", "timeouts"):
            assert torch.equal(getattr(part, name), getattr(buffer, name)[rows]), name

    again = split_episodes(buffer, 0.3, seed=1)[1]
    assert episodes_of(again) == episodes_of(validation)
    others = {tuple(episodes_of(split_episodes(buffer, 0.3, seed=s)[1])) for s in range(2, 8)}
    assert len(others) > 1  # the seed chooses the episodes


@pytest.mark.bad_input("data", "clear error")
@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, math.nan, "0.1", None, True, 0.04, 0.96])
def test_bad_validation_fractions_raise_naming_the_field(fraction):
    buffer = episodes_buffer(LENGTHS, ENDS)  # 10 episodes: 0.04 and 0.96 leave one side empty
    with pytest.raises(ValueError, match="validation_fraction") as error:
        split_episodes(buffer, fraction)
    assert repr(fraction) in str(error.value)


def test_a_single_episode_cannot_be_split():
    with pytest.raises(ValueError, match="validation_fraction.*single episode"):
        split_episodes(episodes_buffer([10], ["timeout"]), 0.5)


def test_split_of_pendulum_data(pendulum_buffer):
    train, validation = split_episodes(pendulum_buffer, 0.25, seed=0)
    assert (len(train), len(validation)) == (600, 200)
    assert len(validation.episode_returns()) == 1 and len(train.episode_returns()) == 3


# signals -----------------------------------------------------------------------------------------
def state_of(model: DiffusionQL) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.policy.state_dict().items()}


def test_signals_are_finite_deterministic_and_change_with_training(pendulum_buffer):
    train, validation = split_episodes(pendulum_buffer, 0.25, seed=0)
    model = DiffusionQL(train, seed=0, device="cpu", **TINY).learn(20)
    first = offline_signals(model, validation)
    assert list(first) == list(SIGNALS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in first.values()), first
    assert first["td_error"] >= 0 and first["bc_loss"] >= 0 and 0 <= first["action_distance"] <= 2
    assert offline_signals(model, validation) == first  # same weights: exactly the same values
    assert offline_signals(model, validation, seed=1) != first  # another subsample of noise
    model.learn(20, reset_num_timesteps=False)
    later = offline_signals(model, validation)
    assert all(later[name] != first[name] for name in ("td_error", "bc_loss", "policy_q")), (first, later)


def test_q_divergence_is_policy_q_over_the_reward_bound(pendulum_buffer):
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY).learn(5)
    signals = offline_signals(model, pendulum_buffer)
    bound = float(model.replay_buffer.rewards.abs().max()) / (1 - model.config.gamma)
    assert signals["q_divergence"] == pytest.approx(abs(signals["policy_q"]) / bound)


def test_signals_are_computed_in_training_units(pendulum_buffer):
    """On the training data, td_error and bc_loss equal the update's own losses on the same rows
    and noise (actions scaled to [-1, 1], observations normalised, rewards transformed)."""
    from dql_agent.buffer import Batch
    from dql_agent.diffusion_ql import critic_loss

    config = {**TINY, "normalize_observations": True, "reward_transform": "cql_antmaze"}
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **config).learn(5)
    signals = offline_signals(model, pendulum_buffer, batch_size=len(pendulum_buffer))
    replay = model.replay_buffer
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, model.config.diffusion_steps, (len(replay),), generator=gen)
    bc_noise = torch.randn((len(replay), 1), generator=gen)
    next_noise = torch.randn((model.config.diffusion_steps, len(replay), 1), generator=gen)
    batch = Batch(
        replay.observations, replay.actions, replay.rewards, replay.next_observations, 1.0 - replay.terminals.float()
    )
    with torch.no_grad():
        td = critic_loss(model.policy, model.config, batch, next_noise)[0] / 2
        bc = model.policy.actor.loss(replay.actions, replay.observations, t=t, noise=bc_noise)
    assert signals["td_error"] == pytest.approx(float(td), rel=1e-5)
    assert signals["bc_loss"] == pytest.approx(float(bc), rel=1e-5)


def test_signals_refuse_a_mismatched_validation_set_or_model(pendulum_buffer):
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY)
    other = OfflineBuffer(np.zeros((4, 5)), np.zeros((4, 1)), np.zeros(4), np.zeros((4, 5)), np.ones(4))
    with pytest.raises(ValueError, match="validation.obs_dim must be 3.*got 5"):
        offline_signals(model, other)
    with pytest.raises(TypeError, match="model must be a DiffusionQL"):
        offline_signals(object(), pendulum_buffer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        offline_signals(model, pendulum_buffer, batch_size=0)


def test_signals_on_camera_observations():
    rng = np.random.default_rng(0)
    n = 48
    space = spaces.Dict({"image": spaces.Box(0, 255, (20, 20, 3), np.uint8), "state": spaces.Box(-5, 5, (2,))})
    obs = {"image": rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8), "state": rng.normal(size=(n, 2))}
    nxt = {"image": rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8), "state": rng.normal(size=(n, 2))}
    timeouts = np.arange(n) % 8 == 7
    buffer = OfflineBuffer(
        obs, rng.uniform(-1, 1, (n, 2)), rng.normal(size=n), nxt, np.zeros(n), timeouts, observation_space=space
    )
    train, validation = split_episodes(buffer, 0.5, seed=0)
    assert validation.has_images and len(validation) == 24
    camera = {**TINY, "batch_size": 8, "cnn_channels": 4, "image_features": 8}
    model = DiffusionQL(train, seed=0, device="cpu", **camera).learn(3)
    signals = offline_signals(model, validation)
    assert all(math.isfinite(v) for v in signals.values()) and offline_signals(model, validation) == signals


# the callback -----------------------------------------------------------------------------------
class Snapshots(BaseCallback):
    """At the selection callback's evaluation steps: the deterministic actions on fixed observations
    and the weights."""

    def __init__(self, every: int, observations: np.ndarray):
        super().__init__()
        self.every, self.observations = every, observations
        self.actions: dict[int, np.ndarray] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every == 0:
            self.actions[self.num_timesteps] = self.model.predict(self.observations, deterministic=True)[0]
            self.weights[self.num_timesteps] = state_of(self.model)  # type: ignore[arg-type]  # ours, not SB3's
        return True


@pytest.fixture(scope="module")
def selected_run(pendulum_arrays, tmp_path_factory):
    """300 steps on 3 of 4 Pendulum episodes, evaluated every 50 by two selection callbacks."""
    folder = tmp_path_factory.mktemp("selection")
    buffer = OfflineBuffer(
        **pendulum_arrays, observation_space=PENDULUM.observation_space, action_space=PENDULUM_ACTIONS
    )
    train, validation = split_episodes(buffer, 0.25, seed=0)
    model = DiffusionQL(train, seed=0, device="cpu", **TINY)
    model.set_logger(configure(str(folder / "log"), ["csv"]))
    before = offline_signals(model, train)
    by_td = OfflineSelectionCallback(validation, "td_error", folder / "best_td", eval_freq=50)
    by_q = OfflineSelectionCallback(validation, "policy_q", folder / "best_q", eval_freq=50)
    snapshots = Snapshots(50, validation.observations[::37].numpy())
    model.learn(300, callback=[by_td, by_q, snapshots], log_interval=100)
    return {
        "model": model,
        "train": train,
        "before": before,
        "callbacks": (by_td, by_q),
        "snapshots": snapshots,
        "folder": folder,
    }


def test_td_error_on_the_training_data_decreases_with_training(selected_run):
    after = offline_signals(selected_run["model"], selected_run["train"])
    assert after["td_error"] < 0.5 * selected_run["before"]["td_error"], (selected_run["before"], after)


def test_callback_records_history_and_logs(selected_run):
    by_td, by_q = selected_run["callbacks"]
    for callback in (by_td, by_q):
        assert [entry["step"] for entry in callback.history] == [50, 100, 150, 200, 250, 300]
        assert all(set(entry) == {"step", *SIGNALS} for entry in callback.history)
    assert by_td.history == by_q.history  # same weights, same signals
    assert by_td.best_value == min(entry["td_error"] for entry in by_td.history)
    assert by_q.best_value == max(entry["policy_q"] for entry in by_q.history)
    with open(selected_run["folder"] / "log" / "progress.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("offline/td_error")]
    logged = {(int(row["time/total_timesteps"] or 0), float(row["offline/td_error"])) for row in rows}
    steps = {step for step, _ in logged}
    assert {entry["step"] for entry in by_td.history} <= steps, logged
    for entry in by_td.history:  # each evaluation dumped at its step
        assert any(v == pytest.approx(entry["td_error"], rel=1e-6) for step, v in logged if step == entry["step"])


def test_callback_saves_the_model_of_its_best_step(selected_run):
    observations = selected_run["snapshots"].observations
    actions = selected_run["snapshots"].actions
    for callback, name in zip(selected_run["callbacks"], ("best_td", "best_q"), strict=True):
        loaded = DiffusionQL.load(selected_run["folder"] / name, device="cpu")
        assert loaded.num_timesteps == callback.best_step
        predicted = loaded.predict(observations, deterministic=True)[0]
        np.testing.assert_array_equal(predicted, actions[callback.best_step])
        weights = selected_run["snapshots"].weights
        for step, state in weights.items():  # the weights of the best step, and of no other
            same = all(torch.equal(value, loaded.policy.state_dict()[key]) for key, value in state.items())
            assert same is (step == callback.best_step), (step, callback.best_step)


def test_callback_does_not_change_training(pendulum_buffer):
    train, validation = split_episodes(pendulum_buffer, 0.25, seed=0)
    plain = DiffusionQL(train, seed=0, device="cpu", **TINY).learn(30)
    watched = DiffusionQL(train, seed=0, device="cpu", **TINY)
    watched.learn(30, callback=OfflineSelectionCallback(validation, eval_freq=10))
    for key, value in state_of(plain).items():
        assert torch.equal(value, watched.policy.state_dict()[key]), key


def test_callback_warns_once_per_q_divergence_crossing(pendulum_buffer):
    train, validation = split_episodes(pendulum_buffer, 0.25, seed=0)
    model = DiffusionQL(train, seed=0, device="cpu", **TINY)
    callback = OfflineSelectionCallback(validation, eval_freq=10, divergence_threshold=1e-12)
    with pytest.warns(RuntimeWarning, match="q_divergence=.*exceeds divergence_threshold=1e-12") as record:
        model.learn(30, callback=callback)
    assert len([w for w in record if "q_divergence" in str(w.message)]) == 1  # three evaluations, one crossing
    assert all(entry["q_divergence"] > 1e-12 for entry in callback.history)

    callback.divergence_threshold = 1e6  # back under the threshold: no warning, the crossing is over
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.evaluate()
    callback.divergence_threshold = 1e-12  # a new crossing warns again
    with pytest.warns(RuntimeWarning, match="q_divergence"):
        callback.evaluate()


@pytest.mark.bad_input("habits", "clear error")
def test_callback_refuses_bad_arguments(pendulum_buffer):
    with pytest.raises(ValueError, match="criterion must be one of") as error:
        OfflineSelectionCallback(pendulum_buffer, criterion="return")
    for name in CRITERIA:
        assert repr(name) in str(error.value)
    assert DEFAULT_CRITERION in CRITERIA
    with pytest.raises(ValueError, match="eval_freq must be an int >= 1, got 0"):
        OfflineSelectionCallback(pendulum_buffer, eval_freq=0)
    with pytest.raises(ValueError, match="divergence_threshold must be a number > 0, got -1"):
        OfflineSelectionCallback(pendulum_buffer, divergence_threshold=-1)
    with pytest.raises(TypeError, match="validation must be an OfflineBuffer"):
        OfflineSelectionCallback(np.zeros(3))  # type: ignore[arg-type]
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY)
    other = OfflineBuffer(np.zeros((4, 5)), np.zeros((4, 1)), np.zeros(4), np.zeros((4, 5)), np.ones(4))
    with pytest.raises(ValueError, match="validation.obs_dim"):
        model.learn(2, callback=OfflineSelectionCallback(other))


# SB3's EvalCallback ----------------------------------------------------------------------------
def test_sb3_eval_callback_best_model_loads(pendulum_buffer, tmp_path):
    model = DiffusionQL(pendulum_buffer, env="Pendulum-v1", seed=0, device="cpu", **TINY)
    eval_env = Monitor(gym.make("Pendulum-v1", max_episode_steps=50))
    callback = EvalCallback(eval_env, n_eval_episodes=1, eval_freq=10, best_model_save_path=str(tmp_path), verbose=0)
    model.learn(20, callback=callback)
    assert callback.best_mean_reward > -math.inf
    best = DiffusionQL.load(tmp_path / "best_model", device="cpu")
    assert best.num_timesteps in (10, 20)
    from_hub = load_from_hub(str(tmp_path / "best_model"), device="cpu")
    assert type(from_hub) is DiffusionQL and from_hub.num_timesteps == best.num_timesteps
    obs = pendulum_buffer.observations[:5].numpy()
    np.testing.assert_array_equal(
        best.predict(obs, deterministic=True)[0], from_hub.predict(obs, deterministic=True)[0]
    )


# the benchmark's statistics ----------------------------------------------------------------------
def load_benchmark():
    import importlib.util

    return importlib.import_module("benchmarks.model_selection_study")


def test_benchmark_spearman_and_regret():
    bench = load_benchmark()
    np.testing.assert_array_equal(bench.rankdata([10, 30, 20, 20]), [1, 4, 2.5, 2.5])  # ties: average ranks
    assert bench.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert bench.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Pearson of the ranks, by hand: ranks (1, 2, 3) and (1, 3, 2) -> 0.5
    assert bench.spearman([1, 2, 3], [5, 9, 7]) == pytest.approx(0.5)
    assert math.isnan(bench.spearman([1, 1, 1], [1, 2, 3]))
    points = [
        {"step": s, "td_error": td, "bc_loss": bc, "policy_q": q, "action_distance": d, "return": r}
        for s, td, bc, q, d, r in [
            (1, 3.0, 0.9, -1.0, 0.5, -100.0),
            (2, 1.0, 0.5, -2.0, 0.4, -10.0),
            (3, 2.0, 0.1, -3.0, 0.3, -50.0),
        ]
    ]
    judged = bench.judge(points)
    assert judged["td_error"]["pick_step"] == 2 and judged["td_error"]["regret"] == 0.0
    assert judged["bc_loss"]["pick_step"] == 3 and judged["bc_loss"]["regret"] == 40.0
    assert judged["policy_q"]["pick_step"] == 1 and judged["policy_q"]["regret"] == 90.0
    assert judged["last"]["regret"] == 40.0 and judged["random"]["regret"] == pytest.approx(-10.0 - (-160.0 / 3))
    assert judged["td_error"]["spearman"] == pytest.approx(1.0)  # -td ranks (1, 3, 2), returns (1, 3, 2)
