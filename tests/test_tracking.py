"""Experiment logging that users already have: TensorBoard through SB3's logger, and Weights & Biases
through its own SB3 integration (``wandb.integration.sb3.WandbCallback``), offline, with real runs.
Both come with ``pip install dql_agent[tracking]``."""

from __future__ import annotations

import os
from pathlib import Path

from dql_agent import DiffusionQL
from tests.settings import tiny


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return found


def test_tensorboard_gets_the_losses_at_every_log_interval(pendulum_buffer, tmp_path):
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", tensorboard_log=str(tmp_path / "tb"), **tiny())
    model.learn(30, log_interval=10)
    logged = scalars(tmp_path / "tb")
    assert [step for step, _ in logged["train/critic_loss"]] == [10, 20, 30]
    assert {"train/actor_loss", "train/bc_loss", "time/fps"} <= set(logged)
    assert all(value == value for _, value in logged["train/actor_loss"])  # no NaN


def test_wandb_offline_run_with_the_sb3_callback(pendulum_buffer, tmp_path, monkeypatch):
    import wandb  # the tracking extra, which the test set-up installs
    from wandb.integration.sb3 import WandbCallback

    monkeypatch.setenv("WANDB_SILENT", "true")
    # offline: no account, no network, the run written locally (explicit: wandb keeps the settings
    # of the first run in the process, and another test may have started one)
    run = wandb.init(project="dql-agent-test", dir=str(tmp_path), sync_tensorboard=True, mode="offline")
    try:
        model = DiffusionQL(
            pendulum_buffer, seed=0, device="cpu", tensorboard_log=str(tmp_path / "runs" / run.id), **tiny()
        )
        callback = WandbCallback(model_save_path=str(tmp_path / "models" / run.id), model_save_freq=20, verbose=0)
        model.learn(40, log_interval=10, callback=callback)
    finally:
        run.finish()
    # the offline run holds the SB3 logger's scalars, synced from TensorBoard ...
    (record,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    content = record.read_bytes()
    for key in (b"train/critic_loss", b"train/actor_loss", b"time/fps"):
        # W&B's TensorBoard sync polls the event file, so the rows it has read by finish() vary
        assert content.count(key) >= 1, key
    # ... and the callback's checkpoint, which is one of ours and loads
    saved = tmp_path / "models" / run.id / "model.zip"
    assert DiffusionQL.load(saved).num_timesteps == 40
    assert os.path.getsize(saved) > 0
