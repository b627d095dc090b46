"""Several seeds in one process: independent DiffusionQL replicas trained as one batched update.

``train_seeds(buffer, [0, 1, 2, 3, 4], n)`` builds one ordinary ``DiffusionQL`` per seed (so each
starts exactly as a separate run would), stacks the parameters of their four networks along a
leading replica dimension and runs the Diffusion-QL update of all replicas at once with
``torch.func.vmap`` over ``torch.func.grad_and_value`` of ``functional_call``: every layer becomes
one batched matmul over the replicas instead of one small matmul per run.

Replica i follows the trajectory of ``DiffusionQL(buffer, seed=seeds[i]).learn(n)``, up to the
float rounding of batched against unbatched matmuls and reductions:

- its random tensors (batch indices, the TD target's chain noise, the BC loss's steps and noise,
  the actor chain's noise, the critic-role coin) are drawn by its own model
  (``DiffusionQL.critic_inputs``/``actor_inputs``, as the single run draws them), then stacked and
  fed to the single run's own loss functions under vmap (vmap's own randomness stays off: a hidden
  draw inside would be an error);
- gradients are per replica (the grad transform sits inside vmap), clipped per replica with that
  replica's own total norm, as ``clip_grad_norm_`` does;
- each model's parameters are views into the stacked tensors while training, and one Adam per
  network steps all replicas' parameters (one state per parameter, so each replica keeps its own
  step count: a skipped batch is skipped exactly); EMA and target updates, the EMA schedule and
  the NaN/inf guard are those of the single run.

What is not per replica: with ``lr_decay`` the cosine schedule is shared, so a replica that
skipped a batch (``nonfinite_loss='skip'``) runs one schedule step ahead of its single run.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from dql_agent.buffer import OfflineBuffer
from dql_agent.config import DiffusionQLConfig
from dql_agent.diffusion_ql import DiffusionQL, actor_loss, critic_loss

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params, Params, Params], tuple[torch.Tensor, Params]]
NETWORKS = ("actor", "ema_actor", "critic", "critic_target")


def train_seeds(
    buffer: OfflineBuffer,
    seeds: Sequence[int],
    total_timesteps: int,
    *,
    device: str | torch.device = "auto",
    preset: str | None = None,
    log_interval: int = 1000,
    verbose: int = 0,
    **hyperparameters: Any,
) -> list[DiffusionQL]:
    """Train one DiffusionQL per seed on ``buffer``, all replicas in one batched update.

    Much cheaper than separate runs where a single run leaves the device idle (a GPU at batch
    256); on a CPU the matmuls are the same work either way.

    Args:
        buffer: the offline dataset, shared by all replicas (kept on the device once).
        seeds: distinct seeds, one replica each; replica i is what
            ``DiffusionQL(buffer, seed=seeds[i], ...).learn(total_timesteps)`` would train, up to
            float rounding.
        total_timesteps: gradient steps per replica.
        device: 'auto', 'cpu', 'cuda', ...
        preset: task preset of the official code (see ``dql_agent.config.PRESETS``).
        log_interval: every this many steps each model writes its mean losses to its own SB3
            logger (``train/critic_loss``, ...; stdout with ``verbose=1``); 0 never.
        verbose: passed to each model.
        **hyperparameters: fields of :class:`DiffusionQLConfig`, the same for every replica.

    Returns:
        The trained models, in the order of ``seeds``: ordinary ``DiffusionQL`` objects with
        their own weights and optimizer state, ready for ``predict``, ``save`` and ``learn``.
    """
    if not isinstance(buffer, OfflineBuffer):
        raise TypeError(f"buffer must be an OfflineBuffer, got {type(buffer).__name__}")
    seeds = _check_seeds(seeds)
    if not isinstance(total_timesteps, (int, np.integer)) or isinstance(total_timesteps, bool) or total_timesteps < 0:
        raise ValueError(f"total_timesteps must be an int >= 0, got {total_timesteps!r}")
    if not isinstance(log_interval, (int, np.integer)) or log_interval < 0:
        raise ValueError(f"log_interval must be an int >= 0, got {log_interval!r}")
    models: list[DiffusionQL] = []
    for seed in seeds:
        model = DiffusionQL(buffer, device=device, seed=seed, preset=preset, verbose=verbose, **hyperparameters)
        if models:
            # Same buffer and config give the same training view: keep one copy on the device.
            model.replay = models[0].replay
        models.append(model)
    stack = SeedStack(models)
    try:
        stack.learn(int(total_timesteps), int(log_interval))
    finally:
        stack.unstack()
    return models


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a sequence of ints, got {type(seeds).__name__}")
    if len(seeds) == 0:
        raise ValueError("seeds must hold at least one seed, got an empty sequence")
    for position, seed in enumerate(seeds):
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seeds must be ints, got {seed!r} ({type(seed).__name__}) at position {position}")
    values = [int(s) for s in seeds]
    repeated = sorted({s for s in values if values.count(s) > 1})
    if repeated:
        raise ValueError(
            f"seeds must be distinct (a repeat trains the same replica twice), got {values}; repeated: {repeated}"
        )
    return values


class _ReplicaMath(nn.Module):
    """One replica's losses (``diffusion_ql.critic_loss``/``actor_loss``, the single run's own code)
    as a module, so ``torch.func.functional_call`` can swap in that replica's parameter slices."""

    def __init__(self, model: DiffusionQL):
        super().__init__()
        self.policy, self.config = model.policy, model.config

    def forward(self, stage: str, x: Params) -> tuple[torch.Tensor, Params]:
        return (critic_loss if stage == "critic" else actor_loss)(self.policy, self.config, x)


