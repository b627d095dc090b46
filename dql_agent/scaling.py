"""Past one device's fp32: mixed precision and data-parallel training, as every optimizer step sees them.

**Mixed precision** (the config field ``precision``): ``"fp32"`` (the default) computes as before;
``"bf16"`` runs the networks' forward passes (the diffusion sampler, the critics, the encoders)
under ``torch.autocast`` in bfloat16, on the CPU or CUDA; ``"fp16"`` does so in float16 on CUDA
only, with a gradient scaler per optimizer (fp16 gradients underflow without one). Parameters,
optimizer states, the EMA and the targets stay float32, so checkpoints do too.

**Data parallelism** (``learn(..., distributed=True)`` under ``torchrun``): every rank holds the
whole model and samples its own batches; before each optimizer step the gradients are averaged
over the ranks with one all-reduce, which is what PyTorch's DistributedDataParallel computes (DDP
overlaps the reduce with the backward pass; our updates step two or more optimizers over pure loss
functions, so the reduce is done here, per optimizer, on the flattened gradients). Ranks therefore
hold bit-identical weights after every step, and rank 0 alone logs, runs the callbacks and saves.

Rank 0 draws from the model's own training stream, the one a single process uses and a checkpoint
saves. Rank r > 0 reseeds its stream at every gradient step from (seed, r, step): no rank but 0 has
state to save, so a checkpoint resumes exactly on the same number of ranks and sensibly on any
other (ranks added draw fresh streams, ranks removed are gone; rank 0 goes on as before).

The training loop installs a :class:`StepHooks` for its duration (:func:`use`); ``optimize`` in
:mod:`dql_agent.networks` asks :func:`current` at every step. Nothing is installed outside
``learn``, so code that calls ``optimize`` by itself computes in plain fp32 on one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dql_agent.config import PRECISIONS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast region of ``precision`` on ``device`` (fp32: no region at all)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def check_precision(precision: str, device: torch.device) -> None:
    """A ValueError when ``device`` cannot compute in ``precision``: fp16 needs CUDA (its loss
    scaling is CUDA's), bf16 on CUDA needs a GPU with bf16 (Ampere or newer)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision='fp16' needs a CUDA device (float16 training needs loss scaling, which is CUDA's), got "
            f"device {device}; use precision='bf16' on {device.type} (fast on CPUs with AMX or AVX-512 BF16), "
            "or load with precision='fp32'"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' needs a GPU with bfloat16 (Ampere or newer); {device} has none: use 'fp16'")


class PeerLostError(RuntimeError):
    """A data-parallel run lost a rank (it died, was killed, or hung past the timeout)."""


