"""Sweeps on a real local Ray (2 CPUs, one session for the module): metrics, recovery, table, CLI;
and the metrics hook they train through (``MetricsCallback``, ``train_seeds``' callbacks).

Datasets are a real ``.npz`` file and a real Minari dataset written here; trials are a few dozen
steps of tiny models on Pendulum. The default suite runs one sweep (two trials, one of which
fails once mid-training); the CLI (interrupted and resumed), seed packing with a worker that
dies, and ASHA are ``slow``. Without the ray extra only the hook's tests run.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback

from dql_agent import DiffusionQL, OfflineBuffer, train_seeds
from dql_agent.integrations.metrics import MetricsCallback
from tests.settings import TINY

ENV = "Pendulum-v1"
MINARI_ID = "sweeptest/pendulum/mixed-v0"
HP = {**TINY, "n_action_samples": 4}


def sweeps():
    """``dql_agent.integrations.ray``, or skip: the sweep tests need the ray extra."""
    return pytest.importorskip("dql_agent.integrations.ray", reason="needs the ray extra: pip install dql_agent[ray]")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pendulum_arrays):
    """One local Ray for the module; a folder with ``pendulum.npz``, and the Minari store its
    workers read (set before ``ray.init``: they inherit the environment)."""
    sweeps()
    import ray

    root = tmp_path_factory.mktemp("sweep")
    np.savez(root / "pendulum.npz", **pendulum_arrays)
    saved = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root / "minari")
    # This module is not importable in the workers: its callbacks travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root, context.address_info["gcs_address"]
    ray.shutdown()
    if saved is None:
        os.environ.pop("MINARI_DATASETS_PATH")
    else:
        os.environ["MINARI_DATASETS_PATH"] = saved


@pytest.fixture(scope="module")
def minari_dataset(cluster) -> str:
    """A Pendulum Minari dataset with reference scores, in the workers' store."""
    from dql_agent.demo_data import collect_pendulum_episodes
    from dql_agent.integrations.minari import write_minari_dataset

    env = gym.make(ENV)
    episodes = collect_pendulum_episodes(n_good=2, n_noisy=2, seed=1)
    spaces = {"observation_space": env.observation_space, "action_space": env.action_space}
    write_minari_dataset(MINARI_ID, episodes, **spaces, env_id=ENV, ref_min_score=-1200.0, ref_max_score=-150.0)
    return MINARI_ID


class FailOnce(BaseCallback):
    """Fail at ``step`` unless ``marker`` exists (it does on the retry): raise, or kill the worker."""

    def __init__(self, marker: Path, step: int, kill: bool = False) -> None:
        super().__init__()
        self.marker, self.step, self.kill = marker, step, kill

    def _on_step(self) -> bool:
        if self.num_timesteps == self.step and not self.marker.exists():
            self.marker.touch()
            if self.kill:
                os._exit(1)  # the worker process dies: nothing to catch
            raise RuntimeError(f"injected failure at step {self.step}")
        return True


def pendulum_spaces() -> dict:
    env = gym.make(ENV)
    return {"observation_space": env.observation_space, "action_space": env.action_space}


def reference(buffer: OfflineBuffer, steps: int, seed: int = 0, **hp) -> tuple[DiffusionQL, dict[str, float]]:
    """The uninterrupted run, in this process: one learn call, evaluated once at its end."""
    recorder = MetricsCallback(ENV, 0, n_eval_episodes=1, eval_seed=0)
    model = DiffusionQL(buffer, seed=seed, device="cpu", **HP, **hp).learn(steps, callback=recorder, log_interval=0)
    return model, recorder.latest


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):  # a restarted trial adds a file
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(set(points)) for tag, points in found.items()}


def assert_same_weights(a: DiffusionQL, b: DiffusionQL) -> None:
    ours, theirs = a.policy.state_dict(), b.policy.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_evaluating_in_learn_leaves_training_as_it_was(pendulum_buffer):
    """The evaluation acts with fixed noise on its own seeded env: no training RNG is drawn."""
    recorder = MetricsCallback(ENV, 5, n_eval_episodes=1, eval_seed=7)
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **HP).learn(10, callback=recorder, log_interval=5)
    assert_same_weights(model, DiffusionQL(pendulum_buffer, seed=0, device="cpu", **HP).learn(10))
    assert sorted(recorder.records) == [5, 10]
    assert {"train/critic_loss", "train/actor_loss", "eval/mean_reward"} <= set(recorder.records[10])
    assert recorder.evaluate() == {k: v for k, v in recorder.latest.items() if k.startswith("eval/")}  # same episodes


class StopAt(BaseCallback):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def _on_step(self) -> bool:
        return self.num_timesteps < self.step


