"""What one QVPO step costs on Pendulum-v1, where the time goes, and what it computes.

A QVPO timestep (``utd_ratio=1``) is one env step followed by one gradient step. The gradient step
draws, without gradients, ``n_target_samples`` target-actor actions per next state (the TD target)
and ``n_diffusion_samples`` current-actor actions per state (the Q-weighted loss), each through
the whole reverse chain of ``diffusion_steps`` denoiser calls, and scores them with the critics;
then one denoiser forward and backward on the best sample and the ``n_entropy_samples`` uniform
actions per state, and one critic update. With the defaults (batch 256, N_d 64, T 20) that is
256 x 64 x 20 = 327,680 denoiser rows per update for the actor's samples alone.

Run (one torch thread; OMP_NUM_THREADS=1)::

    OMP_NUM_THREADS=1 python -m benchmarks.qvpo_speed --seconds 30
    OMP_NUM_THREADS=1 python -m benchmarks.qvpo_speed --seconds 30 --chunk-rows 0   # the chains in one pass
    OMP_NUM_THREADS=1 python -m benchmarks.qvpo_speed --seconds 20 --profile   # + torch.profiler table

Prints timesteps/s after the warm-up (updates every step), the seconds per update of each phase
(timed with the phase's own calls on the same batch sizes), the denoiser and critic FLOPs per
update, and the achieved GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, parse_set, write_results

ENV_ID = "Pendulum-v1"


def mlp_flops(sizes: list[int], rows: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of an MLP with layer ``sizes`` over ``rows`` rows."""
    return 2.0 * rows * sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))


def flops_per_update(model: Any) -> dict[str, float]:
    """Denoiser and critic FLOPs of one update, by phase, from the layer sizes."""
    cfg = model.config
    s, a = model.policy.obs_dim, model.policy.action_dim
    hidden = [cfg.hidden_dim] * cfg.n_hidden
    # The denoiser sees [x_t, time embedding, state]; its first layer's state and time shares are
    # computed once per chain and step (not per row), so count the action's share per row and the
    # rest once per state and step.
    denoiser_rows = [a, *hidden, a]
    time_first = [cfg.time_dim + s, cfg.hidden_dim]
    critic = [s + a, *hidden, 1]
    b, t = cfg.batch_size, cfg.diffusion_steps
    target_rows, actor_rows = b * cfg.n_target_samples, b * cfg.n_diffusion_samples
    entropy_rows = b * (1 + cfg.n_entropy_samples)
    return {
        "target chains (no grad)": mlp_flops(denoiser_rows, target_rows * t) + mlp_flops(time_first, b * t),
        "target scoring (2 target critics)": 2 * mlp_flops(critic, target_rows),
        "critic update (fwd + bwd, 2 critics)": 3 * 2 * mlp_flops(critic, b),
        "actor chains (no grad)": mlp_flops(denoiser_rows, actor_rows * t) + mlp_flops(time_first, b * t),
        "actor scoring (2 critics)": 2 * mlp_flops(critic, actor_rows),
        "actor loss (fwd + bwd, one step)": 3 * mlp_flops([a + cfg.time_dim + s, *hidden, a], entropy_rows),
    }


def phase_times(model: Any, repeats: int) -> dict[str, float]:
    """Seconds per update of each phase, timed with the phase's own calls on a real batch."""
    from dql_agent.qvpo import sample_and_score

    cfg, replay, gen = model.config, model.replay_buffer, torch.Generator().manual_seed(0)
    batch = model.sample_batch(replay, cfg.batch_size)
    states = batch.observations

    def target() -> None:
        sample_and_score(model.actor_target, model.critic_target, batch.next_observations, cfg.n_target_samples, gen)

    def actor_chains() -> None:
        sample_and_score(model.actor, model.critic, states, cfg.n_diffusion_samples, gen)

    def actor_loss() -> None:
        rows = cfg.batch_size * (1 + cfg.n_entropy_samples)
        actions = torch.rand((rows, model.policy.action_dim), generator=gen) * 2 - 1
        loss = model.actor.loss(actions, states.repeat(1 + cfg.n_entropy_samples, 1), gen, weights=torch.ones(rows))
        loss.backward()
        model.actor.zero_grad(set_to_none=True)

    def critic() -> None:
        loss = model.critic(states, batch.actions).pow(2).mean()
        loss.backward()
        model.critic.zero_grad(set_to_none=True)

    out = {}
    phases = {"target": target, "actor chains": actor_chains, "actor loss": actor_loss, "critic": critic}
    for name, fn in phases.items():
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - start) / repeats
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of updating steps to time")
    p.add_argument("--warmup", type=int, default=300, help="random env steps before the updates (learning_starts)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="QVPO hyperparameters")
    p.add_argument("--repeats", type=int, default=3, help="calls per phase for the phase times")
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help="dql_agent.qvpo.CPU_CHUNK_ROWS for this run (0: the chains in one pass, as before chunking)",
    )
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table of 3 updates")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    import dql_agent.qvpo as qvpo
    from dql_agent import QVPO

    if args.chunk_rows is not None:
        qvpo.CPU_CHUNK_ROWS = args.chunk_rows
    hyperparameters = {"learning_starts": args.warmup, **parse_set(args.set)}
    model = QVPO(ENV_ID, seed=0, device="cpu", **hyperparameters)
    with warnings.catch_warnings():  # the warm-up is meant to update only at its end: QVPO's warning says so
        warnings.filterwarnings("ignore", message=".*will be followed by gradient updates", category=UserWarning)
        model.learn(args.warmup + 2)  # fills the buffer; the last steps update once (first-call costs)
    start, first = time.perf_counter(), model.num_timesteps
    while time.perf_counter() - start < args.seconds:
        model.learn(1, reset_num_timesteps=False, log_interval=0)
    elapsed = time.perf_counter() - start
    steps = model.num_timesteps - first
    flops = flops_per_update(model)
    total = sum(flops.values())
    result = {
        "machine": machine(threads=torch.get_num_threads()),
        "hyperparameters": {k: v for k, v in model.config.to_dict().items()},
        "cpu_chunk_rows": qvpo.CPU_CHUNK_ROWS,
        "timesteps_per_s": steps / elapsed,
        "seconds_per_step": elapsed / steps,
        "timed_steps": steps,
        "gflop_per_update": total / 1e9,
        "achieved_gflops": total / 1e9 / (elapsed / steps),
        "gflop_by_phase": {k: v / 1e9 for k, v in flops.items()},
        "phase_seconds": phase_times(model, args.repeats),
    }
    print(json.dumps(result, indent=2))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.learn(3, reset_num_timesteps=False, log_interval=0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    write_results(Path(args.out) if args.out else None, result)
    return result


if __name__ == "__main__":
    main()
