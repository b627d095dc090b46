"""DiffusionQL: the Diffusion-QL update and its SB3-style surface.

Paper: Wang, Hunt, Zhou, "Diffusion Policies as an Expressive Policy Class for Offline
Reinforcement Learning", ICLR 2023, https://arxiv.org/abs/2208.06193. Defaults follow the
official implementation's D4RL locomotion runs (see ``DiffusionQLConfig``).
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from torch.nn.utils import clip_grad_norm_

from dql_agent.base import BaseAgent, draw_seed, resolve_device, resolve_spaces
from dql_agent.buffer import Batch, OfflineBuffer, transform_rewards
from dql_agent.config import DiffusionQLConfig, make_config
from dql_agent.networks import SoftUpdate
from dql_agent.policy import DiffusionQLPolicy

Tensors = dict[str, torch.Tensor]


def critic_loss(policy: DiffusionQLPolicy, cfg: DiffusionQLConfig, x: Tensors) -> tuple[torch.Tensor, Tensors]:
    """TD loss of both critics, MSE(Q1, y) + MSE(Q2, y), with y from the EMA actor's next action
    and the target critics. ``x``: see ``DiffusionQL.critic_inputs``; every random draw is in it."""
    with torch.no_grad():
        if "next_noise" not in x:  # the data never bootstraps (see DiffusionQL.set_buffer)
            next_q = torch.zeros_like(x["rewards"])
        elif cfg.max_q_backup:
            n = cfg.n_max_q_samples
            next_act = policy.ema_actor.sample(x["next_obs"], noise=x["next_noise"], n_samples=n)
            next_q = policy.critic_target(x["next_obs"].repeat_interleave(n, dim=0), next_act)
            # max over samples for each target critic, then the min over the two critics
            next_q = next_q.view(2, -1, n).max(dim=2).values.min(dim=0).values
        else:
            next_act = policy.ema_actor.sample(x["next_obs"], noise=x["next_noise"])
            next_q = policy.critic_target(x["next_obs"], next_act).min(dim=0).values
        target_q = x["rewards"] + x["not_dones"] * cfg.gamma * next_q  # (B,)
    current_q = policy.critic(x["obs"], x["act"])  # (2, B)
    loss = (current_q - target_q).pow(2).mean(dim=1).sum()
    return loss, {"critic_loss": loss.detach(), "q_mean": current_q.detach().mean()}


def actor_loss(policy: DiffusionQLPolicy, cfg: DiffusionQLConfig, x: Tensors) -> tuple[torch.Tensor, Tensors]:
    """BC (eps-MSE) + eta * Q-term on actions sampled through the whole chain. ``x``: the critic
    inputs plus ``DiffusionQL.actor_inputs``."""
    loss = bc_loss = policy.actor.loss(x["act"], x["obs"], t=x["t"], noise=x["bc_noise"])
    losses = {"bc_loss": bc_loss.detach()}
    if "chain_noise" in x:  # eta > 0
        q_new = policy.critic(x["obs"], policy.actor.sample(x["obs"], noise=x["chain_noise"]))  # (2, B)
        # Score with one critic, normalise by the other's |Q|, the roles drawn by the coin. A
        # where() rather than an index: under vmap (stacked seeds) each replica has its own coin.
        scored = torch.where(x["coin"], q_new[0], q_new[1])
        other = torch.where(x["coin"], q_new[1], q_new[0])
        q_loss = -scored.mean() / other.abs().mean().detach()
        loss = bc_loss + cfg.eta * q_loss
        losses["q_loss"] = q_loss.detach()
    losses["actor_loss"] = loss.detach()
    return loss, losses


class DiffusionQL(BaseAgent):
    """Diffusion-QL: a diffusion policy trained with behaviour cloning plus Q-learning.

    Args:
        buffer: the offline dataset (``OfflineBuffer.from_minari/from_d4rl/from_sb3``). May be
            None for a model that only acts (e.g. before loading weights).
        env: optional env id, ``gymnasium.Env`` or VecEnv; supplies the spaces and is what
            ``get_env()`` returns to SB3 callbacks (EvalCallback, progress bars).
        device: 'auto' (CUDA when present), 'cpu', 'cuda', ...; the dataset is moved there once.
        seed: seeds network initialisation, batch sampling, diffusion noise and acting.
        preset: task preset of the official code, e.g. 'hopper-medium', 'antmaze-large-play'
            (see ``dql_agent.config.PRESETS``); explicit keyword arguments override it.
        observation_space, action_space: explicit spaces (else from env, else from buffer).
        verbose: 1 prints the training logs to stdout.
        tensorboard_log: folder for a tensorboard log (needs the tensorboard package).
        **hyperparameters: any field of :class:`DiffusionQLConfig` (``learning_rate``,
            ``batch_size``, ``gamma``, ``tau``, ``eta``, ``diffusion_steps``, ``beta_schedule``,
            ``grad_norm``, ``max_q_backup``, ``ema_decay``, ``n_action_samples``, ...).
    """

    algorithm = "DiffusionQL"
    config_class = DiffusionQLConfig

    def __init__(
        self,
        buffer: OfflineBuffer | None = None,
        env: Any = None,
        *,
        device: str | torch.device = "auto",
        seed: int | None = None,
        preset: str | None = None,
        observation_space: spaces.Space | None = None,
        action_space: spaces.Box | None = None,
        verbose: int = 0,
        tensorboard_log: str | None = None,
        **hyperparameters: Any,
    ):
        if buffer is not None and not isinstance(buffer, OfflineBuffer):
            raise TypeError(f"buffer must be an OfflineBuffer, got {type(buffer).__name__}")
        self.config = make_config(DiffusionQLConfig, hyperparameters, preset)
        self.device = resolve_device(device)
        self.seed = draw_seed() if seed is None else int(seed)
        observation_space, action_space = resolve_spaces(buffer, env, observation_space, action_space)
        self.metadata: dict[str, Any] = dict(buffer.metadata) if buffer is not None else {}
        if preset is not None:
            self.metadata["preset"] = preset

        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(self.seed)
            self.policy = DiffusionQLPolicy(observation_space, action_space, self.config).to(self.device)
        self.policy.set_seed(self.seed + 2)
        self.actor, self.ema_actor = self.policy.actor, self.policy.ema_actor
        self.critic, self.critic_target = self.policy.critic, self.policy.critic_target
        self._update_ema = SoftUpdate(self.ema_actor, self.actor)
        self._update_critic_target = SoftUpdate(self.critic_target, self.critic)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=self.config.learning_rate)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=self.config.critic_learning_rate)
        self.lr_schedulers = []
        if self.config.lr_decay:
            self.lr_schedulers = [
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.config.lr_decay_steps, eta_min=0.0)
                for opt in (self.actor_optimizer, self.critic_optimizer)
            ]
        self._rng = torch.Generator(device=self.device).manual_seed(self.seed)
        self._coin_rng = torch.Generator().manual_seed(self.seed + 1)  # host-side: no device sync
        self._critic_loss, self._actor_loss = critic_loss, actor_loss  # compile_training() swaps these

        self.replay: OfflineBuffer | None = None
        if buffer is not None:
            self.set_buffer(buffer)
        self._init_surface(env, verbose, tensorboard_log)

    # data ------------------------------------------------------------------------------------
    def set_buffer(self, buffer: OfflineBuffer) -> None:
        """Use ``buffer`` for training: observations normalised (when configured), actions
        scaled to [-1, 1], rewards transformed, all moved to the training device once."""
        self.replay = self._training_view(buffer, transform_rewards(buffer.rewards, self.config.reward_transform))
        # A dataset of one-step episodes (a contextual bandit) never bootstraps: y = r exactly,
        # so the next-action chain of the TD target can be skipped. Checked once, not per step.
        self._bootstraps = not bool(buffer.terminals.all())

    def _check_can_learn(self) -> None:
        if self.replay is None:
            raise RuntimeError("DiffusionQL has no dataset: pass buffer=... or call set_buffer(buffer) before learn()")

    # the update ------------------------------------------------------------------------------
    def compile_training(self, **compile_kwargs: Any) -> None:
        """Run the update's two loss computations (forward and backward) through ``torch.compile``.

        Same math, fused element-wise kernels (the test suite compares losses and gradients with
        the eager step). The first step compiles (tens of seconds on a CPU, which also needs a C++
        compiler); optimizer steps and the target updates stay eager. ``compile_kwargs`` go to
        ``torch.compile``.
        """
        self._critic_loss = torch.compile(critic_loss, **compile_kwargs)
        self._actor_loss = torch.compile(actor_loss, **compile_kwargs)

    def critic_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The critic half's inputs: the batch and the TD target chain's noise, drawn from this
        model's generator (so a stack of seeds draws exactly what each single run would)."""
        cfg = self.config
        x = {
            "obs": batch.observations,
            "act": batch.actions,
            "rewards": batch.rewards,
            "next_obs": batch.next_observations,
            "not_dones": batch.not_dones,
        }
        if self._bootstraps:
            rows = batch.rewards.shape[0] * (cfg.n_max_q_samples if cfg.max_q_backup else 1)
            shape = (cfg.diffusion_steps, rows, self.policy.action_dim)
            x["next_noise"] = torch.randn(shape, device=self.device, generator=self._rng)
        return x

    def actor_inputs(self) -> dict[str, torch.Tensor]:
        """The actor half's random inputs: the critics' roles (host coin), the BC loss's steps and
        noise, the actor chain's noise."""
        cfg, rows, dim = self.config, self.config.batch_size, self.policy.action_dim
        coin = torch.rand((), generator=self._coin_rng) > 0.5
        x = {
            "t": torch.randint(0, cfg.diffusion_steps, (rows,), device=self.device, generator=self._rng),
            "bc_noise": torch.randn((rows, dim), device=self.device, generator=self._rng),
        }
        if cfg.eta > 0:  # eta = 0 is pure diffusion BC: no chain with gradients
            x["chain_noise"] = torch.randn((cfg.diffusion_steps, rows, dim), device=self.device, generator=self._rng)
            x["coin"] = coin.to(self.device)
        return x

    def _train_step(self) -> dict[str, torch.Tensor]:
        cfg = self.config
        x = self.critic_inputs(self.replay.sample(cfg.batch_size, self._rng))
        loss, losses = self._critic_loss(self.policy, cfg, x)
        skip = cfg.nonfinite_loss == "skip"
        if not self._loss_is_finite("critic_loss", loss, skip):
            return {"skipped_batches": torch.ones((), device=self.device)}
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_norm is not None:
            clip_grad_norm_(self.critic.parameters(), cfg.grad_norm)
        self.critic_optimizer.step()

        x |= self.actor_inputs()
        # The critic only scores the actor's actions: not asking for its gradients skips work the
        # official code does and then zeroes.
        self.critic.requires_grad_(False)
        try:
            loss, actor_losses = self._actor_loss(self.policy, cfg, x)
        finally:
            self.critic.requires_grad_(True)
        losses |= actor_losses
        if not self._loss_is_finite("actor_loss", loss, skip):
            return {"skipped_batches": torch.ones((), device=self.device)}
        self.actor_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_norm is not None:
            clip_grad_norm_(self.actor.parameters(), cfg.grad_norm)
        self.actor_optimizer.step()

        # EMA actor every `ema_update_every` steps from `ema_start_step`; targets every step.
        step = self._n_updates
        if step % cfg.ema_update_every == 0 and step >= cfg.ema_start_step:
            self._update_ema(1.0 - cfg.ema_decay)
        self._update_critic_target(cfg.tau)
        for scheduler in self.lr_schedulers:
            scheduler.step()
        return losses

    # checkpoints -----------------------------------------------------------------------------
    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor_optimizer": self.actor_optimizer, "critic_optimizer": self.critic_optimizer}

    def _training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"rng.train": self._rng.get_state(), "rng.coin": self._coin_rng.get_state()}
        meta = {"lr_schedulers": [s.state_dict() for s in self.lr_schedulers]}
        return tensors, meta

    def _load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self._rng.set_state(tensors["rng.train"])
        self._coin_rng.set_state(tensors["rng.coin"])
        for scheduler, state in zip(self.lr_schedulers, meta.get("lr_schedulers", []), strict=False):
            scheduler.load_state_dict(state)


__all__ = ["DiffusionQL", "actor_loss", "critic_loss"]