def test_train_seeds_runs_each_seeds_callbacks_and_evaluates(pendulum_buffer):
    recorders = [MetricsCallback() for _ in range(2)]  # no env of its own: it records what is logged
    evaluated = {"eval_env": ENV, "eval_freq": 5, "n_eval_episodes": 1}
    models = train_seeds(
        pendulum_buffer, [0, 1], 10, device="cpu", log_interval=5, callback=recorders, **evaluated, **HP
    )
    plain = train_seeds(pendulum_buffer, [0, 1], 10, device="cpu", **HP)
    for model, same, recorder in zip(models, plain, recorders, strict=True):
        assert_same_weights(model, same)
        assert sorted(recorder.records) == [5, 10]
        assert {"train/critic_loss", "eval/mean_reward"} <= set(recorder.records[10])
    assert recorders[0].records[10]["eval/mean_reward"] != recorders[1].records[10]["eval/mean_reward"]
    stopped = train_seeds(pendulum_buffer, [0, 1], 10, device="cpu", callback=[StopAt(3), None], **HP)
    assert [m.num_timesteps for m in stopped] == [3, 3]  # one callback's False stops the lockstep


def test_two_trials_report_recover_from_a_failure_bit_for_bit_and_fill_the_table(cluster, monkeypatch):
    root, _ = cluster
    monkeypatch.chdir(root)  # relative dataset and storage paths, as a user writes them
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B without an account: runs written in the trial folders
    monkeypatch.setenv("WANDB_SILENT", "true")
    marker = root / "failed"
    result = sweeps().run_sweep(
        datasets=["pendulum.npz"],
        env=ENV,
        param_space={**HP, "learning_rate": [1e-3, 3e-3]},
        total_timesteps=40,
        eval_every=20,
        eval_episodes=1,
        storage="sweeps",
        name="two",
        max_failures=1,
        tensorboard=True,
        wandb_project="dql-sweep-test",
        # the 3e-3 trial fails between its checkpoints at steps 20 and 40
        callbacks=lambda info: [FailOnce(marker, 30)] if info["hyperparameters"]["learning_rate"] == 3e-3 else [],
        verbose=0,
    )
    assert marker.exists(), "the failure was never injected"
    buffer = OfflineBuffer.from_d4rl("pendulum.npz", **pendulum_spaces())
    assert result.path == root / "sweeps" / "two" and len(result.rows) == 2
    for trial in result.grid:
        assert trial.error is None
        frame, lr = trial.metrics_dataframe, trial.config["hyperparameters"]["learning_rate"]
        assert list(frame["timesteps"]) == [20, 40]  # one report per evaluation, none repeated
        assert np.isfinite(frame[["train/critic_loss", "train/actor_loss", "train/q_mean"]].to_numpy()).all()
        model, final = reference(buffer, 40, learning_rate=lr)
        # the last checkpoint holds exactly the weights of one uninterrupted learn call
        assert_same_weights(DiffusionQL.load(Path(trial.checkpoint.path) / "seed_0", device="cpu"), model)
        (row,) = (r for r in result.rows if r["learning_rate"] == lr)
        assert row["mean_reward_mean"] == final["eval/mean_reward"] == frame["eval/mean_reward"].iloc[-1]
        assert (row["dataset"], row["seeds"], row["timesteps"], row["mean_reward_std"]) == ("pendulum.npz", 1, 40, 0)
        assert row["normalized_score_mean"] is None  # an .npz has no reference scores
        # the trial's TensorBoard has a single run's tags, at every report
        logged = tensorboard_scalars(Path(trial.path) / "tensorboard" / "seed_0")
        assert [step for step, _ in logged["eval/mean_reward"]] == [20, 40]
        assert logged["eval/mean_reward"][-1][1] == pytest.approx(final["eval/mean_reward"])
        assert "train/critic_loss" in logged
        # and W&B holds the reported metrics (one offline run per trial) of the trial that never
        # failed: Tune's WandbLoggerCallback ends a trial's W&B run when the trial fails, and the
        # restarted trial's run came out empty here (README, Sweeps), while TensorBoard kept all
        if lr == 1e-3:
            (record,) = Path(trial.path).glob("wandb/offline-run-*/run-*.wandb")
            assert record.read_bytes().count(b"eval/mean_reward") >= 2
    best = max(result.rows, key=lambda r: r["mean_reward_mean"])
    assert result.best == {"pendulum.npz": best} and best["best"]
    with (result.path / "results.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [float(r["mean_reward_mean"]) for r in rows] == [r["mean_reward_mean"] for r in result.rows]
    assert result.markdown == (result.path / "results.md").read_text()
    assert f"{best['mean_reward_mean']:.1f} ± 0.0 | **best** |" in result.markdown


def test_a_spec_is_checked_before_ray_runs_anything(tmp_path):
    SweepSpec = sweeps().SweepSpec
    spec = tmp_path / "spec.yaml"
    spec.write_text("datasets: [a.npz]\nparam_space: {etaa: [1.0]}\n")
    with pytest.raises(ValueError, match=r"\['etaa'\] are not dql hyperparameters"):
        SweepSpec.from_yaml(spec)
    spec.write_text("datasets: [a.npz]\nsteps: 10\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['steps'\]"):
        SweepSpec.from_yaml(spec)
    with pytest.raises(ValueError, match="pack_seeds"):
        SweepSpec(datasets=["a.npz"], algo="dice", pack_seeds=True)
    with pytest.raises(ValueError, match="scheduler"):
        SweepSpec(datasets=["a.npz"], scheduler="hyperband")
    spec.write_text("datasets: [data/a.npz]\nseeds: [0, 1]\n")
    assert SweepSpec.from_yaml(spec).root == str(tmp_path)  # its relative paths: against its folder


def test_without_ray_the_error_names_the_extra(monkeypatch):
    sweeps()
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "dql_agent.integrations.ray")
    with pytest.raises(ImportError, match=r"pip install dql_agent\[ray\]"):
        __import__("dql_agent.integrations.ray")


