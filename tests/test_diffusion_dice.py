"""Diffusion-DICE: config, the update, guided sampling, the 4-mode bandit (the SB3 surface: test_contract.py)."""

import numpy as np
import pytest
import torch

from dql_agent import OfflineBuffer
from dql_agent.diffusion import GaussianDiffusion
from dql_agent.diffusion_dice import (
    DiffusionDICE,
    DiffusionDICEConfig,
    GuidanceNet,
    dice_weight,
    f_star,
    guidance_dual_loss,
)
from dql_agent.networks import NoiseMLP
from tests.settings import BANDIT_BEST as BEST
from tests.settings import BANDIT_MODES as MODES
from tests.settings import TINY_SETTINGS, bandit_buffer

# TINY's sizes, renamed where Diffusion-DICE's fields differ, and every network small.
DICE_TINY = TINY_SETTINGS["DiffusionDICE"]


# config --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha", 0.0),
        ("n_action_samples", 0),
        ("n_noisy_copies", 1.5),
        ("guidance_scale", -1.0),
        ("q_ensemble_size", -1),
        ("behavior_steps", -1),
        ("reward_transform", "iql"),
        ("beta_schedule", "sigmoid"),
        ("tau", 0.0),
        ("time_dim", 5),
        ("selection_temperature", 0.0),
        ("weight_decay", -1e-4),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises((TypeError, ValueError), match=field):
        DiffusionDICEConfig(**{field: value})


def test_config_round_trips_and_rejects_unknown_keys():
    config = DiffusionDICEConfig(alpha=0.1, behavior_steps=None)
    assert DiffusionDICEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown DiffusionDICEConfig key\(s\) \['eta'\]"):
        DiffusionDICEConfig.from_dict({**config.to_dict(), "eta": 1.0})
    # The old name of n_action_samples (config.json files written before the rename) still loads.
    old = {k: v for k, v in config.to_dict().items() if k != "n_action_samples"} | {"n_candidates": 4}
    with pytest.warns(DeprecationWarning, match="'n_candidates' is renamed 'n_action_samples'"):
        assert DiffusionDICEConfig.from_dict(old) == DiffusionDICEConfig(
            alpha=0.1, behavior_steps=None, n_action_samples=4
        )
    with pytest.raises(ValueError, match="pass 'n_action_samples' only, not also its old name 'n_candidates'"):
        DiffusionDICEConfig.from_dict({**config.to_dict(), "n_candidates": 4})
    with pytest.raises(TypeError, match="eta"):
        DiffusionDICE(bandit_buffer(100), device="cpu", eta=1.0)


def test_defaults_follow_the_official_mujoco_run():
    c = DiffusionDICEConfig()
    assert (c.value_learning_rate, c.guidance_learning_rate, c.behavior_learning_rate) == (3e-4, 3e-4, 1e-4)
    assert (c.batch_size, c.behavior_batch_size, c.behavior_steps) == (512, 4096, 600_000)
    assert (c.alpha, c.n_noisy_copies, c.guidance_scale, c.diffusion_steps, c.q_ensemble_size) == (0.5, 16, 4.0, 15, 10)
    assert (c.gamma, c.tau, c.weight_decay, c.reward_transform) == (0.99, 0.005, 1e-4, "iql_locomotion")


# the method's formulas -----------------------------------------------------------------------
def test_f_star_and_weight_are_the_piecewise_dual():
    r = torch.tensor([-2.0, -0.5, 0.0, 1.0, 4.0, -100.0, 1000.0])
    expected_f = torch.tensor([np.exp(-2) - 1, np.exp(-0.5) - 1, 0.0, 1.25, 8.0, np.exp(-100) - 1, 251000.0])
    torch.testing.assert_close(f_star(r), expected_f.float())
    expected_w = torch.tensor([np.exp(-2), np.exp(-0.5), 1.0, 1.5, 3.0, 1e-40, 100.0]).float()
    torch.testing.assert_close(dice_weight(r), expected_w)
    # w is the derivative of f*
    x = torch.tensor([-1.5, -0.2, 0.3, 2.0], requires_grad=True)
    (grad,) = torch.autograd.grad(f_star(x).sum(), x)
    torch.testing.assert_close(grad, dice_weight(x.detach()))


def test_guidance_dual_loss_is_minimised_at_log_mean_weight():
    weight = torch.tensor([[0.2], [3.0], [0.05], [1.0]]).expand(4, 8)  # one a_t shared by 4 clean actions
    energy = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.Adam([energy], lr=0.05)
    for _ in range(500):
        optimizer.zero_grad()
        guidance_dual_loss(weight, energy.expand(4, 8)).backward()
        optimizer.step()
    assert energy.item() == pytest.approx(np.log(weight.mean().item()), abs=0.02)


