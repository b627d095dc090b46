"""The 2-D bandit of the Diffusion-QL paper (Fig. 1): Q-learning picks the best of four modes.

Data: 10,000 actions around (+-0.8, +-0.8) (std 0.05), state 0, rewards N(3, .5) at (-0.8, 0.8),
N(0, .5) at (-0.8, -0.8), N(1.5, .5) at (0.8, 0.8) and N(5, .5) at (0.8, -0.8). Settings of the
official toy script: hidden 128, time embedding 4, batch 100, no gradient clipping.

Calibration (measured here with the official toy agent, `toy_experiments/ql_diffusion.py`, T=5,
eta=2.5, 1000 steps): 93% of its samples lie within 0.3 of the best mode, most of them at the
clamp corner (1, -1) just beyond it, so "at the best mode" means within 0.3 here. Diffusion BC
with T=50 needs about 15k steps (official `bc_diffusion.py`: 19-24% per mode within 0.3).
"""

import numpy as np
import pytest
import torch

from dql_agent import DiffusionQL
from tests.settings import BANDIT_BEST, BANDIT_MEAN_REWARDS, BANDIT_MODES, bandit_buffer  # noqa: F401

MODES, MEAN_REWARDS, BEST = BANDIT_MODES, BANDIT_MEAN_REWARDS, BANDIT_BEST
TOY = {"hidden_dim": 128, "time_dim": 4, "batch_size": 100, "grad_norm": None}


def mode_shares(model: DiffusionQL, radius: float = 0.3, n: int = 1000) -> np.ndarray:
    """Fraction of the actor's samples within ``radius`` of each mode."""
    with torch.no_grad():
        samples = model.actor.sample(torch.zeros(n, 1), torch.Generator().manual_seed(1)).numpy()
    distance = np.linalg.norm(samples[:, None, :] - MODES[None], axis=-1)
    nearest, close = distance.argmin(1), distance.min(1) < radius
    return np.array([np.mean((nearest == k) & close) for k in range(4)])


def train(eta: float, steps: int, diffusion_steps: int, seed: int) -> DiffusionQL:
    model = DiffusionQL(bandit_buffer(), seed=seed, device="cpu", eta=eta, diffusion_steps=diffusion_steps, **TOY)
    return model.learn(steps)


def test_diffusion_ql_concentrates_on_the_best_mode():
    shares = mode_shares(train(eta=2.5, steps=1000, diffusion_steps=5, seed=0))
    assert shares[BEST] > 0.8, shares
    assert shares[:BEST].sum() < 0.05, shares


def assert_all_four_modes(shares: np.ndarray) -> None:
    assert shares.sum() > 0.4, shares
    assert shares.min() > 0.06, shares  # every mode is there...
    assert shares[BEST] < 0.4, shares  # ...and the best one does not dominate


@pytest.mark.slow  # a 25 s learning check; the Q-learning bandit test stays in the default suite
def test_diffusion_bc_reproduces_all_four_modes():
    """T=5, 3,000 steps (~30 s): measured shares 0.110, 0.133, 0.101, 0.133 with seed 1 (seed 2:
    0.082, 0.062, 0.091, 0.077). The paper's T=50 runs in the slow test below."""
    assert_all_four_modes(mode_shares(train(eta=0.0, steps=3000, diffusion_steps=5, seed=1)))


@pytest.mark.slow
def test_full_bandit_at_the_papers_settings():
    """T=50 for both halves, as in the paper's figure.

    The official toy agent at these settings (T=50, eta=2.5, 3000 steps) put 84.8% of its samples
    within 0.3 of the best mode (measured here); this implementation 81.4% with seed 0.
    """
    ql = mode_shares(train(eta=2.5, steps=3000, diffusion_steps=50, seed=0))
    assert ql[BEST] > 0.75, ql
    assert ql[:BEST].sum() < 0.05, ql
    # BC at T=50 needs ~15k steps to cover the modes (the official bc_diffusion: 19-24% per mode
    # within 0.3 at 15k); ~2 min here.
    assert_all_four_modes(mode_shares(train(eta=0.0, steps=15_000, diffusion_steps=50, seed=1)))
    bc = mode_shares(train(eta=0.0, steps=40_000, diffusion_steps=50, seed=0), radius=0.2)
    assert bc.min() > 0.15, bc
