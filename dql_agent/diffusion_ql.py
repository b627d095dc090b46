"""Diffusion-QL: config and presets, policy, the update's two losses, the agent.

Paper: Wang, Hunt, Zhou, "Diffusion Policies as an Expressive Policy Class for Offline
Reinforcement Learning", ICLR 2023, https://arxiv.org/abs/2208.06193. Defaults follow the
official implementation's D4RL locomotion runs (see ``DiffusionQLConfig``), per-task settings
are ``PRESETS``.

One update (:meth:`DiffusionQL.train_step`), as the official code runs it:

1. critic: y = r + gamma * (1 - terminal) * min_i Q'_i(s', a'), a' drawn by the EMA actor (with
   ``max_q_backup``: the max over ``n_max_q_samples`` draws per critic, then the min); loss
   MSE(Q1, y) + MSE(Q2, y) (:func:`critic_loss`);
2. actor: bc_loss + eta * q_loss, bc_loss the diffusion eps-MSE on dataset actions and
   q_loss = -Q_i(s, a) / |Q_j(s, a)|.mean() on actions sampled through the whole chain with
   gradients, the roles of the two critics drawn at random (:func:`actor_loss`);
3. the EMA actor every ``ema_update_every`` steps from ``ema_start_step``; Polyak target critics.

Acting: ``n_action_samples`` candidates per observation, scored by the target critics' min-Q,
one kept by softmax over Q (argmax with fixed noise when ``deterministic``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from gymnasium import spaces

from dql_agent.base import BaseAgent
from dql_agent.buffer import Batch, OfflineBuffer
from dql_agent.config import AgentConfig, OfflineDataConfig, bounded, check_field, is_int
from dql_agent.diffusion import GaussianDiffusion
from dql_agent.networks import Critic, NoiseMLP, SoftUpdate, optimize
from dql_agent.policy import PolicyBase
from dql_agent.registry import Paper

ENCODER_LOSSES = ("critic", "actor")


def _nonfinite(name: str, loss: torch.Tensor) -> str:
    """What was not finite when ``optimize`` refused a step: the loss, else its gradients."""
    value = float(loss)
    return f"{name} is {value}" if not math.isfinite(value) else f"{name}'s gradient norm is not finite"


# configuration ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusionQLConfig(OfflineDataConfig, AgentConfig):
    """Hyperparameters of Diffusion-QL. Defaults reproduce the official D4RL locomotion run."""

    saved_before: ClassVar[dict[str, Any]] = {"encoder_loss": "critic", "critic_layer_norm": False}
    reward_transforms: ClassVar[tuple[str, ...]] = ("none", "cql_antmaze", "normalize")

    learning_rate: float = 3e-4
    """Actor (diffusion policy) Adam learning rate; the per-task `lr` of the official code."""
    critic_learning_rate: float = 3e-4
    """Critic Adam learning rate; fixed at 3e-4 for every task in the official code."""
    eta: float = 1.0
    """Weight of the Q-term in the actor loss: bc_loss + eta * q_loss."""
    grad_norm: float | None = 1.0
    """Max gradient norm for actor and critic (one shared value); None disables clipping."""
    max_q_backup: bool = False
    """TD target from the max over `n_max_q_samples` next actions per critic, then the min."""
    n_max_q_samples: int = bounded(10, 10_000)
    """Next-action samples per state for the max-Q backup."""
    ema_decay: float = 0.995
    """Decay of the EMA actor that produces the TD target's next actions."""
    ema_update_every: int = 5
    """The EMA actor is updated every this many gradient steps..."""
    ema_start_step: int = 1000
    """...from this step on; before it the EMA actor stays the initial actor."""
    lr_decay: bool = False
    """Cosine-anneal both learning rates to 0 over `lr_decay_steps`, then hold them at 0. (The
    official `--lr_decay` is in effect a constant LR: its CosineAnnealingLR has T_max = num_epochs
    but is stepped once per 50 epochs, so the LR ends at x0.998. This decays over the run.)"""
    lr_decay_steps: int | None = None
    """Length of the cosine decay in gradient steps; None: the run's, i.e. the ``total_timesteps``
    of the first ``learn`` call (fixed then and saved with the schedule; set it when training in
    chunks)."""
    act_with_ema: bool = False
    """Act with the EMA actor instead of the online actor (the official code uses the online one)."""
    critic_layer_norm: bool = False
    """LayerNorm on the critics' hidden pre-activations (not in the official code; an option that
    is known to stabilise offline critics, see docs/STABILITY.md)."""
    encoder_loss: str = "critic"
    """Camera observations: the loss that trains the shared encoder, 'critic' (the TD loss, DrQ-v2's
    choice) or 'actor' (the BC + Q loss); the other network sees the features detached."""
    nonfinite_loss: str = "raise"
    """A NaN/inf loss: 'raise' (FloatingPointError naming the step) or 'skip' the batch."""

    def check(self) -> None:
        super().check()
        for name in ("learning_rate", "critic_learning_rate"):
            check_field(getattr(self, name) > 0, name, "> 0", getattr(self, name))
        for name in ("n_max_q_samples", "ema_update_every"):
            value = getattr(self, name)
            check_field(is_int(value) and value >= 1, name, "an int >= 1", value)
        check_field(0.0 <= self.ema_decay <= 1.0, "ema_decay", "in [0, 1]", self.ema_decay)
        check_field(self.eta >= 0.0, "eta", ">= 0", self.eta)
        check_field(self.ema_start_step >= 0, "ema_start_step", ">= 0", self.ema_start_step)
        check_field(
            self.lr_decay_steps is None or self.lr_decay_steps >= 1,
            "lr_decay_steps",
            "an int >= 1 or None",
            self.lr_decay_steps,
        )
        check_field(self.grad_norm is None or self.grad_norm > 0, "grad_norm", "> 0 or None", self.grad_norm)
        check_field(self.encoder_loss in ENCODER_LOSSES, "encoder_loss", f"one of {ENCODER_LOSSES}", self.encoder_loss)
        check_field(
            self.nonfinite_loss in ("raise", "skip"), "nonfinite_loss", "'raise' or 'skip'", self.nonfinite_loss
        )