def test_the_closed_form_guidance_gradient_is_autograds():
    """Acting uses grad_a W written out (exportable); it equals autograd's at random points."""
    torch.manual_seed(0)
    guidance = GuidanceNet(state_dim=3, action_dim=2, hidden_dim=16, n_hidden=3, time_dim=8)
    actions, states = torch.randn(7, 2, requires_grad=True), torch.randn(7, 3)
    t = torch.randint(0, 5, (7,))
    (expected,) = torch.autograd.grad(guidance(actions, t, states).sum(), actions)
    torch.testing.assert_close(guidance.action_gradient(actions.detach(), t, states), expected)


def test_the_sampler_adds_the_guidance_gradient_to_the_score():
    """The shared sampler with ``guidance`` (here a constant grad W = (2, 0)) moves the samples along it."""
    torch.manual_seed(0)
    states = torch.randn(5, 3)

    def grad_w(x: torch.Tensor, step: int) -> torch.Tensor:
        return torch.tensor([2.0, 0.0]).expand_as(x)

    # One reverse step: x_0 = (x_1 - sigma (eps - s sigma grad W)) / sqrt(abar), i.e. the plain
    # sample moved by s sigma^2 / sqrt(abar) grad W (small noise, so the clamp does not bind).
    torch.manual_seed(0)
    one_step = GaussianDiffusion(NoiseMLP(3, 2, 16, 2, 8), 2, n_steps=1, beta_schedule="linear")
    noise = 0.1 * torch.randn(1, 5 * 6, 2)
    with torch.no_grad():
        plain = one_step.sample(states, noise=noise, n_samples=6)
        guided = one_step.sample(states, noise=noise, n_samples=6, guidance=grad_w, guidance_scale=3.0)
    abar = one_step.alphas_cumprod[0]
    shift = torch.tensor([3.0 * 2.0 * (1 - abar) / abar.sqrt(), 0.0])
    torch.testing.assert_close(guided, plain + shift)
    assert not guided.requires_grad and guided.shape == (30, 2)

    # The whole chain: scale 0 is the behaviour model's own sampler; a positive scale moves along grad W.
    diffusion = GaussianDiffusion(NoiseMLP(3, 2, 16, 2, 8), 2, n_steps=4)
    noise = torch.randn(4, 5 * 6, 2)
    with torch.no_grad():
        plain = diffusion.sample(states, noise=noise, n_samples=6)
        unscaled = diffusion.sample(states, noise=noise, n_samples=6, guidance=grad_w, guidance_scale=0.0)
        guided = diffusion.sample(states, noise=noise, n_samples=6, guidance=grad_w, guidance_scale=0.5)
    torch.testing.assert_close(unscaled, plain)
    assert guided[:, 0].mean() > plain[:, 0].mean() + 0.05


# the update ----------------------------------------------------------------------------------
def test_one_train_step_changes_each_network(pendulum_buffer):
    model = DiffusionDICE(pendulum_buffer, seed=0, device="cpu", **DICE_TINY)
    parts = ("behavior", "value", "critic", "critic_target", "q_ensemble", "guidance")
    before = {name: [p.detach().clone() for p in getattr(model.policy, name).parameters()] for name in parts}
    losses = model.train_step()
    for name in parts:
        after = list(getattr(model.policy, name).parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before[name], after, strict=True)), name
    expected = {"bc_loss", "value_loss", "critic_loss", "ensemble_loss", "guidance_loss", "weight_mean"}
    assert expected <= set(losses) and all(torch.isfinite(v) for v in losses.values())


def test_behavior_model_stops_training_after_behavior_steps(pendulum_buffer):
    model = DiffusionDICE(pendulum_buffer, seed=0, device="cpu", behavior_steps=3, **DICE_TINY).learn(3)
    frozen = [p.detach().clone() for p in model.behavior.parameters()]
    losses = model.train_step()
    assert "bc_loss" not in losses
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.behavior.parameters(), strict=True))


def test_iql_locomotion_rewards_scale_by_the_return_range(pendulum_buffer):
    model = DiffusionDICE(pendulum_buffer, seed=0, device="cpu", **DICE_TINY)
    returns = pendulum_buffer.episode_returns()
    scale = 1000.0 / (returns.max() - returns.min())
    torch.testing.assert_close(model.replay_buffer.rewards, pendulum_buffer.rewards * scale)
    one_episode = bandit_buffer(10)  # every one-step episode returns its own reward...
    flat = OfflineBuffer(
        one_episode.observations, one_episode.actions, np.ones(10), one_episode.next_observations, np.ones(10, bool)
    )
    with pytest.raises(ValueError, match="reward_transform"):  # ...and equal returns cannot be scaled
        DiffusionDICE(flat, device="cpu", **DICE_TINY)


# the 4-mode bandit -------------------------------------------------------------------------------
def _distances(actions: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(actions)[:, None, :] - MODES[None], axis=-1)  # (N, 4)