def sweep_cli(*args: str, cwd: Path) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "dql-agent"), "sweep", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_cli_sweep_stopped_with_ctrl_c_resumes_and_prints_the_table(cluster, minari_dataset, tmp_path):
    """``dql-agent sweep`` joins the running Ray, is stopped by Ctrl-C after a checkpoint,
    continues with --resume, prints the table, and ends where an uninterrupted run ends."""
    _, address = cluster
    spec = f"datasets: [{minari_dataset}]\nseeds: [3]\ntotal_timesteps: 100\neval_every: 10\neval_episodes: 1\n"
    (tmp_path / "spec.yaml").write_text(spec + "storage: out\nname: cli\nparam_space: " + str(HP).replace("'", ""))
    folder = tmp_path / "out" / "cli"
    first = sweep_cli("spec.yaml", "--address", address, "--verbose", "0", cwd=tmp_path)
    deadline = time.time() + 180
    while not list(folder.glob("trial_*/checkpoint_000001")) and time.time() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=120)
    assert "--resume" in out, out  # it says how to continue
    assert first.returncode == 130, out  # stopped, not finished: as train exits on Ctrl-C
    resumed = sweep_cli("spec.yaml", "--address", address, "--resume", "--verbose", "0", cwd=tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"| {minari_dataset} |" in out and str(folder) in out and "normalized score" in out
    checkpoint = sorted(folder.glob("trial_*/checkpoint_*"))[-1]
    model = DiffusionQL.load(checkpoint / "seed_3", device="cpu")
    assert model.num_timesteps == 100
    assert_same_weights(model, reference(OfflineBuffer.from_minari(minari_dataset), 100, seed=3)[0])


@pytest.mark.slow
def test_packed_seeds_survive_a_dead_worker_and_report_per_seed(cluster, minari_dataset, monkeypatch):
    root, _ = cluster
    monkeypatch.chdir(root)
    marker = root / "killed"
    result = sweeps().run_sweep(
        datasets=[minari_dataset],
        seeds=[0, 1],
        pack_seeds=True,
        param_space=HP,
        total_timesteps=30,
        eval_every=10,
        eval_episodes=1,
        storage="sweeps",
        name="packed",
        callbacks=lambda info: [FailOnce(marker, 15, kill=True)] if info["seed"] == 1 else [],
        verbose=0,
    )
    assert marker.exists()
    (trial,) = result.grid
    frame = trial.metrics_dataframe
    assert list(frame["timesteps"]) == [10, 20, 30]
    per_seed = [frame[f"seed_{s}/eval/normalized_score"].iloc[-1] for s in (0, 1)]
    assert frame["eval/normalized_score"].iloc[-1] == pytest.approx(np.mean(per_seed))
    (row,) = result.rows
    assert row["seeds"] == 2 and row["normalized_score_mean"] == pytest.approx(np.mean(per_seed))
    assert row["normalized_score_std"] == pytest.approx(np.std(per_seed))
    uninterrupted = train_seeds(OfflineBuffer.from_minari(minari_dataset), [0, 1], 30, device="cpu", **HP)
    for seed, model in zip([0, 1], uninterrupted, strict=True):
        assert_same_weights(DiffusionQL.load(Path(trial.checkpoint.path) / f"seed_{seed}", device="cpu"), model)


@pytest.mark.slow
def test_asha_stops_the_weak_configurations_early(cluster, monkeypatch):
    root, _ = cluster
    monkeypatch.chdir(root)
    # A few steps barely move the returns; the critic's loss tells the learning rates apart at once.
    # The weak ones start when a slot frees, so they meet both strong ones' results at the first rung.
    result = sweeps().run_sweep(
        datasets=["pendulum.npz"],
        env=ENV,
        param_space={**HP, "critic_learning_rate": [1e-2, 1e-3, 1e-6, 1e-7]},  # the strong ones run first
        total_timesteps=40,
        eval_every=10,
        eval_episodes=1,
        scheduler={"asha": {"reduction_factor": 2}},
        metric="train/critic_loss",
        mode="min",
        storage="sweeps",
        name="asha",
        verbose=0,
    )
    lengths = sorted(int(trial.metrics_dataframe["timesteps"].iloc[-1]) for trial in result.grid)
    assert lengths[-1] == 40 and lengths[0] < 40, lengths
