"""Adding an algorithm is one file and one import: the steps of docs/ARCHITECTURE.md, done here
with a toy, diffusion behaviour cloning (a Diffusion-QL without critics), defined in this file.

The class statement registers it (in a copy of the registry, undone after each test); everything
else (learn with SB3 callbacks, predict, save/load, the generic Hub loader, the CLI's lookup,
evaluate_policy, export) comes from the base classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from stable_baselines3.common.evaluation import evaluate_policy

import dql_agent
from dql_agent.base import BaseAgent
from dql_agent.config import AgentConfig, check_field
from dql_agent.diffusion import GaussianDiffusion
from dql_agent.networks import NoiseMLP, optimize
from dql_agent.policy import PolicyBase
from dql_agent.registry import Paper, algorithm_class, algorithms_by_short_name
from tests.settings import TINY


# 1. The config: the shared fields come from AgentConfig; declare only your own.
@dataclass(frozen=True)
class ToyBCConfig(AgentConfig):
    learning_rate: float = 1e-3
    """Adam learning rate of the denoiser."""

    def check(self) -> None:
        super().check()
        check_field(self.learning_rate > 0, "learning_rate", "> 0", self.learning_rate)


# 2. The policy: its networks, and how acting scores the N candidates (here: all equal, so the
#    argmax keeps the first and a stochastic pick draws uniformly).
class ToyBCPolicy(PolicyBase):
    config: ToyBCConfig

    def __init__(self, observation_space: Any, action_space: Any, config: ToyBCConfig):
        super().__init__(observation_space, action_space, config)
        denoiser = NoiseMLP(self.feature_dim, self.action_dim, config.hidden_dim, config.n_hidden, config.time_dim)
        self.actor = GaussianDiffusion(denoiser, self.action_dim, config.diffusion_steps, config.beta_schedule)

    def score_candidates(self, observations: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = noise.shape[1] // observations.shape[0]
        candidates = self.actor.sample(observations, noise=noise, n_samples=n)
        return candidates, torch.zeros(observations.shape[0], n, device=candidates.device)


PAPER = Paper(
    method_name="diffusion BC",
    title="A toy for the test suite",
    short_citation="dql_agent's tests",
    url="https://example.invalid/toy",
    method="Behaviour cloning with a diffusion model.",
    bibtex="@misc{toy}",
)


# 3. The agent: the class statement registers it; at most four hooks (an offline one needs two).
def define_toy_algorithm() -> type[BaseAgent]:
    class ToyBC(BaseAgent, algorithm="ToyBC", short_name="toybc", paper=PAPER):
        config_class, policy_class = ToyBCConfig, ToyBCPolicy
        config: ToyBCConfig
        policy: ToyBCPolicy

        def __init__(self, buffer: Any = None, env: Any = None, **kwargs: Any):
            super().__init__(buffer, env, **kwargs)
            self.optimizer = torch.optim.Adam(self.policy.actor.parameters(), lr=self.config.learning_rate)

        def train_step(self) -> dict[str, torch.Tensor]:
            batch = self.sample_batch(self.replay_buffer, self.config.batch_size)
            loss = self.policy.actor.loss(batch.actions, batch.observations, generator=self.generator)
            optimize(self.optimizer, loss, grad_norm=1.0)
            return {"bc_loss": loss.detach()}

        def optimizers(self) -> dict[str, torch.optim.Optimizer]:
            return {"optimizer": self.optimizer}

    return ToyBC


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> type[BaseAgent]:
    monkeypatch.setattr(dql_agent.registry, "ALGORITHMS", dict(dql_agent.registry.ALGORITHMS))
    return define_toy_algorithm()


def test_the_class_statement_registers_it_for_every_front_end(toy):
    assert algorithm_class("ToyBC") is toy and algorithms_by_short_name()["toybc"] is toy
    assert toy.online is False and not toy.presets and not toy.stackable


def test_it_trains_acts_saves_loads_and_exports_through_the_base_classes(toy, pendulum_buffer, tmp_path):
    model = toy(pendulum_buffer, env="Pendulum-v1", seed=0, device="cpu", **TINY).learn(30, log_interval=10)
    assert model.num_timesteps == 30 and model.n_updates == 30
    obs = pendulum_buffer.observations[:4].numpy()
    actions, _ = model.predict(obs, deterministic=True)
    assert actions.shape == (4, 1) and np.all(np.abs(actions) <= 2.0)
    model.save(tmp_path / "toy", include_optimizer=True)
    loaded = dql_agent.load_from_hub(tmp_path / "toy", device="cpu")  # picks the class from config.json
    assert type(loaded) is toy
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], actions)
    mean, _ = evaluate_policy(loaded, model.get_env(), n_eval_episodes=1)
    assert np.isfinite(mean)
    loaded.set_buffer(pendulum_buffer)
    loaded.learn(5, reset_num_timesteps=False)  # resumes with its optimizer state
    assert loaded.num_timesteps == 35
    path = model.export(tmp_path / "toy.pt2")
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        exported = program(torch.as_tensor(obs)).numpy()
    np.testing.assert_allclose(exported, actions, atol=1e-5)


def test_a_second_class_under_a_taken_name_is_refused(toy):
    with pytest.raises(ValueError, match="registers as algorithm='ToyBC'.*already uses"):

        class Impostor(BaseAgent, algorithm="ToyBC", short_name="impostor"):  # noqa: F841
            pass