def _bandit_check(model: DiffusionDICE, best_share: float, in_sample_share: float) -> None:
    selected, _ = model.predict(np.zeros((500, 1), np.float32))  # softmax selection
    distance = _distances(selected)
    assert np.mean(distance[:, BEST] < 0.3) > best_share, distance.argmin(1)
    # In-sample: the data lie within 0.15 (3 std) of a mode; so do the selected actions...
    assert np.mean(distance.min(1) < 0.15) > in_sample_share, distance.min(1)
    action, _ = model.predict(np.zeros(1, np.float32), deterministic=True)
    assert _distances(action[None])[0, BEST] < 0.3, action
    # ...while the action a Q-maximising method would pick lies off the data, where Q extrapolates.
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 41), np.linspace(-1, 1, 41)), -1).reshape(-1, 2)
    with torch.no_grad():
        q = model.policy.selection_q(torch.zeros(len(grid), 1), torch.as_tensor(grid, dtype=torch.float32))
    assert _distances(grid[int(q.argmax())][None]).min() > 0.15, grid[int(q.argmax())]


# Differences from the paper's settings, for 2 CPU cores: small networks (hidden 64, Q/V 2 layers,
# W 4 layers), batch 128, M=8 noisy copies, a 4-member Q-ensemble, learning rates 1e-3 (V, Q, W)
# and 2e-3 (behaviour) for 1,500 steps instead of 3e-4 / 1e-4 for 1M / 600k steps. guidance_scale=1,
# the exact score decomposition of the paper (its D4RL runs tune 2-4); rewards untransformed.
BANDIT = {
    "hidden_dim": 64,
    "batch_size": 128,
    "behavior_batch_size": 256,
    "n_noisy_copies": 8,
    "q_ensemble_size": 4,
    "value_learning_rate": 1e-3,
    "guidance_learning_rate": 1e-3,
    "behavior_learning_rate": 2e-3,
    "guidance_scale": 1.0,
    "reward_transform": "none",
}


@pytest.mark.slow  # a 34 s learning check (suite budget); DICE's losses are checked step by step above
def test_bandit_concentrates_on_the_best_mode_with_in_sample_actions(monkeypatch):
    """The paper's toy claim on Diffusion-QL's 4-mode bandit (see test_bandit.py for the data).

    Measured (seed 0, 1,500 steps, ~25 s): 93% of the selected actions within 0.3 of the best
    mode (0.8, -0.8), 98% within 0.15 of a data mode; the learned Q peaks at the clamp corner
    (1, -1) with Q ~ 6 > 5. Diffusion-QL (test_bandit.py's settings) also puts 91% within 0.3 of
    the best mode, but only 3% within 0.15 of any mode: it sits at the corner Q extrapolates to.
    """
    model = DiffusionDICE(bandit_buffer(), seed=0, device="cpu", **BANDIT)

    def no_generated_actions(*args, **kwargs):
        raise AssertionError("training evaluated a network on a generated action")

    with monkeypatch.context() as patch:  # training touches dataset actions (and their noised copies) only
        patch.setattr(GaussianDiffusion, "sample", no_generated_actions)
        model.learn(1500)
    _bandit_check(model, best_share=0.85, in_sample_share=0.9)


@pytest.mark.slow
def test_bandit_at_closer_to_the_papers_settings():
    """Reference value/guidance learning rates (3e-4), M=16, a 10-member Q-ensemble, 16 candidates,
    batch 256, 5,000 steps (~4 min on 2 cores). Measured with seed 0: 95% within 0.3 of the best
    mode, 99% within 0.15 of a data mode."""
    settings = dict(BANDIT, value_learning_rate=3e-4, guidance_learning_rate=3e-4, n_noisy_copies=16)
    settings.update(q_ensemble_size=10, batch_size=256, behavior_learning_rate=1e-3)
    model = DiffusionDICE(bandit_buffer(seed=1), seed=1, device="cpu", **settings).learn(5000)
    _bandit_check(model, best_share=0.9, in_sample_share=0.95)


# selection and checkpoints without a Q-ensemble -----------------------------------------------
def test_without_q_ensemble_selection_uses_the_first_target_head(pendulum_buffer, tmp_path):
    model = DiffusionDICE(pendulum_buffer, seed=0, device="cpu", **dict(DICE_TINY, q_ensemble_size=0)).learn(2)
    assert model.q_ensemble is None and "ensemble_optimizer" not in model.optimizers()
    obs, act = torch.zeros(4, 3), torch.zeros(4, 1)
    torch.testing.assert_close(model.policy.selection_q(obs, act), model.critic_target(obs, act)[0])
    model.save(tmp_path / "m", include_optimizer=True)
    assert DiffusionDICE.load(tmp_path / "m", device="cpu").q_ensemble is None
