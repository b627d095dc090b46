"""Diffusion-DICE: in-sample diffusion guidance for offline RL, guide-then-select.

Paper: Mao, Xu, Zhang, Zhan, Zhang, "Diffusion-DICE: In-Sample Diffusion Guidance for Offline
Reinforcement Learning", NeurIPS 2024, https://arxiv.org/abs/2407.20109. Defaults follow the
official code's D4RL MuJoCo runs (``configs/mujoco.yaml`` and its CLI defaults; see
reference/qvpo_and_dice.md section B).

Three parts, all trained on dataset actions only (nothing is ever evaluated on a generated
action during training):

1. a behaviour diffusion model pi_D(a | s), the eps-MSE loss of :class:`GaussianDiffusion`;
2. DICE values with the piecewise f-divergence dual: r = (min Q_targ(s, a) - V(s)) / alpha,
   L_V = E[f*(r) + V(s) / alpha] with f*(r) = r^2/4 + r (r >= 0), exp(min(r, 1)) - 1 (r < 0);
   twin Q (and a Q-ensemble for selection) regress r + gamma (1 - d) V(s'); the optimal
   distribution ratio is w(s, a) = f*'(r) = r/2 + 1 (r >= 0), e^r (r < 0), clamped to [1e-40, 100];
3. a guidance network W(s, a_t, t) trained with the exp-dual loss E[w e^{-W} + W] over noised
   dataset actions, whose minimiser is W = log E[w(s, a_0) | a_t, s].

Acting adds ``guidance_scale * grad_a W`` to the behaviour score at every reverse step (the
shared sampler's guidance, :meth:`GaussianDiffusion.sample`), draws ``n_action_samples`` actions
per state and keeps one by Q: the argmax of the Q-ensemble mean (``deterministic=True``) or a
softmax draw.

Differences from the official code, all forced by the shared core: the behaviour model is the
library's discrete DDPM (``diffusion_steps`` ancestral steps of the 'vp' schedule, x0 clamped to
[-1, 1]) around ``NoiseMLP`` rather than a continuous VP-SDE score U-Net sampled with
DPM-Solver++; the MLPs are :class:`EnsembleMLP` (Mish) rather than ReLU/SiLU nets, and V has no
LayerNorm; the behaviour model trains in the same ``learn`` loop (for its first
``behavior_steps`` updates) instead of in a separate pre-training script.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from gymnasium import spaces
from torch import nn

from dql_agent.base import BaseAgent
from dql_agent.buffer import OfflineBuffer
from dql_agent.config import AgentConfig, OfflineDataConfig, bounded, check_field, is_int
from dql_agent.diffusion import GaussianDiffusion
from dql_agent.networks import Critic, EnsembleMLP, NoiseMLP, SinusoidalEmbedding, SoftUpdate, optimize
from dql_agent.policy import PolicyBase
from dql_agent.registry import Paper

WEIGHT_MIN, WEIGHT_MAX = 1e-40, 100.0  # clamp of the ratio w, as in the official code
ENERGY_FLOOR = -80.0  # W below this no longer grows e^{-W} in the dual loss (official constant)


@dataclass(frozen=True)
class DiffusionDICEConfig(OfflineDataConfig, AgentConfig):
    """Hyperparameters of Diffusion-DICE. Defaults reproduce the official D4RL MuJoCo run."""

    renamed: ClassVar[dict[str, str]] = {"n_candidates": "n_action_samples"}

    value_learning_rate: float = 3e-4
    """AdamW learning rate of V, the twin Q and the Q-ensemble (official `value_lr`)."""
    guidance_learning_rate: float = 3e-4
    """AdamW learning rate of the guidance network W (official `wt_lr`)."""
    behavior_learning_rate: float = 1e-4
    """Adam learning rate of the behaviour diffusion model (official pre-training script)."""
    weight_decay: float = 1e-4
    """AdamW weight decay of V, Q, the Q-ensemble and W (official `--weight_decay`)."""
    batch_size: int = 512
    """Transitions per value/guidance step (official `--batch_size`)."""
    behavior_batch_size: int = bounded(4096, 1_048_576)
    """Transitions per behaviour-model step (official pre-training batch)."""
    behavior_steps: int | None = 600_000
    """The behaviour model trains during the first this many updates (official: 600 epochs x 1000
    steps of pre-training); None trains it at every update."""
    alpha: float = 0.5
    """DICE regularisation strength: r = (Q - V) / alpha (official `--alpha`, set per task)."""
    n_noisy_copies: int = bounded(16, 10_000)
    """Noisy copies M of each dataset action in the guidance loss (official `M`: 16 MuJoCo, 32 AntMaze)."""
    guidance_scale: float = 4.0
    """Scale s of grad W added to the behaviour score (official: 4.0 medium/medium-replay,
    2.0 medium-expert; AntMaze 1.0-4.0)."""
    diffusion_steps: int = 15
    """Reverse steps T of the behaviour model (official: 15 DPM-Solver steps)."""
    q_ensemble_size: int = bounded(10, 1_000)
    """Members of the Q-ensemble used to select among candidates (official `q_ensemble_num`: 10
    MuJoCo, 0 AntMaze); 0 selects with the first target Q head instead."""
    n_action_samples: int = 16
    """Guided samples per observation when acting, one kept by Q (official `--inference_sample`,
    default 1, which its README asks to set per task; 16 is our choice, not the reference's).
    Was ``n_candidates``."""
    selection_temperature: float = 1.0
    """Softmax temperature over Q for stochastic acting (official softmax filter: 1)."""
    lr_decay: bool = False
    """Cosine-anneal the V/Q/ensemble learning rates to `min_value_learning_rate` (official
    `--use_lr_schedule`, off by default)."""
    lr_decay_steps: int = 1_000_000
    """Length of the cosine decay in updates (official: 100 epochs x 10,000 steps)."""
    min_value_learning_rate: float = 1e-4
    """Floor of the cosine decay (official `--min_value_lr`)."""
    reward_transform: str = "iql_locomotion"
    """'iql_locomotion' (r * 1000 / (max - min episode return), official MuJoCo), 'iql_antmaze'
    (0 if r > 0 else -1, official AntMaze), 'cql_antmaze', 'normalize' or 'none'."""
    n_hidden: int = 2
    """Hidden layers of V, the twin Q and the Q-ensemble (official: 2)."""
    guidance_n_hidden: int = bounded(4, 64)
    """Hidden layers of the guidance network W (official: 4)."""
    behavior_n_hidden: int = bounded(3, 64)
    """Hidden layers of the behaviour model's noise MLP (the library's NoiseMLP default)."""

    def check(self) -> None:
        super().check()
        for name in ("value_learning_rate", "guidance_learning_rate", "behavior_learning_rate"):
            check_field(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in (
            "behavior_batch_size",
            "n_noisy_copies",
            "lr_decay_steps",
            "guidance_n_hidden",
            "behavior_n_hidden",
        ):
            value = getattr(self, name)
            check_field(is_int(value) and value >= 1, name, "an int >= 1", value)
        check_field(
            self.behavior_steps is None or (is_int(self.behavior_steps) and self.behavior_steps >= 0),
            "behavior_steps",
            "an int >= 0 or None",
            self.behavior_steps,
        )
        check_field(
            is_int(self.q_ensemble_size) and self.q_ensemble_size >= 0,
            "q_ensemble_size",
            "an int >= 0",
            self.q_ensemble_size,
        )
        check_field(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        check_field(self.alpha > 0, "alpha", "> 0", self.alpha)
        check_field(self.guidance_scale >= 0, "guidance_scale", ">= 0", self.guidance_scale)
        check_field(self.selection_temperature > 0, "selection_temperature", "> 0", self.selection_temperature)
        check_field(self.min_value_learning_rate >= 0, "min_value_learning_rate", ">= 0", self.min_value_learning_rate)


# networks --------------------------------------------------------------------------------------
class ValueNet(nn.Module):
    """V(s): one MLP, (B, S) -> (B,)."""

    def __init__(self, state_dim: int, hidden_dim: int, n_hidden: int):
        super().__init__()
        self.v = EnsembleMLP(state_dim, 1, 1, hidden_dim, n_hidden)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.v(state)[0, :, 0]


class GuidanceNet(nn.Module):
    """W(s, a_t, t): MLP on [a_t, time embedding, s] -> scalar, (B, A), (B,), (B, S) -> (B,).

    Time: sinusoidal(time_dim) -> Linear(time_dim, time_dim), on the integer diffusion step.
    """

    def __init__(self, state_dim: int, action_dim: int, hidden_dim: int, n_hidden: int, time_dim: int):
        super().__init__()
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(time_dim), nn.Linear(time_dim, time_dim))
        self.w = EnsembleMLP(action_dim + time_dim + state_dim, 1, 1, hidden_dim, n_hidden)

    def forward(self, noisy_action: torch.Tensor, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return self.w(torch.cat([noisy_action, self.time_mlp(t), state], dim=-1))[0, :, 0]

    def action_gradient(self, noisy_action: torch.Tensor, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """grad_a W(s, a_t, t), (B, A), in closed form (the MLP's backward pass written out), so
        acting needs no autograd and exports to ONNX and torch.export."""
        x = torch.cat([noisy_action, self.time_mlp(t), state], dim=-1)
        return self.w.input_gradient(x)[0, :, : noisy_action.shape[1]]


# the method's formulas ------------------------------------------------------------------------
def f_star(r: torch.Tensor) -> torch.Tensor:
    """Convex conjugate of the piecewise f: r^2/4 + r for r >= 0, exp(min(r, 1)) - 1 for r < 0."""
    return torch.where(r >= 0, r.pow(2) / 4 + r, torch.exp(r.clamp(max=1.0)) - 1.0)


def dice_weight(r: torch.Tensor) -> torch.Tensor:
    """w = f*'(r): r/2 + 1 for r >= 0, e^r for r < 0, clamped to [1e-40, 100]."""
    return torch.where(r >= 0, r / 2 + 1.0, torch.exp(r.clamp(max=0.0))).clamp(WEIGHT_MIN, WEIGHT_MAX)


def guidance_dual_loss(weight: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """The official normalised exp-dual loss: its minimiser over W is log E[w | a_t, s].

    weight: (B, 1) ratios of the clean actions; energy: (B, M) W at M noisy copies. Up to the
    positive constant e^{-m} the loss is E[w e^{-W} + W]; e^{-W} is computed as e^{sp} with
    sp = -W kept at most 80 (its gradient is still that of -W), and m = max(max sp, -1)
    rescales so the largest exponent is 0.
    """
    sp = torch.minimum(torch.zeros_like(energy), energy - ENERGY_FLOOR).detach() - energy
    m = sp.max().clamp(min=-1.0).detach()
    return torch.mean(weight * torch.exp(sp - m) + torch.exp(-m) * energy)


# policy ----------------------------------------------------------------------------------------
class DiffusionDICEPolicy(PolicyBase):
    """Behaviour diffusion model, V, twin Q with targets, Q-ensemble, guidance net W, and acting.

    Acting (guide, then select): ``n_action_samples`` guided samples per observation, scored by the
    Q-ensemble mean (the first target Q head when ``q_ensemble_size=0``); the argmax with fixed
    noise when ``deterministic`` (the same observation always gives the same action), else a draw
    from softmax(Q / ``selection_temperature``).

    Args:
        observation_space: Box or Dict-of-Box space of the environment.
        action_space: bounded Box; the networks work in [-1, 1] and ``predict`` maps back.
        config: hyperparameters (network sizes, diffusion steps, schedule, acting).
    """

    config: DiffusionDICEConfig

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Box, config: DiffusionDICEConfig):
        super().__init__(observation_space, action_space, config)
        s, a, h = self.feature_dim, self.action_dim, config.hidden_dim  # feature_dim: the camera encoder's output
        denoiser = NoiseMLP(s, a, h, config.behavior_n_hidden, config.time_dim)
        self.behavior = GaussianDiffusion(denoiser, a, config.diffusion_steps, config.beta_schedule)
        self.value = ValueNet(s, h, config.n_hidden)
        self.critic = Critic(s, a, 2, h, config.n_hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.q_ensemble = Critic(s, a, config.q_ensemble_size, h, config.n_hidden) if config.q_ensemble_size else None
        self.guidance = GuidanceNet(s, a, h, config.guidance_n_hidden, config.time_dim)

    def selection_q(self, observations: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The Q that picks among candidates: ensemble mean, or target head 1 without an ensemble. (B,)"""
        if self.q_ensemble is not None:
            return self.q_ensemble(observations, actions).mean(dim=0)
        return self.critic_target(observations, actions)[0]

    def guidance_gradient(self, states: torch.Tensor) -> Any:
        """grad_a W(s, a_t, t) for ``states`` (one row per sample): the guidance the shared sampler
        adds to the behaviour score."""

        def gradient(x: torch.Tensor, step: int) -> torch.Tensor:
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            return self.guidance.action_gradient(x, t, states)

        return gradient

    @property
    def temperature(self) -> float:
        return float(self.config.selection_temperature)

    def score_candidates(self, observations: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Guide, then score: N guided samples per observation and their selection Q."""
        cfg = self.config
        batch = observations.shape[0]
        n = noise.shape[1] // batch
        repeated = observations.repeat_interleave(n, dim=0)  # (B * N, S)
        guidance = self.guidance_gradient(repeated) if cfg.guidance_scale > 0 else None
        candidates = self.behavior.sample(
            observations, noise=noise, n_samples=n, guidance=guidance, guidance_scale=cfg.guidance_scale
        )  # (B * N, A)
        return candidates, self.selection_q(repeated, candidates).view(batch, n)


# the algorithm ---------------------------------------------------------------------------------
DIFFUSION_DICE_PAPER = Paper(
    method_name="Diffusion-DICE",
    title="Diffusion-DICE: In-Sample Diffusion Guidance for Offline Reinforcement Learning",
    short_citation="Mao, Xu, Zhang, Zhan and Zhang, NeurIPS 2024",
    url="https://arxiv.org/abs/2407.20109",
    method=(
        "Diffusion-DICE trains a behaviour diffusion model on the dataset, DICE values (V and twin Q) "
        "with a piecewise f-divergence dual giving the optimal distribution ratio w, and a guidance "
        "network W(s, a_t, t) = log E[w | a_t, s] learned from noised dataset actions only. Acting adds "
        "the guidance gradient to the behaviour score (guide) and keeps the best of a few candidates "
        "by Q (select)."
    ),
    bibtex=(
        "@inproceedings{mao2024diffusiondice,\n"
        "  title     = {Diffusion-DICE: In-Sample Diffusion Guidance for Offline Reinforcement Learning},\n"
        "  author    = {Mao, Liyuan and Xu, Haoran and Zhang, Weinan and Zhan, Xianyuan and Zhang, Amy},\n"
        "  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},\n"
        "  year      = {2024},\n"
        "  eprint    = {2407.20109},\n"
        "  archivePrefix = {arXiv},\n"
        "  url       = {https://arxiv.org/abs/2407.20109}\n"
        "}"
    ),
)


class DiffusionDICE(BaseAgent, algorithm="DiffusionDICE", short_name="dice", paper=DIFFUSION_DICE_PAPER):
    """Diffusion-DICE: behaviour diffusion + DICE values + in-sample guidance, guide-then-select.

    Each ``learn`` step (one timestep) is: a behaviour-model step (during the first
    ``behavior_steps`` updates), the V step, the twin-Q (and Q-ensemble) step, the target-Q
    Polyak update and the guidance step, all on dataset actions.

    Args:
        buffer: the offline dataset (``OfflineBuffer.from_minari/from_d4rl/from_sb3``). May be
            None for a model that only acts (e.g. before loading weights).
        env: optional env id, ``gymnasium.Env`` or VecEnv; supplies the spaces and is what
            ``get_env()`` returns to SB3 callbacks.
        device: 'auto' (CUDA when present), 'cpu', 'cuda', ...; the dataset is moved there once.
        seed: seeds network initialisation, batch sampling, diffusion noise and acting.
        observation_space, action_space: explicit spaces (else from env, else from buffer).
        verbose: 1 prints the training logs to stdout.
        tensorboard_log: folder for a tensorboard log (needs the tensorboard package).
        **hyperparameters: any field of :class:`DiffusionDICEConfig` (``alpha``,
            ``guidance_scale``, ``n_action_samples``, ``n_noisy_copies``, ``diffusion_steps``, ...).
    """

    config_class, policy_class = DiffusionDICEConfig, DiffusionDICEPolicy
    config: DiffusionDICEConfig
    policy: DiffusionDICEPolicy

    def __init__(self, buffer: OfflineBuffer | None = None, env: Any = None, **kwargs: Any):
        super().__init__(buffer, env, **kwargs)
        cfg = self.config
        p = self.policy
        self.behavior, self.value, self.guidance = p.behavior, p.value, p.guidance
        self.critic, self.critic_target, self.q_ensemble = p.critic, p.critic_target, p.q_ensemble
        self.update_critic_target = SoftUpdate(self.critic_target, self.critic)

        def adamw(module: nn.Module, lr: float) -> torch.optim.AdamW:
            return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=cfg.weight_decay)

        self.behavior_optimizer = torch.optim.Adam(self.behavior.parameters(), lr=cfg.behavior_learning_rate)
        self.value_optimizer = adamw(self.value, cfg.value_learning_rate)
        # A camera encoder is shared by every network and trained by one loss only: the twin Q's TD
        # regression (the critic's role, as in DrQ-v2). The twin Q always exists (the Q-ensemble is
        # optional and only picks actions), its targets give V's regression target and the guidance
        # weights, and a TD loss is a dense signal on every batch; V, the ensemble, the guidance net
        # and the behaviour model see the features detached.
        critic_params = [*self.critic.parameters(), *p.encoder.parameters()]
        self.critic_optimizer = torch.optim.AdamW(
            critic_params, lr=cfg.value_learning_rate, weight_decay=cfg.weight_decay
        )
        self.ensemble_optimizer = adamw(self.q_ensemble, cfg.value_learning_rate) if self.q_ensemble else None
        self.guidance_optimizer = adamw(self.guidance, cfg.guidance_learning_rate)
        self.lr_schedulers = []
        if cfg.lr_decay:  # V, Q and the ensemble only, as in the official code
            decayed = [self.value_optimizer, self.critic_optimizer, self.ensemble_optimizer]
            self.lr_schedulers = [
                torch.optim.lr_scheduler.CosineAnnealingLR(
                    opt, T_max=cfg.lr_decay_steps, eta_min=cfg.min_value_learning_rate
                )
                for opt in decayed
                if opt is not None
            ]

    # the update ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, replay, p = self.config, self.replay_buffer, self.policy
        losses: dict[str, torch.Tensor] = {}

        # 1. Behaviour model: eps-MSE on dataset actions (the official pre-training stage).
        if cfg.behavior_steps is None or self.n_updates < cfg.behavior_steps:
            bc_batch = replay.sample(cfg.behavior_batch_size, self.generator)
            with torch.no_grad():  # features without gradients: the behaviour loss does not train the encoder
                bc_states = p.encoder(bc_batch.observations, self.generator)
            bc_loss = self.behavior.loss(bc_batch.actions, bc_states, self.generator, mask=bc_batch.action_mask)
            optimize(self.behavior_optimizer, bc_loss)
            losses["bc_loss"] = bc_loss.detach()

        # Features with the encoder's graph (camera spaces): only the twin-Q loss below uses them so;
        # every other loss gets ``obs`` detached.
        batch = self.sample_batch(replay, cfg.batch_size)
        features, act = batch.observations, batch.actions
        obs = features.detach()

        # 2. V: the piecewise f-divergence dual, E[f*((Q_targ - V) / alpha) + V / alpha].
        with torch.no_grad():
            target_q = self.critic_target.q_min(obs, act)  # (B,)
        v = self.value(obs)  # (B,)
        value_loss = torch.mean(f_star((target_q - v) / cfg.alpha) + v / cfg.alpha)
        optimize(self.value_optimizer, value_loss)

        # 3. Twin Q and the Q-ensemble: y = r + gamma (1 - d) V(s') (no target V); a chunk of L steps
        #    sums its rewards and bootstraps with gamma^L (dql_agent.chunks).
        discount = cfg.gamma if batch.discounts is None else batch.discounts
        with torch.no_grad():
            y = batch.rewards + batch.not_dones * discount * self.value(batch.next_observations)  # (B,)
        q = self.critic(features, act)  # (2, B); trains the camera encoder too
        critic_loss = (q - y).pow(2).mean(dim=1).sum()  # MSE(Q1, y) + MSE(Q2, y)
        optimize(self.critic_optimizer, critic_loss)
        if self.q_ensemble is not None and self.ensemble_optimizer is not None:
            ensemble_loss = (self.q_ensemble(obs, act) - y).pow(2).mean()
            optimize(self.ensemble_optimizer, ensemble_loss)
            losses["ensemble_loss"] = ensemble_loss.detach()
        self.update_critic_target(cfg.tau)

        # 4. Guidance W(s, a_t, t) -> log E[w | a_t, s] over M noisy copies of each dataset action,
        #    one step t per state shared by its copies, one noise per copy.
        with torch.no_grad():
            weight = dice_weight((self.critic_target.q_min(obs, act) - self.value(obs)) / cfg.alpha)  # (B,)
        m = cfg.n_noisy_copies
        t = torch.randint(0, cfg.diffusion_steps, (obs.shape[0],), device=obs.device, generator=self.generator)
        t = t.repeat_interleave(m)  # (B * M,)
        clean = act.repeat_interleave(m, dim=0)  # (B * M, A)
        noise = torch.randn(clean.shape, device=clean.device, generator=self.generator)
        noisy = self.behavior.q_sample(clean, t, noise)
        energy = self.guidance(noisy, t, obs.repeat_interleave(m, dim=0)).view(-1, m)  # (B, M)
        guidance_loss = guidance_dual_loss(weight[:, None], energy)
        optimize(self.guidance_optimizer, guidance_loss)

        for scheduler in self.lr_schedulers:
            scheduler.step()
        return losses | {
            "value_loss": value_loss.detach(),
            "critic_loss": critic_loss.detach(),
            "guidance_loss": guidance_loss.detach(),
            "v_mean": v.detach().mean(),
            "q_mean": q.detach().mean(),
            "weight_mean": weight.mean(),
        }

    # checkpoints -----------------------------------------------------------------------------
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        optimizers: dict[str, torch.optim.Optimizer] = {
            "behavior_optimizer": self.behavior_optimizer,
            "value_optimizer": self.value_optimizer,
            "critic_optimizer": self.critic_optimizer,
            "guidance_optimizer": self.guidance_optimizer,
        }
        if self.ensemble_optimizer is not None:
            optimizers["ensemble_optimizer"] = self.ensemble_optimizer
        return optimizers

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().training_state()
        meta["lr_schedulers"] = [s.state_dict() for s in self.lr_schedulers]
        return tensors, meta

    def load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_training_state(tensors, meta)
        for scheduler, state in zip(self.lr_schedulers, meta.get("lr_schedulers", []), strict=False):
            scheduler.load_state_dict(state)


__all__ = ["DiffusionDICE", "DiffusionDICEConfig", "DiffusionDICEPolicy"]
