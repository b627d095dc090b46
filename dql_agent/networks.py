"""Networks: the noise-prediction MLP, batched ensembles of MLPs (twin critics, value nets), and
the two ways they are updated (an optimizer step, a Polyak/EMA average)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import clip_grad_norm_

from dql_agent import scaling

# On CUDA ``F.mish`` is one fused kernel. On the CPU builds of torch it is scalar code (measured on
# the benchmark machine: 4.6 ns per element, ~14x torch.sigmoid), and Mish took a third of a
# training step, so there it is computed from one sigmoid: with s = sigmoid(x) and
# n = s (2 - s) = 1 - (1 - s)^2, tanh(softplus(x)) = n / (2 - n). Every term is bounded
# (s in [0, 1], 2 - n in [1, 2]), so nothing overflows. Turn this off to run the plain path.
FAST_CPU_MISH = True


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish(x) = x tanh(softplus(x)); same values as ``F.mish`` to float rounding (~1e-6)."""
    if not FAST_CPU_MISH or x.device.type != "cpu":
        return F.mish(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SigmoidMish.apply(x)[0]
    return _tanh_softplus(torch.sigmoid(x)).mul_(x)  # acting: skip the autograd.Function's overhead


def mish_derivative(x: torch.Tensor) -> torch.Tensor:
    """d/dx Mish(x) = tanh(sp(x)) + x sigmoid(x) (1 - tanh(sp(x))^2), sp = softplus (no autograd)."""
    s = torch.sigmoid(x)
    tsp = _tanh_softplus(s)
    return tsp + x * s * (1.0 - tsp * tsp)


def _tanh_softplus(s: torch.Tensor) -> torch.Tensor:
    # In-place after the first op: fresh tensors of training size cost more than the math here.
    n = torch.rsub(s, 2.0).mul_(s)
    return torch.rsub(n, 2.0).reciprocal_().mul_(n)


class _SigmoidMish(torch.autograd.Function):
    generate_vmap_rule = True  # so torch.func.vmap (stacked seeds) can run through it

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.sigmoid(x)
        return _tanh_softplus(s).mul_(x), s  # s is kept for the backward pass

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        # d/dx x tanh(sp(x)) = tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2)
        x, s = ctx.saved_tensors
        tsp = _tanh_softplus(s)
        return torch.mul(tsp, tsp).neg_().add_(1.0).mul_(s).mul_(x).add_(tsp).mul_(grad)


class Mish(nn.Module):
    """``nn.Mish`` through :func:`mish`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sin/cos features of a scalar step: (B,) -> (B, dim)."""

    frequencies: torch.Tensor

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"time embedding dim must be an even number >= 4, got {dim}")
        half = dim // 2
        frequencies = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class NoiseMLP(nn.Module):
    """eps(x_t, t, s): MLP on [x_t, time embedding, state] with Mish, as in Diffusion-QL.

    Time: sinusoidal(time_dim) -> Linear(time_dim, time_hidden_dim) -> Mish -> Linear(., time_dim),
    ``time_hidden_dim`` 2 * time_dim by default (Diffusion-QL's; QVPO's official code uses 256).
    Body: n_hidden x (Linear(hidden_dim) + Mish), then Linear(hidden_dim, action_dim).
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        hidden_dim: int = 256,
        n_hidden: int = 3,
        time_dim: int = 16,
        time_hidden_dim: int | None = None,
    ):
        super().__init__()
        self.state_dim, self.action_dim, self.time_dim = state_dim, action_dim, time_dim
        time_hidden_dim = 2 * time_dim if time_hidden_dim is None else time_hidden_dim
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(time_dim),
            nn.Linear(time_dim, time_hidden_dim),
            Mish(),
            nn.Linear(time_hidden_dim, time_dim),
        )
        self.input_layer = nn.Linear(action_dim + time_dim + state_dim, hidden_dim)
        layers: list[nn.Module] = []
        for _ in range(n_hidden - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), Mish()]
        self.hidden_layers = nn.Sequential(*layers)
        self.output_layer = nn.Linear(hidden_dim, action_dim)
        # The sampler's loop calls the layers functionally: a module call costs as much as a
        # small layer's arithmetic when acting on one observation.
        self._hidden_linears = [m for m in self.hidden_layers if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """x: (B, A), t: (B,) integer steps, state: (B, S) -> predicted noise (B, A)."""
        h = self.input_layer(torch.cat([x, self.time_mlp(t), state], dim=-1))
        return self.output_layer(self.hidden_layers(mish(h)))

    # The reverse chain calls the network T times on the same states. Splitting the first
    # layer's weight by input block lets the sampler compute the state's share once per chain
    # and the time's share once per step, leaving one small matmul on x_t per step.
    def state_features(self, state: torch.Tensor) -> torch.Tensor:
        """W_s s + b, the state's (and bias's) share of the first layer: (B, S) -> (B, H)."""
        w_state = self.input_layer.weight[:, self.action_dim + self.time_dim :]
        return F.linear(state, w_state, self.input_layer.bias)

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        """W_t emb(t), the step's share of the first layer: (K,) -> (K, H)."""
        w_time = self.input_layer.weight[:, self.action_dim : self.action_dim + self.time_dim]
        return F.linear(self.time_mlp(t), w_time)

    def forward_from_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Same value as ``forward(x, t, s)`` given ``state_features(s) + time_features(t)``."""
        h = mish(torch.addmm(features, x, self.input_layer.weight[:, : self.action_dim].t()))
        for layer in self._hidden_linears:
            h = mish(F.linear(h, layer.weight, layer.bias))
        return F.linear(h, self.output_layer.weight, self.output_layer.bias)


class EnsembleMLP(nn.Module):
    """``n_members`` independent MLPs evaluated as one batched matmul per layer.

    Each member is Linear(in, H) -> Mish -> ... -> Linear(H, out), initialised like
    ``nn.Linear`` (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), so a 2-member ensemble is exactly the
    twin critics of TD3/Diffusion-QL, computed in one pass. Input (B, in) or (n, B, in);
    output (n, B, out). With ``layer_norm`` every hidden pre-activation is layer-normalised (a
    per-member scale and shift, initialised to 1 and 0) before the Mish, a known stabiliser of
    offline critics; off, the module holds exactly the parameters it always had.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        n_members: int = 2,
        hidden_dim: int = 256,
        n_hidden: int = 3,
        layer_norm: bool = False,
    ):
        super().__init__()
        self.n_members, self.layer_norm = n_members, layer_norm
        dims = [in_dim] + [hidden_dim] * n_hidden + [out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:], strict=True):
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(n_members, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n_members, 1, fan_out).uniform_(-bound, bound)))
        self.norm_scales = nn.ParameterList()  # no random draws: the initialisation above is unchanged
        self.norm_shifts = nn.ParameterList()
        if layer_norm:
            for _ in range(n_hidden):
                self.norm_scales.append(nn.Parameter(torch.ones(n_members, 1, hidden_dim)))
                self.norm_shifts.append(nn.Parameter(torch.zeros(n_members, 1, hidden_dim)))

    def activation(self, i: int, pre: torch.Tensor) -> torch.Tensor:
        """Hidden layer ``i``'s output from its pre-activation (n, B, H): Mish, after LayerNorm if on."""
        if self.layer_norm:
            normed = F.layer_norm(pre, pre.shape[-1:])
            pre = torch.addcmul(self.norm_shifts[i], normed, self.norm_scales[i])
        return mish(pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.n_members, -1, -1)
        return self.forward_from_first_layer(torch.baddbmm(self.biases[0], x, self.weights[0]))

    def input_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """d out / d x of a one-output ensemble, written out (no autograd, so it exports to ONNX):
        x (B, in) -> (n, B, in), member i's gradient of its output at x."""
        if self.layer_norm:
            raise NotImplementedError("input_gradient is written out for Mish layers without LayerNorm")
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.n_members, -1, -1)
        pre = [torch.baddbmm(self.biases[0], x, self.weights[0])]  # pre-activations of the hidden layers
        for i in range(1, len(self.weights) - 1):
            pre.append(torch.baddbmm(self.biases[i], mish(pre[-1]), self.weights[i]))
        grad = self.weights[-1].transpose(1, 2)  # (n, 1, H): d out / d (last hidden activation)
        for i in reversed(range(len(pre))):
            grad = torch.matmul(grad * mish_derivative(pre[i]), self.weights[i].transpose(1, 2))
        return grad  # (n, B, in)

    def forward_from_first_layer(self, h: torch.Tensor) -> torch.Tensor:
        """The rest of the network given the first layer's pre-activation (n, B, H)."""
        # Index, do not slice: a ParameterList slice re-wraps tensors swapped in by
        # torch.func.functional_call as new Parameters, cutting them off from torch.func.grad.
        for i in range(1, len(self.weights)):
            h = torch.baddbmm(self.biases[i], self.activation(i - 1, h), self.weights[i])
        return h