# Per-task settings of the official code (main.py's hyperparameter dictionary; see
# reference/diffusion_ql.md section 2). `total_timesteps` is the paper's training length in gradient
# steps (epochs x 1000); it is a suggestion for `learn`, not a config field.
_PRESET_TABLE = {
    # task: (learning_rate, eta, max_q_backup, reward_transform, epochs, grad_norm)
    "halfcheetah-medium": (3e-4, 1.0, False, "none", 2000, 9.0),
    "hopper-medium": (3e-4, 1.0, False, "none", 2000, 9.0),
    "walker2d-medium": (3e-4, 1.0, False, "none", 2000, 1.0),
    "halfcheetah-medium-replay": (3e-4, 1.0, False, "none", 2000, 2.0),
    "hopper-medium-replay": (3e-4, 1.0, False, "none", 2000, 4.0),
    "walker2d-medium-replay": (3e-4, 1.0, False, "none", 2000, 4.0),
    "halfcheetah-medium-expert": (3e-4, 1.0, False, "none", 2000, 7.0),
    "hopper-medium-expert": (3e-4, 1.0, False, "none", 2000, 5.0),
    "walker2d-medium-expert": (3e-4, 1.0, False, "none", 2000, 5.0),
    "antmaze-umaze": (3e-4, 0.5, False, "cql_antmaze", 1000, 2.0),
    "antmaze-umaze-diverse": (3e-4, 2.0, True, "cql_antmaze", 1000, 3.0),
    "antmaze-medium-play": (1e-3, 2.0, True, "cql_antmaze", 1000, 2.0),
    "antmaze-medium-diverse": (3e-4, 3.0, True, "cql_antmaze", 1000, 1.0),
    "antmaze-large-play": (3e-4, 4.5, True, "cql_antmaze", 1000, 10.0),
    "antmaze-large-diverse": (3e-4, 3.5, True, "cql_antmaze", 1000, 7.0),
    "pen-human": (3e-5, 0.15, False, "normalize", 1000, 7.0),
    "pen-cloned": (3e-5, 0.1, False, "normalize", 1000, 8.0),
    "kitchen-complete": (3e-4, 0.005, False, "none", 250, 9.0),
    "kitchen-partial": (3e-4, 0.005, False, "none", 1000, 10.0),
    "kitchen-mixed": (3e-4, 0.005, False, "none", 1000, 10.0),
}