class SeedStack:
    """DiffusionQL models of one config trained in lockstep; see the module docstring.

    While it lives, each model's parameters are views into ``self.params`` (name -> (R, ...));
    :meth:`unstack` gives each model its own copy and its share of the optimizer state.
    """

    def __init__(self, models: Sequence[DiffusionQL]):
        self.models = list(models)
        if not self.models:
            raise ValueError("models must hold at least one DiffusionQL, got none")
        first = self.models[0]
        self.config: DiffusionQLConfig = first.config
        for model in self.models[1:]:
            for field, ours, theirs in (
                ("config", first.config, model.config),
                ("device", first.device, model.device),
                ("gradient step (_n_updates; the EMA schedule is shared)", first._n_updates, model._n_updates),
            ):
                if ours != theirs:
                    raise ValueError(
                        f"models must share one {field}: the model with seed {first.seed} has {ours}, "
                        f"the one with seed {model.seed} has {theirs}"
                    )
        self.device = first.device
        self.math = _ReplicaMath(first)
        per_model = [dict(_ReplicaMath(m).named_parameters()) for m in self.models]
        self.names = {net: [n for n in per_model[0] if n.startswith(f"policy.{net}.")] for net in NETWORKS}
        self.params: Params = {}
        for name in per_model[0]:
            self.params[name] = torch.stack([p[name].detach() for p in per_model])
            for i, p in enumerate(per_model):
                p[name].data = self.params[name][i]  # the model's Parameter now lives in the stack
        self._replica_params = per_model
        # One Adam per network over every replica's own Parameter objects (views into the stack):
        # elementwise, so exactly each replica's Adam, with one state (and step count) per replica.
        self.optimizers = {
            net: torch.optim.Adam([p[n] for p in per_model for n in self.names[net]], lr=lr)
            for net, lr in (("actor", self.config.learning_rate), ("critic", self.config.critic_learning_rate))
        }
        self.schedulers = []
        if self.config.lr_decay:
            self.schedulers = [
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.config.lr_decay_steps, eta_min=0.0)
                for opt in self.optimizers.values()
            ]
        # Models that trained before (e.g. loaded with their optimizer state) carry on exactly.
        for net, shared in self.optimizers.items():
            for model in self.models:
                own = model._optimizers()[f"{net}_optimizer"]
                shared.state.update({p: own.state[p] for p in own.param_groups[0]["params"] if p in own.state})
        for shared, own in zip(self.schedulers, first.lr_schedulers, strict=True):
            shared.load_state_dict(own.state_dict())
        for net, shared in self.optimizers.items():
            shared.param_groups[0]["lr"] = first._optimizers()[f"{net}_optimizer"].param_groups[0]["lr"]
        self._stacked_now = True
        self._critic_grad = vmap(grad_and_value(self._loss("critic"), has_aux=True))
        self._actor_grad = vmap(grad_and_value(self._loss("actor"), has_aux=True))

    def _loss(self, stage: str) -> LossFn:
        """loss(trained params, frozen params, inputs) of one replica, for grad_and_value."""

        def loss(trained: Params, frozen: Params, x: Params) -> tuple[torch.Tensor, Params]:
            return functional_call(self.math, {**trained, **frozen}, (stage, x))

        return loss

    def _network(self, net: str) -> Params:
        return {n: self.params[n] for n in self.names[net]}

    # one update of every replica -----------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        """One gradient step of every replica, counted as ``learn`` counts it; returns the losses,
        each (R,), with 0 and ``skipped_batches`` 1 where a replica skipped its batch."""
        if not self._stacked_now:
            raise RuntimeError("this SeedStack was unstacked; build a new one to train the models together")
        cfg, models = self.config, self.models
        first = models[0]
        active = [True] * len(models)
        b = cfg.batch_size

        # Critic. Each replica draws its batch and TD chain noise as its single run does.
        inputs = [m.critic_inputs(m.replay.sample(b, m._rng)) for m in models]
        x = {key: torch.stack([i[key] for i in inputs]) for key in inputs[0]}
        frozen = self._network("ema_actor") | self._network("critic_target")
        grads, (_, critic_losses) = self._critic_grad(self._network("critic"), frozen, x)
        self._check_finite("critic_loss", critic_losses["critic_loss"], active)
        self._apply("critic", grads, active)

        # Actor. Draws per replica still taking the step; one that skipped gets zeros (its losses are
        # computed and thrown away) and keeps its generators where its single run would.
        draws = [m.actor_inputs() if taking else None for m, taking in zip(models, active, strict=True)]
        like = next((d for d in draws if d is not None), None)
        if like is not None:
            for key, value in like.items():
                x[key] = torch.stack([torch.zeros_like(value) if d is None else d[key] for d in draws]).to(self.device)
        losses = dict(critic_losses)
        if like is not None:
            # The updated critics score the new actions as frozen inputs: no gradients for them.
            grads, (_, actor_losses) = self._actor_grad(self._network("actor"), self._network("critic"), x)
            self._check_finite("actor_loss", actor_losses["actor_loss"], active)
            self._apply("actor", grads, active)
            losses.update(actor_losses)

        # EMA actor every `ema_update_every` steps from `ema_start_step`; targets every step.
        step = first._n_updates
        update_ema = step % cfg.ema_update_every == 0 and step >= cfg.ema_start_step
        if all(active):  # one fused call over the stacks
            if update_ema:
                torch._foreach_lerp_(self._stacked("ema_actor"), self._stacked("actor"), 1.0 - cfg.ema_decay)
            torch._foreach_lerp_(self._stacked("critic_target"), self._stacked("critic"), cfg.tau)
        else:
            for m in (m for m, taking in zip(models, active, strict=True) if taking):
                if update_ema:
                    m._update_ema(1.0 - cfg.ema_decay)
                m._update_critic_target(cfg.tau)
        if any(active):
            for scheduler in self.schedulers:
                scheduler.step()
        for model in models:
            model.num_timesteps += 1
            model._n_updates += 1
        if not all(active):  # as the single run reports a skipped batch
            taking = torch.tensor(active, device=self.device)
            losses = {k: torch.where(taking, v, 0.0) for k, v in losses.items()}
            losses["skipped_batches"] = (~taking).float()
        return losses

    def _stacked(self, net: str) -> list[torch.Tensor]:
        return [self.params[n] for n in self.names[net]]

    def _check_finite(self, name: str, losses: torch.Tensor, active: list[bool]) -> None:
        """The single run's NaN/inf guard, per replica: raise naming the seed, or mark it skipped.
        One host read for all replicas."""
        finite = torch.isfinite(losses).tolist()
        if all(finite):
            return
        step = self.models[0]._n_updates + 1
        for i, (ok, model) in enumerate(zip(finite, self.models, strict=True)):
            if ok or not active[i]:
                continue
            value = float(losses[i])
            if self.config.nonfinite_loss == "skip":
                warnings.warn(
                    f"{name} is {value} at gradient step {step} of the replica with seed {model.seed}: "
                    "skipping its batch",
                    stacklevel=3,
                )
                active[i] = False
                continue
            raise FloatingPointError(
                f"{name} is {value} at gradient step {step} of the replica with seed {model.seed}; no weights "
                "were updated with it. Check the data (rewards/observations scale), lower learning_rate or set "
                "grad_norm, or pass nonfinite_loss='skip'"
            )

    def _apply(self, net: str, grads: Params, active: list[bool]) -> None:
        """Clip each replica's gradient by its own total norm, then one Adam step of the replicas taking it."""
        max_norm = self.config.grad_norm
        if max_norm is not None:
            # clip_grad_norm_ per replica: the norm over that replica's slices of every tensor.
            norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()])  # (P, R)
            coef = (max_norm / (torch.linalg.vector_norm(norms, dim=0) + 1e-6)).clamp(max=1.0)  # (R,)
            torch._foreach_mul_(list(grads.values()), [coef.view(-1, *[1] * (g.dim() - 1)) for g in grads.values()])
        for i, (params, taking) in enumerate(zip(self._replica_params, active, strict=True)):
            if taking:  # a replica with no .grad is left alone by Adam (state and step count too)
                for name, g in grads.items():
                    params[name].grad = g[i]
        self.optimizers[net].step()
        self.optimizers[net].zero_grad(set_to_none=True)

    # the loop ------------------------------------------------------------------------------------
    def learn(self, total_timesteps: int, log_interval: int = 1000) -> SeedStack:
        """``total_timesteps`` steps of every replica, with ``learn``'s bookkeeping and logging."""
        for model in self.models:
            model._check_can_learn()
            model.policy.train()
        sums: dict[str, torch.Tensor] = {}
        n_summed, start = 0, time.time()
        try:
            for _ in range(total_timesteps):
                losses = self.train_step()
                for key, value in losses.items():  # summed on the device: no host sync per step
                    sums[key] = sums[key] + value if key in sums else value.clone()
                n_summed += 1
                if log_interval and self.models[0].num_timesteps % log_interval == 0:
                    self._dump_logs(sums, n_summed, start)
                    sums, n_summed = {}, 0
            if n_summed and log_interval:
                self._dump_logs(sums, n_summed, start)
        finally:
            for model in self.models:
                model.policy.eval()
        return self

    def _dump_logs(self, sums: dict[str, torch.Tensor], n: int, start: float) -> None:
        for i, model in enumerate(self.models):
            model._dump_logs({k: v[i] for k, v in sums.items()}, n, start)

    def unstack(self) -> None:
        """End the stack: each model gets its own copy of its weights and its share of the
        optimizer and scheduler state, as if it had trained alone."""
        if not self._stacked_now:
            return
        self._stacked_now = False
        for params in self._replica_params:
            for p in params.values():
                p.data = p.data.clone()
        for net, shared in self.optimizers.items():
            for model in self.models:
                own = model._optimizers()[f"{net}_optimizer"]
                for p in own.param_groups[0]["params"]:
                    if p in shared.state:
                        own.state[p] = shared.state[p]
                own.param_groups[0]["lr"] = shared.param_groups[0]["lr"]
        for model in self.models:
            for own, shared in zip(model.lr_schedulers, self.schedulers, strict=True):
                own.load_state_dict(shared.state_dict())


__all__ = ["SeedStack", "train_seeds"]
