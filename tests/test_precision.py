"""Mixed precision (``precision=``): bf16 on the CPU end to end, and fp16's loss scaling through
``optimize`` with torch's real GradScaler (CPU scaler; fp16 models themselves need CUDA,
tests/test_cuda.py)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dql_agent import QVPO, CheckpointError, DiffusionDICE, DiffusionQL, scaling, train_seeds
from dql_agent.networks import optimize
from tests.settings import output_dtypes, tiny


@pytest.mark.parametrize("cls", [DiffusionQL, DiffusionDICE])
def test_bf16_computes_in_bf16_and_keeps_weights_optimizer_and_checkpoint_fp32(cls, pendulum_buffer, tmp_path):
    model = cls(pendulum_buffer, seed=0, device="cpu", **tiny(cls, precision="bf16"))
    seen = output_dtypes(model.policy)
    model.learn(4)
    assert seen and set(seen) == {torch.bfloat16}  # sampler, critics, value nets: all under autocast
    seen.clear()
    action, _ = model.predict(pendulum_buffer.observations[:3].numpy(), deterministic=True)
    assert action.dtype == np.float32 and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.policy.parameters())
    for optimizer in model.optimizers().values():
        for state in optimizer.state.values():
            assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")
    model.save(tmp_path / "m", include_optimizer=True)
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["config"]["precision"] == "bf16"


def test_bf16_resumes_exactly(pendulum_buffer, tmp_path):
    straight = DiffusionQL(pendulum_buffer, seed=1, device="cpu", **tiny(precision="bf16")).learn(10)
    first = DiffusionQL(pendulum_buffer, seed=1, device="cpu", **tiny(precision="bf16")).learn(6)
    first.save(tmp_path / "half", include_optimizer=True)
    resumed = DiffusionQL.load(tmp_path / "half", buffer=pendulum_buffer).learn(4, reset_num_timesteps=False)
    assert resumed.config.precision == "bf16"
    for name, tensor in straight.policy.state_dict().items():
        assert torch.equal(tensor, resumed.policy.state_dict()[name]), name


def test_bf16_moves_training_off_fp32_but_not_far(pendulum_buffer):
    fp32 = DiffusionQL(pendulum_buffer, seed=2, device="cpu", **tiny()).learn(5)
    bf16 = DiffusionQL(pendulum_buffer, seed=2, device="cpu", **tiny(precision="bf16")).learn(5)
    gaps = [(a - b).abs().max() for a, b in zip(fp32.policy.parameters(), bf16.policy.parameters(), strict=True)]
    assert 0 < max(gaps) < 0.05  # it ran in bf16 (not equal) and took the same steps (close)


def test_qvpo_and_stacked_seeds_train_in_bf16(pendulum_buffer):
    qvpo = QVPO("Pendulum-v1", seed=0, device="cpu", **tiny(QVPO, precision="bf16", learning_starts=32)).learn(64)
    assert qvpo.n_updates > 0 and all(torch.isfinite(p).all() for p in qvpo.policy.parameters())
    models = train_seeds(pendulum_buffer, seeds=[0, 1], total_timesteps=3, device="cpu", **tiny(precision="bf16"))
    assert all(m.config.precision == "bf16" and m.n_updates == 3 for m in models)


@pytest.mark.bad_input("config", "clear error")
def test_precision_values_are_checked(pendulum_buffer):
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'fp16'\), got 'fp8'"):
        DiffusionQL(pendulum_buffer, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device .* use precision='bf16'"):
        DiffusionQL(pendulum_buffer, device="cpu", precision="fp16")


# fp16's loss scaling, at the optimizer step -----------------------------------------------------------
def scaled_step(loss_scale: float, hooks: scaling.StepHooks | None) -> tuple[bool, torch.nn.Parameter]:
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    loss = (weight * loss_scale).sum()
    if hooks is None:
        return optimize(optimizer, loss, require_finite=True), weight
    with scaling.use(hooks):
        return optimize(optimizer, loss, require_finite=True), weight


def test_loss_scaling_skips_overflowing_gradients_of_a_finite_loss():
    hooks = scaling.StepHooks(scale_losses=True)
    # 1e35 * 4 is a finite loss; its gradient 1e35 times the scale 2**16 overflows float32
    took, weight = scaled_step(1e35, hooks)
    assert took and torch.equal(weight.detach(), torch.ones(4))  # the scaler's skip: not an error
    assert hooks.skipped_steps == 1
    assert next(iter(hooks.scalers.values())).get_scale() == 2.0**15  # and it lowered the scale
    took, weight = scaled_step(1.0, hooks)  # a normal step goes through, unscaled
    assert took and torch.allclose(weight.detach(), torch.full((4,), 0.9))


def test_without_loss_scaling_a_non_finite_gradient_is_refused_and_a_nan_loss_is_refused_either_way():
    took, weight = scaled_step(1e38, None)  # loss inf already
    assert not took and torch.equal(weight.detach(), torch.ones(4))
    hooks = scaling.StepHooks(scale_losses=True)
    took, weight = scaled_step(float("nan"), hooks)
    assert not took and hooks.skipped_steps == 0  # a NaN loss is the data's problem, not the scale's


@pytest.mark.bad_input("checkpoint", "clear error")
def test_loss_scales_are_saved_and_checked_on_load(pendulum_buffer, tmp_path):
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **tiny()).learn(2)
    scaler = scaling.new_scaler(model.critic_optimizer)
    scaler.load_state_dict({**scaler.state_dict(), "scale": 1024.0, "_growth_tracker": 7})
    model.grad_scalers[id(model.critic_optimizer)] = scaler
    model.save(tmp_path / "m", include_optimizer=True)
    loaded = DiffusionQL.load(tmp_path / "m")
    restored = loaded.grad_scalers[id(loaded.critic_optimizer)]
    assert scaling.scaler_state(restored) == {"scale": 1024.0, "growth_tracker": 7}
    assert id(loaded.actor_optimizer) not in loaded.grad_scalers

    path = tmp_path / "m" / "optimizer.safetensors"
    with safe_open(path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    state = json.loads(metadata["state"])
    for bad, message in (
        (-1.0, r"grad_scalers\['critic_optimizer'\]\['scale'\] must be a finite float > 0, got -1.0"),
        ("big", r"grad_scalers\['critic_optimizer'\]\['scale'\] must be a finite float > 0, got 'big'"),
    ):
        state["grad_scalers"]["critic_optimizer"]["scale"] = bad
        save_file(tensors, path, metadata={**metadata, "state": json.dumps(state)})
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        config["optimizer_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # a consistent save
        (tmp_path / "m" / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            DiffusionQL.load(tmp_path / "m")


def test_a_camera_model_trains_and_acts_in_bf16():
    from benchmarks.precision import camera_buffer

    buffer = camera_buffer(64, size=20)
    model = DiffusionQL(buffer, seed=0, device="cpu", **tiny(precision="bf16", cnn_channels=4, image_features=8))
    seen: list[torch.dtype] = []
    for layer in model.policy.encoder.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(lambda _m, inputs, out: seen.extend([inputs[0].dtype, out.dtype]))
    model.learn(3)
    assert seen and set(seen) == {torch.bfloat16}  # the pixels are scaled in bf16: no float32 copy
    observation = {key: value[0].numpy() for key, value in buffer.observations.items()}
    action, _ = model.predict(observation, deterministic=True)
    assert action.dtype == np.float32 and np.isfinite(action).all()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.policy.parameters())