PRESETS: dict[str, dict[str, Any]] = {
    task: {"learning_rate": lr, "eta": eta, "max_q_backup": max_q, "reward_transform": reward, "grad_norm": gn}
    for task, (lr, eta, max_q, reward, _, gn) in _PRESET_TABLE.items()
}
PRESET_TOTAL_TIMESTEPS: dict[str, int] = {task: epochs * 1000 for task, (*_, epochs, _) in _PRESET_TABLE.items()}


def preset_name(name: str) -> str:
    """Normalise 'hopper-medium-v2', 'mujoco/hopper/medium-v0' or 'Hopper-Medium' to a preset key."""
    key = name.strip().lower().replace("/", "-").replace("_", "-")
    if key.startswith("mujoco-") or key.startswith("d4rl-"):
        key = key.split("-", 1)[1]
    head, _, tail = key.rpartition("-v")
    if head and tail.isdigit():
        key = head
    if key not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return key


def get_preset(name: str) -> dict[str, Any]:
    """Hyperparameter overrides of the official code for a task, e.g. ``get_preset('hopper-medium')``."""
    return dict(PRESETS[preset_name(name)])


# policy ----------------------------------------------------------------------------------------
class DiffusionQLPolicy(PolicyBase):
    """Diffusion actor, its EMA copy, twin critics and their targets, plus action selection.

    ``predict`` is SB3's (see :class:`PolicyBase`).

    Args:
        observation_space: Box or Dict-of-Box space of the environment.
        action_space: bounded Box; the networks work in [-1, 1] and ``predict`` maps back.
        config: hyperparameters (network sizes, diffusion steps, schedule, acting).
    """

    config: DiffusionQLConfig

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Box, config: DiffusionQLConfig):
        super().__init__(observation_space, action_space, config)
        features = self.feature_dim  # the observation's length, or the camera encoder's output
        denoiser = NoiseMLP(features, self.action_dim, config.hidden_dim, config.n_hidden, config.time_dim)
        self.actor = GaussianDiffusion(denoiser, self.action_dim, config.diffusion_steps, config.beta_schedule)
        self.ema_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = Critic(features, self.action_dim, 2, config.hidden_dim, config.n_hidden, config.critic_layer_norm)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

    def score_candidates(self, observations: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """N actor samples per observation, scored by the target critics' min-Q."""
        actor = self.ema_actor if self.config.act_with_ema else self.actor
        n = noise.shape[1] // observations.shape[0]
        candidates = actor.sample(observations, noise=noise, n_samples=n)  # (B * N, A)
        return candidates, self.critic_target.q_min_of_candidates(observations, candidates)  # (B, N)


# the update's two losses -----------------------------------------------------------------------
class ActorNoise(NamedTuple):
    """The actor half's random draws (see :meth:`DiffusionQL.actor_inputs`)."""

    t: torch.Tensor  # (B,) diffusion steps of the BC loss
    bc_noise: torch.Tensor  # (B, A) noise of the BC loss
    chain_noise: torch.Tensor | None  # (T, B, A) noise of the chain sampled with gradients; None when eta = 0
    coin: torch.Tensor | None  # () bool: True scores with critic 1 and normalises by critic 2; None when eta = 0


def critic_loss(
    policy: DiffusionQLPolicy, cfg: DiffusionQLConfig, batch: Batch, next_noise: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TD loss of both critics, MSE(Q1, y) + MSE(Q2, y), with y from the EMA actor's next action
    and the target critics.

    ``next_noise`` (T, B * k, A) is the chain noise of the k next actions per state (k =
    ``n_max_q_samples`` with ``max_q_backup``, else 1); None when the data never bootstraps
    (every row terminal, a contextual bandit), where y = r and no chain runs.
    """
    with torch.no_grad():
        if next_noise is None:
            next_q = torch.zeros_like(batch.rewards)
        elif cfg.max_q_backup:
            n = cfg.n_max_q_samples
            next_act = policy.ema_actor.sample(batch.next_observations, noise=next_noise, n_samples=n)
            next_q = policy.critic_target(batch.next_observations.repeat_interleave(n, dim=0), next_act)
            # max over samples for each target critic, then the min over the two critics
            next_q = next_q.view(2, -1, n).max(dim=2).values.min(dim=0).values
        else:
            next_act = policy.ema_actor.sample(batch.next_observations, noise=next_noise)
            next_q = policy.critic_target(batch.next_observations, next_act).min(dim=0).values
        # A chunk of L steps bootstraps with gamma^L (batch.discounts, dql_agent.chunks); one step with gamma.
        discount = cfg.gamma if batch.discounts is None else batch.discounts
        target_q = batch.rewards + batch.not_dones * discount * next_q  # (B,)
    current_q = policy.critic(batch.observations, batch.actions)  # (2, B)
    loss = (current_q - target_q).pow(2).mean(dim=1).sum()
    return loss, {"critic_loss": loss.detach(), "q_mean": current_q.detach().mean()}


def actor_loss(
    policy: DiffusionQLPolicy, cfg: DiffusionQLConfig, batch: Batch, noise: ActorNoise
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """bc_loss + eta * q_loss on the batch's states; with eta = 0 pure diffusion BC (no chain)."""
    loss = bc_loss = policy.actor.loss(
        batch.actions, batch.observations, t=noise.t, noise=noise.bc_noise, mask=batch.action_mask
    )
    losses = {"bc_loss": bc_loss.detach()}
    if cfg.eta > 0:
        assert noise.chain_noise is not None and noise.coin is not None  # drawn whenever eta > 0
        q_new = policy.critic(batch.observations, policy.actor.sample(batch.observations, noise=noise.chain_noise))
        # Score with one critic, normalise by the other's |Q|, the roles drawn by the coin. A
        # where() rather than an index: under vmap (stacked seeds) each replica has its own coin.
        scored = torch.where(noise.coin, q_new[0], q_new[1])
        other = torch.where(noise.coin, q_new[1], q_new[0])
        q_loss = -scored.mean() / other.abs().mean().detach()
        loss = bc_loss + cfg.eta * q_loss
        losses["q_loss"] = q_loss.detach()
    losses["actor_loss"] = loss.detach()
    return loss, losses


# the agent -------------------------------------------------------------------------------------
DIFFUSION_QL_PAPER = Paper(
    method_name="Diffusion-QL",
    title="Diffusion Policies as an Expressive Policy Class for Offline Reinforcement Learning",
    short_citation="Wang, Hunt and Zhou, ICLR 2023",
    url="https://arxiv.org/abs/2208.06193",
    method=(
        "Diffusion-QL represents the policy as a conditional diffusion model (a DDPM over actions, "
        "conditioned on the observation, with a few denoising steps). The actor loss is the "
        "diffusion behaviour-cloning loss plus `eta` times a Q-learning term that pushes sampled "
        "actions towards high values of twin critics, which are trained with TD targets from an "
        "EMA copy of the actor. At acting time several candidate actions are sampled per "
        "observation and the one the critics rate highest is taken."
    ),
    bibtex=(
        "@inproceedings{wang2023diffusion,\n"
        "  title     = {Diffusion Policies as an Expressive Policy Class for Offline "
        "Reinforcement Learning},\n"
        "  author    = {Wang, Zhendong and Hunt, Jonathan J. and Zhou, Mingyuan},\n"
        "  booktitle = {International Conference on Learning Representations (ICLR)},\n"
        "  year      = {2023},\n"
        "  eprint    = {2208.06193},\n"
        "  archivePrefix = {arXiv},\n"
        "  url       = {https://arxiv.org/abs/2208.06193}\n"
        "}"
    ),
)


class DiffusionQL(BaseAgent, algorithm="DiffusionQL", short_name="dql", paper=DIFFUSION_QL_PAPER):
    """Diffusion-QL: a diffusion policy trained with behaviour cloning plus Q-learning.

    Args:
        buffer: the offline dataset (``OfflineBuffer.from_minari/from_d4rl/from_sb3``). May be
            None for a model that only acts (e.g. before loading weights).
        env: optional env id, ``gymnasium.Env`` or VecEnv; supplies the spaces and is what
            ``get_env()`` returns to SB3 callbacks (EvalCallback, progress bars).
        device: 'auto' (CUDA when present), 'cpu', 'cuda', ...; the dataset is moved there once.
        seed: seeds network initialisation, batch sampling, diffusion noise and acting.
        preset: task preset of the official code, e.g. 'hopper-medium', 'antmaze-large-play'
            (see ``dql_agent.PRESETS``); explicit keyword arguments override it.
        observation_space, action_space: explicit spaces (else from env, else from buffer).
        verbose: 1 prints the training logs to stdout.
        tensorboard_log: folder for a tensorboard log (needs the tensorboard package).
        **hyperparameters: any field of :class:`DiffusionQLConfig` (``learning_rate``,
            ``batch_size``, ``gamma``, ``tau``, ``eta``, ``diffusion_steps``, ``beta_schedule``,
            ``grad_norm``, ``max_q_backup``, ``ema_decay``, ``n_action_samples``, ...).
    """

    config_class, policy_class = DiffusionQLConfig, DiffusionQLPolicy
    presets, stackable = PRESETS, True
    config: DiffusionQLConfig
    policy: DiffusionQLPolicy

    def __init__(
        self, buffer: OfflineBuffer | None = None, env: Any = None, *, preset: str | None = None, **kwargs: Any
    ):
        self.bootstraps = True  # set_buffer (called by BaseAgent.__init__) checks the data
        super().__init__(buffer, env, preset=preset, **kwargs)
        if preset is not None:
            self.metadata["preset"] = preset
        config, policy = self.config, self.policy
        self.actor, self.ema_actor = policy.actor, policy.ema_actor
        self.critic, self.critic_target = policy.critic, policy.critic_target
        self.update_ema = SoftUpdate(self.ema_actor, self.actor)
        self.update_critic_target = SoftUpdate(self.critic_target, self.critic)
        # A camera encoder is shared by actor and critics and trained by one loss, `encoder_loss`'s;
        # the other sees its features detached.
        encoder = list(policy.encoder.parameters())
        by_actor = config.encoder_loss == "actor"
        self.actor_optimizer = torch.optim.Adam(
            [*self.actor.parameters(), *(encoder if by_actor else [])], lr=config.learning_rate
        )
        self.critic_optimizer = torch.optim.Adam(
            [*self.critic.parameters(), *([] if by_actor else encoder)], lr=config.critic_learning_rate
        )
        self.lr_schedulers = []
        if config.lr_decay:
            # T_max 1 is a placeholder until the first learn call fixes the run's length (None).
            self.lr_schedulers = [
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.lr_decay_steps or 1, eta_min=0.0)
                for opt in (self.actor_optimizer, self.critic_optimizer)
            ]
        self.coin_generator = torch.Generator().manual_seed(self.seed + 1)  # host-side: no device sync
        self.compute_critic_loss, self.compute_actor_loss = critic_loss, actor_loss  # compile_training() swaps

    @classmethod
    def make_config(cls, hyperparameters: dict[str, Any]) -> DiffusionQLConfig:
        """The config from keyword hyperparameters over the task preset named by ``preset``, if any."""
        hyperparameters = dict(hyperparameters)
        preset = hyperparameters.pop("preset", None)
        config: DiffusionQLConfig = DiffusionQLConfig.from_hyperparameters(
            hyperparameters, get_preset(preset) if preset is not None else None
        )
        return config

    def set_buffer(self, buffer: OfflineBuffer) -> None:
        super().set_buffer(buffer)
        # A dataset of one-step episodes (a contextual bandit) never bootstraps: y = r exactly,
        # so the next-action chain of the TD target can be skipped. Checked once, not per step.
        self.bootstraps = not bool(buffer.terminals.all())

    def compile_training(self, **compile_kwargs: Any) -> None:
        """Run the update's two loss computations (forward and backward) through ``torch.compile``.

        Same math, fused element-wise kernels (the test suite compares losses and gradients with
        the eager step). The first step compiles (tens of seconds on a CPU, which also needs a C++
        compiler); optimizer steps and the target updates stay eager. ``compile_kwargs`` go to
        ``torch.compile``.
        """
        self.compute_critic_loss = torch.compile(critic_loss, **compile_kwargs)
        self.compute_actor_loss = torch.compile(actor_loss, **compile_kwargs)

    # the update ------------------------------------------------------------------------------
    def critic_inputs(self) -> tuple[Batch, torch.Tensor | None]:
        """The critic half's inputs, drawn from this model's generator: a batch and the TD target
        chain's noise (None when the data never bootstraps)."""
        cfg = self.config
        batch = self.sample_batch(self.replay_buffer, cfg.batch_size)
        if not self.bootstraps:
            return batch, None
        rows = cfg.batch_size * (cfg.n_max_q_samples if cfg.max_q_backup else 1)
        shape = (cfg.diffusion_steps, rows, self.policy.action_dim)
        return batch, torch.randn(shape, device=self.device, generator=self.generator)

    def actor_inputs(self) -> ActorNoise:
        """The actor half's random draws: the critics' roles (a host coin), the BC loss's steps
        and noise, the actor chain's noise."""
        cfg, rows, dim = self.config, self.config.batch_size, self.policy.action_dim
        coin = torch.rand((), generator=self.coin_generator) > 0.5
        t = torch.randint(0, cfg.diffusion_steps, (rows,), device=self.device, generator=self.generator)
        bc_noise = torch.randn((rows, dim), device=self.device, generator=self.generator)
        if cfg.eta == 0:  # pure diffusion BC: no chain with gradients
            return ActorNoise(t, bc_noise, None, None)
        chain_noise = torch.randn((cfg.diffusion_steps, rows, dim), device=self.device, generator=self.generator)
        return ActorNoise(t, bc_noise, chain_noise, coin.to(self.device))

    def update_targets(self) -> None:
        """After both halves: the EMA actor on its schedule, the target critics, the LR schedules."""
        cfg, step = self.config, self.n_updates
        if step % cfg.ema_update_every == 0 and step >= cfg.ema_start_step:
            self.update_ema(1.0 - cfg.ema_decay)
        self.update_critic_target(cfg.tau)
        for scheduler in self.lr_schedulers:
            if step == 0 and cfg.lr_decay_steps is None:  # the run's length: the first learn call's target
                scheduler.T_max = max(self._total_timesteps, 1)
            if scheduler.last_epoch < scheduler.T_max:  # torch's cosine is periodic: hold at 0 after T_max
                scheduler.step()

    def train_step(self) -> dict[str, torch.Tensor]:
        # The actor's loss reads the critic this step has just updated (as the official code does),
        # so a bad actor loss is only seen after the critic stepped. Each optimizer steps only with a
        # finite loss and gradient norm (one host read each), so no step leaves a non-finite weight,
        # and the errors say what was applied.
        cfg, skip = self.config, self.config.nonfinite_loss == "skip"
        skipped = {"skipped_batches": torch.ones((), device=self.device)}
        batch, next_noise = self.critic_inputs()
        # With camera keys the batch holds the encoder's features: only `encoder_loss`'s loss sees
        # their graph.
        critic_batch = actor_batch = batch
        if self.policy.encoder.uses_images:
            detached = batch._replace(observations=batch.observations.detach())
            critic_batch, actor_batch = (detached, batch) if cfg.encoder_loss == "actor" else (batch, detached)
        loss, losses = self.compute_critic_loss(self.policy, cfg, critic_batch, next_noise)
        if not optimize(self.critic_optimizer, loss, grad_norm=cfg.grad_norm, require_finite=True):
            self.refuse_step(_nonfinite("critic_loss", loss), skip)
            return skipped

        noise = self.actor_inputs()
        # The critic only scores the actor's actions: not asking for its gradients skips work the
        # official code does and then zeroes.
        self.critic.requires_grad_(False)
        try:
            loss, actor_losses = self.compute_actor_loss(self.policy, cfg, actor_batch, noise)
        finally:
            self.critic.requires_grad_(True)
        if not optimize(self.actor_optimizer, loss, grad_norm=cfg.grad_norm, require_finite=True):
            applied = "the critic's update of this step was applied (finite), the actor was not updated"
            self.refuse_step(_nonfinite("actor_loss", loss), skip, applied)
            return skipped
        self.update_targets()
        return losses | actor_losses

    # checkpoints -----------------------------------------------------------------------------
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor_optimizer": self.actor_optimizer, "critic_optimizer": self.critic_optimizer}

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = super().training_state()
        tensors["rng.coin"] = self.coin_generator.get_state()
        meta["lr_schedulers"] = [s.state_dict() for s in self.lr_schedulers]
        return tensors, meta

    def load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        super().load_training_state(tensors, meta)
        self.coin_generator.set_state(tensors["rng.coin"])
        for scheduler, state in zip(self.lr_schedulers, meta.get("lr_schedulers", []), strict=False):
            scheduler.load_state_dict(state)


__all__ = [
    "PRESETS",
    "ActorNoise",
    "DiffusionQL",
    "DiffusionQLConfig",
    "DiffusionQLPolicy",
    "actor_loss",
    "critic_loss",
    "get_preset",
]
