"""Several seeds in one process: each stacked replica follows its own separate run."""

from __future__ import annotations

import pytest
import torch

from dql_agent import DiffusionQL, OfflineBuffer
from dql_agent.seeds import SeedStack, train_seeds
from tests.settings import TINY

SEEDS = [3, 7, 11]
# EMA from the first step and every step, so the EMA path is exercised in a few steps.
EVERY_STEP = {**TINY, "ema_start_step": 0, "ema_update_every": 1}
ATOL = 1e-5  # batched vs unbatched matmuls round differently; measured differences are ~5e-8


def separate(buffer: OfflineBuffer, seed: int, steps: int, **hp) -> DiffusionQL:
    return DiffusionQL(buffer, seed=seed, device="cpu", **hp).learn(steps, log_interval=0)


def assert_same_weights(a: DiffusionQL, b: DiffusionQL, atol: float = ATOL) -> None:
    ours, theirs = a.policy.state_dict(), b.policy.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=atol, rtol=0, equal_nan=True, msg=name)


def assert_same_rngs(a: DiffusionQL, b: DiffusionQL) -> None:
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert torch.equal(a.coin_generator.get_state(), b.coin_generator.get_state())


def bandit_buffer(buffer: OfflineBuffer) -> OfflineBuffer:
    """Every row terminal: the TD target is the reward and its chain is skipped."""
    n = len(buffer)
    return buffer.replace(terminals=torch.ones(n, dtype=torch.bool), timeouts=torch.zeros(n, dtype=torch.bool))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"max_q_backup": True, "n_max_q_samples": 3},
        {"eta": 0.0},  # pure diffusion BC: no actor chain, no coin
        {"lr_decay": True, "lr_decay_steps": 4},
        {"critic_layer_norm": True},
        "bandit",
    ],
    ids=["default", "max_q_backup", "eta0", "lr_decay", "critic_layer_norm", "bandit"],
)
def test_each_replica_follows_its_separate_run(pendulum_buffer, extra):
    buffer = pendulum_buffer
    if extra == "bandit":
        buffer, extra = bandit_buffer(buffer), {}
    hp = {**EVERY_STEP, **extra}
    models = train_seeds(buffer, SEEDS, 3, device="cpu", log_interval=0, **hp)
    assert [m.seed for m in models] == SEEDS
    for seed, model in zip(SEEDS, models, strict=True):
        reference = separate(buffer, seed, 3, **hp)
        assert model.num_timesteps == model.n_updates == 3
        assert_same_rngs(model, reference)  # same draws, in the same order
        assert_same_weights(model, reference)  # actor, EMA actor, critics and targets
        for net in ("actor_optimizer", "critic_optimizer"):
            ours, theirs = model.optimizers()[net], reference.optimizers()[net]
            assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"])
            for p, q in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"], strict=True):
                assert int(ours.state[p]["step"]) == int(theirs.state[q]["step"]) == 3
                torch.testing.assert_close(ours.state[p]["exp_avg"], theirs.state[q]["exp_avg"], atol=ATOL, rtol=0)
    # the replicas are independent: not the same network three times
    first, second = (m.policy.state_dict()["actor.denoiser.output_layer.weight"] for m in models[:2])
    assert not torch.allclose(first, second)


def test_gradients_are_clipped_per_replica(pendulum_buffer):
    # A tiny grad_norm clips every step; with gradients that small Adam's eps makes the step
    # proportional to the clipped gradient, so a norm over all replicas would show (by ~1e-3).
    hp = {**EVERY_STEP, "grad_norm": 1e-7, "learning_rate": 1e-2, "critic_learning_rate": 1e-2}
    models = train_seeds(pendulum_buffer, SEEDS, 2, device="cpu", log_interval=0, **hp)
    for seed, model in zip(SEEDS, models, strict=True):
        reference = separate(pendulum_buffer, seed, 2, **hp)
        assert_same_weights(model, reference)
        start = DiffusionQL(pendulum_buffer, seed=seed, device="cpu", **hp)
        moved = model.critic.q.weights[0] - start.critic.q.weights[0]
        assert moved.abs().max() > 100 * ATOL  # the check above is not vacuous


def test_losses_match_step_by_step(pendulum_buffer):
    hp = EVERY_STEP
    stack = SeedStack([DiffusionQL(pendulum_buffer, seed=s, device="cpu", **hp) for s in SEEDS[:2]])
    references = [DiffusionQL(pendulum_buffer, seed=s, device="cpu", **hp) for s in SEEDS[:2]]
    for _ in range(3):
        losses = stack.train_step()
        assert set(losses) == {"critic_loss", "q_mean", "bc_loss", "q_loss", "actor_loss"}
        for i, reference in enumerate(references):
            expected = reference.train_step()
            reference.num_timesteps += 1
            reference.n_updates += 1
            for key, value in expected.items():
                torch.testing.assert_close(losses[key][i], value, atol=ATOL, rtol=1e-5, msg=key)
    for model, reference in zip(stack.models, references, strict=True):
        assert_same_weights(model, reference)


def poisoned(buffer: OfflineBuffer, seed: int, **hp) -> DiffusionQL:
    """A model whose actor (not its EMA copy) has a NaN weight: the critic step is fine, the actor
    loss is NaN."""
    model = DiffusionQL(buffer, seed=seed, device="cpu", **hp)
    with torch.no_grad():
        model.actor.denoiser.output_layer.bias[0] = float("nan")
    return model