class Critic(nn.Module):
    """Ensemble of Q(s, a) heads (twin critics by default): returns (n_members, B)."""

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        n_members: int = 2,
        hidden_dim: int = 256,
        n_hidden: int = 3,
        layer_norm: bool = False,
    ):
        super().__init__()
        self.q = EnsembleMLP(state_dim + action_dim, 1, n_members, hidden_dim, n_hidden, layer_norm)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.q(torch.cat([state, action], dim=-1)).squeeze(-1)

    def q_min(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """min over members, (B,)."""
        return self.forward(state, action).min(dim=0).values

    def q_min_of_candidates(self, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min-Q of n candidate actions per state: states (B, S), actions (B * n, A) state-major
        -> (B, n). Same value as ``q_min`` on the states repeated n times, with the state's share
        of the first layer computed once per state rather than once per candidate."""
        batch, state_dim = states.shape
        members, w, b = self.q.n_members, self.q.weights[0], self.q.biases[0]
        state_part = torch.baddbmm(b, states.expand(members, -1, -1), w[:, :state_dim])  # (m, B, H)
        action_part = torch.matmul(actions, w[:, state_dim:])  # (m, B * n, H)
        h = action_part.view(members, batch, -1, w.shape[-1]) + state_part.unsqueeze(2)
        q = self.q.forward_from_first_layer(h.view(members, -1, w.shape[-1]))  # (m, B * n, 1)
        return q.view(members, batch, -1).min(dim=0).values


class SoftUpdate:
    """target <- target + rate * (source - target) for every parameter, in one fused call.

    Used for Polyak target critics and EMA actors. The parameter lists are built once: the update
    runs every gradient step and ``load_state_dict``/``.to`` keep the same Parameter objects.
    """

    def __init__(self, target: nn.Module, source: nn.Module):
        self.target: list[torch.Tensor] = list(target.parameters())
        self.source: list[torch.Tensor] = list(source.parameters())

    @torch.no_grad()
    def __call__(self, rate: float) -> None:
        torch._foreach_lerp_(self.target, self.source, rate)


@torch.no_grad()
def scaled_normal_init(module: nn.Module) -> None:
    """Weights N(0, 1 / (2 sqrt(fan_in))), biases 0, for every ``nn.Linear`` and
    :class:`EnsembleMLP` in ``module``: QVPO's official initialisation. (Its helper means a normal
    truncated at 2 std, but its resampling loop rebinds a local name, so the weights it leaves are
    the untruncated normal draw, which is what this reproduces.)"""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.weight.normal_(0.0, 1.0 / (2.0 * math.sqrt(sub.in_features)))
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, EnsembleMLP):
            for weight, bias in zip(sub.weights, sub.biases, strict=True):
                weight.normal_(0.0, 1.0 / (2.0 * math.sqrt(weight.shape[1])))
                bias.zero_()


def optimize(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor | None = None,
    *,
    grads: Sequence[torch.Tensor] | None = None,
    grad_norm: float | None = None,
    require_finite: bool = False,
) -> bool:
    """One step of ``optimizer``: gradients from ``loss.backward()``, or ``grads`` given one per
    parameter in the optimizer's order (stacked seeds compute them under vmap), clipped to a total
    norm of ``grad_norm`` when it is set. Returns whether the step was taken.

    With ``require_finite`` the step is taken only if the loss and the total gradient norm are
    finite (a finite loss can still overflow its gradients); both are read in one host read.

    Inside ``learn`` the training loop's :class:`dql_agent.scaling.StepHooks` join in: the gradients
    are averaged over data-parallel ranks before clipping, and under fp16 the loss is scaled and
    the gradients unscaled (a non-finite gradient of a finite loss is then the scaler's to skip).
    """
    hooks = scaling.current()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    if loss is not None:
        if hooks is None:
            loss.backward()
        else:
            hooks.backward(optimizer, loss)
    elif grads is not None:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
    else:
        raise TypeError("optimize needs a loss or grads")
    # Whether the loss is finite (on every rank, when data-parallel), kept on the device; only
    # computed where it is read: the finiteness check, or the ranks' flags folded into the all-reduce.
    wanted = require_finite or (hooks is not None and hooks.world_size > 1)
    loss_ok = torch.isfinite(loss.detach()) if loss is not None and wanted else None
    if hooks is not None:
        loss_ok = hooks.reduce(params, loss_ok)
        hooks.unscale(optimizer)
    if grad_norm is not None:
        total_norm = clip_grad_norm_(params, grad_norm)
    elif require_finite:
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    finite = True
    if require_finite:
        checks = [torch.isfinite(total_norm)] if loss_ok is None else [loss_ok, torch.isfinite(total_norm)]
        flags = torch.stack(checks).tolist()  # one host read for both
        finite, loss_finite = all(flags), loss_ok is None or bool(flags[0])
        if not finite and not (hooks is not None and hooks.scale_losses and loss_finite):
            optimizer.zero_grad(set_to_none=True)
            return False
    if hooks is None:
        optimizer.step()
    else:
        hooks.step(optimizer, finite)
    return True