@dataclass
class StepHooks:
    """What one ``learn`` adds to every optimizer step: fp16 loss scaling and the gradient average
    over data-parallel ranks. ``world_size`` 1 and no scaling is a plain step."""

    scale_losses: bool = False
    world_size: int = 1
    scalers: dict[int, Any] = field(default_factory=dict)
    skipped_steps: int = 0
    """Optimizer steps the fp16 scaler skipped for non-finite gradients (it then lowers the scale)."""

    def backward(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        # Autocast covers the forward passes; the backward runs in the dtypes they chose. In fp32
        # there is no autocast region to leave, and no context is made on every step.
        if not torch.is_autocast_enabled(loss.device.type):
            self._backward(optimizer, loss)
            return
        with torch.autocast(loss.device.type, enabled=False):
            self._backward(optimizer, loss)

    def _backward(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        if self.scale_losses:
            self._scaler(optimizer).scale(loss).backward()
        else:
            loss.backward()

    def reduce(self, params: Sequence[torch.Tensor], loss_ok: torch.Tensor | None) -> torch.Tensor | None:
        """Average the gradients of ``params`` over the ranks, in one all-reduce of them flattened
        with the ranks' loss flags; returns whether the loss was finite on every rank (``loss_ok``
        is this rank's), so that all ranks refuse a step together: a rank that stepped alone would
        leave the others' weights behind."""
        if self.world_size == 1:
            return loss_ok
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        parts = [g.reshape(-1) for g in grads]
        if loss_ok is not None:  # counts the ranks whose loss is not finite
            parts.append((~loss_ok).to(parts[0].dtype).reshape(1))
        flat = torch.cat(parts)
        try:
            dist.all_reduce(flat)
        except RuntimeError as error:  # gloo's and NCCL's errors are RuntimeErrors
            raise lost_peer(error) from None
        offset = 0
        for grad in grads:
            n = grad.numel()
            grad.copy_(flat[offset : offset + n].view_as(grad)).div_(self.world_size)
            offset += n
        return None if loss_ok is None else flat[-1] == 0

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scale_losses:
            self._scaler(optimizer).unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, finite: bool) -> None:
        """The optimizer step; with loss scaling the scaler's (it skips a non-finite step and lowers
        its scale, which is loss scaling working, not an error)."""
        if not self.scale_losses:
            optimizer.step()
            return
        scaler = self._scaler(optimizer)
        if not finite:
            self.skipped_steps += 1
        scaler.step(optimizer)
        scaler.update()

    def _scaler(self, optimizer: torch.optim.Optimizer) -> Any:
        key = id(optimizer)
        if key not in self.scalers:
            self.scalers[key] = new_scaler(optimizer)
        return self.scalers[key]


def new_scaler(optimizer: torch.optim.Optimizer) -> Any:
    """A loss scaler for ``optimizer``'s device, with torch's defaults (scale 2**16, halved on an
    overflow, doubled after 2000 steps without one)."""
    return torch.amp.GradScaler(optimizer.param_groups[0]["params"][0].device.type)


def scaler_state(scaler: Any) -> dict[str, Any]:
    """What a checkpoint keeps of a loss scaler: its scale and the steps since it last overflowed."""
    state = scaler.state_dict()
    return {"scale": float(state["scale"]), "growth_tracker": int(state["_growth_tracker"])}


def restored_scaler(state: Any, optimizer: torch.optim.Optimizer, field: str) -> Any:
    """A loss scaler from :func:`scaler_state`'s dict, checked (a ValueError names ``field``)."""
    import math

    if not isinstance(state, dict) or set(state) != {"scale", "growth_tracker"}:
        raise ValueError(f"{field} must be {{'scale': float, 'growth_tracker': int}}, got {state!r}")
    scale, tracker = state["scale"], state["growth_tracker"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{field}['scale'] must be a finite float > 0, got {scale!r}")
    if isinstance(tracker, bool) or not isinstance(tracker, int) or tracker < 0:
        raise ValueError(f"{field}['growth_tracker'] must be an int >= 0, got {tracker!r}")
    scaler = new_scaler(optimizer)
    scaler.load_state_dict({**scaler.state_dict(), "scale": float(scale), "_growth_tracker": tracker})
    return scaler


_CURRENT: ContextVar[StepHooks | None] = ContextVar("dql_agent_step_hooks", default=None)


def current() -> StepHooks | None:
    """The hooks of the ``learn`` in progress (None outside one)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use(hooks: StepHooks) -> Iterator[StepHooks]:
    """Install ``hooks`` for every ``optimize`` in the block (in this thread or task only)."""
    token = _CURRENT.set(hooks)
    try:
        yield hooks
    finally:
        _CURRENT.reset(token)


# data parallelism ------------------------------------------------------------------------------
TIMEOUT = datetime.timedelta(minutes=10)
"""How long a rank waits in a collective for a peer before the run fails (a hung, not dead, peer)."""


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: one process is ``World(0, 1)``."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, runs callbacks and saves."""
        return self.rank == 0


def init_distributed(device: torch.device) -> World:
    """This process's :class:`World`, joining the process group ``torchrun`` describes in the
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) if it has not been joined yet: gloo on
    the CPU, NCCL on CUDA."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch was built without torch.distributed: distributed=True cannot run")
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"distributed=True needs the process group torchrun sets up, but {missing} are not in the "
                "environment: start the script with `torchrun --nproc-per-node N script.py` (or run "
                "`torchrun --nproc-per-node N -m dql_agent.cli train --distributed ...`)"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size())


def local_cuda_device() -> torch.device | None:
    """cuda:LOCAL_RANK under torchrun on a CUDA machine (one GPU per rank), else None."""
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return None


def is_main_process() -> bool:
    """False only on ranks > 0 of a joined process group: guard a script's own saves and pushes
    with it (``learn`` already logs, saves and runs callbacks on rank 0 alone)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def broadcast_module(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (they should start equal: this makes sure)."""
    import torch.distributed as dist

    try:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
    except RuntimeError as error:  # gloo's and NCCL's errors are RuntimeErrors
        raise lost_peer(error) from None


def agree(go_on: bool, interrupted: bool, device: torch.device) -> tuple[bool, bool]:
    """(go on, interrupted) as every rank will act on them: go on while all do, and stop as
    interrupted when any rank was (so all ranks stop after the same step)."""
    import torch.distributed as dist

    votes = torch.tensor([0.0 if go_on else 1.0, 1.0 if interrupted else 0.0], device=device)
    try:
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    except RuntimeError as error:  # gloo's and NCCL's errors are RuntimeErrors
        raise lost_peer(error) from None
    stop, interrupt = votes.tolist()
    return stop == 0.0, interrupt > 0.0


def gather_all(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    """``tensor`` of every rank, in rank order."""
    import torch.distributed as dist

    out = [torch.empty_like(tensor) for _ in range(world.size)]
    try:
        dist.all_gather(out, tensor)
    except RuntimeError as error:  # gloo's and NCCL's errors are RuntimeErrors
        raise lost_peer(error) from None
    return out


def rank_stream_seed(seed: int, rank: int, step: int) -> int:
    """The seed of rank ``rank``'s random draws at gradient step ``step`` (rank > 0)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def lost_peer(error: BaseException) -> PeerLostError:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else "?"
    return PeerLostError(
        f"rank {rank} lost its peers in the middle of a training step (another rank died, was killed, or "
        f"hung for more than {TIMEOUT}): training stopped without saving this half-finished step, so the "
        f"last checkpoint on disk is the one to resume from. The collective failed with: {error}"
    )