def test_nonfinite_loss_raises_naming_the_seed(pendulum_buffer):
    models = [DiffusionQL(pendulum_buffer, seed=3, device="cpu", **TINY), poisoned(pendulum_buffer, 7, **TINY)]
    with pytest.raises(FloatingPointError, match=r"actor_loss is nan at gradient step 1 of the replica with seed 7"):
        SeedStack(models).train_step()


def test_nonfinite_loss_skip_skips_only_that_replica(pendulum_buffer):
    hp = {**EVERY_STEP, "nonfinite_loss": "skip"}
    stack = SeedStack([DiffusionQL(pendulum_buffer, seed=3, device="cpu", **hp), poisoned(pendulum_buffer, 7, **hp)])
    with pytest.warns(UserWarning, match="seed 7: skipping its batch"):
        stack.learn(2, log_interval=0)
    clean, bad = stack.models
    assert_same_weights(clean, separate(pendulum_buffer, 3, 2, **hp))
    with pytest.warns(UserWarning, match="skipping the batch"):
        reference = poisoned(pendulum_buffer, 7, **hp).learn(2, log_interval=0)
    assert_same_rngs(bad, reference)
    assert_same_weights(bad, reference)  # its critic trained, its actor, EMA and targets did not
    assert int(bad.critic_optimizer.state[bad.critic.q.weights[0]]["step"]) == 2
    assert bad.actor.denoiser.input_layer.weight not in bad.actor_optimizer.state


def test_trained_model_acts_saves_loads_and_resumes(pendulum_buffer, tmp_path):
    models = train_seeds(pendulum_buffer, [0, 1], 3, device="cpu", log_interval=0, **EVERY_STEP)
    first, second = models
    # each model owns its weights now: training one does not touch the other
    before = second.policy.state_dict()["critic.q.weights.0"].clone()
    assert first.critic.q.weights[0].data_ptr() != second.critic.q.weights[0].data_ptr()
    obs = pendulum_buffer.observations[:4].numpy()
    action, _ = first.predict(obs, deterministic=True)
    assert action.shape == (4, 1)
    first.save(tmp_path / "m", include_optimizer=True)
    loaded = DiffusionQL.load(tmp_path / "m", device="cpu")
    again, _ = loaded.predict(obs, deterministic=True)
    assert (again == action).all()
    # the optimizer and RNG state came back too: training on matches one 5-step run
    loaded.set_buffer(pendulum_buffer)
    loaded.learn(2, log_interval=0, reset_num_timesteps=False)
    assert loaded.num_timesteps == 5
    assert_same_weights(loaded, separate(pendulum_buffer, 0, 5, **EVERY_STEP))
    assert torch.equal(second.policy.state_dict()["critic.q.weights.0"], before)


def test_losses_go_to_each_models_logger(pendulum_buffer, capsys):
    train_seeds(pendulum_buffer, [0, 1], 2, device="cpu", log_interval=2, verbose=1, **TINY)
    out = capsys.readouterr().out
    assert out.count("critic_loss") == 2 and out.count("n_updates") == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seeds": []}, ValueError, "seeds must hold at least one seed"),
        ({"seeds": [1, 2, 1]}, ValueError, r"seeds must be distinct.*repeated: \[1\]"),
        ({"seeds": [1, 2.5]}, TypeError, r"seeds\[1\] must be an int, got 2.5 \(float\)"),
        ({"seeds": "12"}, TypeError, "seeds must be a sequence of ints, got str"),
        ({"total_timesteps": -1}, ValueError, "total_timesteps must be an int >= 0, got -1"),
        ({"total_timesteps": 2.0}, ValueError, "total_timesteps must be an int >= 0, got 2.0"),
        ({"buffer": None}, TypeError, "buffer must be an OfflineBuffer, got NoneType"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_input_names_the_field(pendulum_buffer, kwargs, error, match):
    args = {"buffer": pendulum_buffer, "seeds": [0, 1], "total_timesteps": 1, "device": "cpu", **TINY, **kwargs}
    with pytest.raises(error, match=match):
        train_seeds(**args)


def test_zero_steps_returns_the_initial_models(pendulum_buffer):
    models = train_seeds(pendulum_buffer, [5], 0, device="cpu", **TINY)
    assert models[0].num_timesteps == 0
    assert_same_weights(models[0], DiffusionQL(pendulum_buffer, seed=5, device="cpu", **TINY), atol=0)


def test_stack_refuses_models_that_differ(pendulum_buffer):
    a = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY)
    b = DiffusionQL(pendulum_buffer, seed=1, device="cpu", **{**TINY, "eta": 0.5})
    with pytest.raises(ValueError, match="models must share one config: the model with seed 0 has"):
        SeedStack([a, b])
    with pytest.raises(ValueError, match="models must hold at least one DiffusionQL"):
        SeedStack([])


def test_benchmark_script_runs(tmp_path):
    import importlib.util
    import json

    module = importlib.import_module("benchmarks.packed_seeds_speed")
    out = tmp_path / "seeds.json"
    argv = ["--seeds", "2", "--seconds", "0.05", "--repeats", "1", "--threads", "1", "--out", str(out)]
    results = module.main(argv)
    assert results["stacked"]["steps_per_s"] > 0 and results["separate"]["steps_per_s"] > 0 and results["ratio"] > 0
    assert json.loads(out.read_text())["machine"]["torch_threads"] == 1
