"""The one training loop: timesteps, SB3 callbacks, logging, Ctrl-C and the interrupt checkpoint.

:meth:`BaseAgent.learn` runs it for one agent; :class:`dql_agent.seeds.SeedStack` runs it for
several agents trained in lockstep, each with its own callbacks and logger. A *timestep* is one
gradient step offline and one VecEnv step online (``n_envs`` env steps, as in SB3), followed by
its gradient steps; the loop only sees what one timestep returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import torch

from dql_agent import scaling
from dql_agent.scaling import World

if TYPE_CHECKING:
    from stable_baselines3.common.callbacks import BaseCallback

    from dql_agent.base import BaseAgent

Losses = dict[str, torch.Tensor]


class Rollout(NamedTuple):
    """What an online algorithm's ``collect_step`` did: one VecEnv step (SB3's callback locals)."""

    n_steps: int
    """Env steps collected (``n_envs`` per VecEnv step): ``num_timesteps`` advances by this."""
    gradient_steps: int
    """Gradient steps to take now (0 during a warm-up)."""
    actions: np.ndarray
    new_obs: Any
    rewards: np.ndarray
    dones: np.ndarray
    infos: list[dict[str, Any]]


class Timestep(NamedTuple):
    """One timestep of whatever is trained: each gradient step's losses (0-d tensors for one agent,
    one value per agent for a stack), and the VecEnv step of an online agent."""

    losses: list[Losses]
    rollout: Rollout | None = None


class _InterruptFlag:
    requested = False
    signum: int | None = None
    again = False  # a second signal stopped a step in the middle


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[_InterruptFlag]:
    """Turn Ctrl-C (SIGINT), and SIGTERM, into a flag that the loop checks between timesteps.

    A step is never cut in half (critic updated, actor not), so an interrupted run saves a state
    that resumes exactly. A second signal interrupts at once. SIGTERM (what ``kill``, ``timeout``,
    a batch scheduler or a container stop sends) is taken over only while it is at its default
    (terminate): a program that installed its own SIGTERM handler keeps it. The KeyboardInterrupt
    that leaves the block carries ``signum``, the signal that asked for it, so a program can exit
    with the conventional status (128 + signum: 130 for SIGINT, 143 for SIGTERM), and
    ``step_finished`` (False when a second signal cut a step short: that state does not resume
    exactly). Only the main thread can own signals; elsewhere this does nothing.
    """
    flag = _InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    signals = [signal.SIGINT]
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signals.append(signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            flag.again = True
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} received again: stopped at once")
        flag.requested, flag.signum = True, signum

    for signum in signals:
        signal.signal(signum, handler)
    try:
        yield flag
    except KeyboardInterrupt as error:
        error.signum = int(flag.signum or signal.SIGINT)  # type: ignore[attr-defined]
        error.step_finished = not flag.again  # type: ignore[attr-defined]
        raise
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


def train(
    agents: Sequence[BaseAgent],
    total_timesteps: int,
    timestep: Callable[[], Timestep],
    callbacks: Sequence[BaseCallback],
    *,
    log_interval: int,
    reset_num_timesteps: bool = True,
    interrupt_checkpoint: str | os.PathLike[str] | None = None,
    world: World | None = None,
) -> None:
    """Run ``timestep`` until the agents have trained ``total_timesteps`` more timesteps.

    ``callbacks[i]`` (an SB3 callback, bound here to ``agents[i]``) runs after every timestep;
    any returning False stops training after all have run. Every ``log_interval`` timesteps each
    agent logs the mean of its gradient steps' losses to its own logger. Ctrl-C finishes the
    timestep in progress. When training stops on Ctrl-C or an error, ``interrupt_checkpoint`` (a
    single agent only) receives a resumable checkpoint before the error propagates.

    Each timestep computes in the agents' ``precision`` (:mod:`dql_agent.scaling`). In a
    data-parallel ``world`` the ranks agree after every timestep whether to go on (rank 0's
    callbacks) and whether any rank was interrupted, so all stop after the same step; the caller
    gives ranks > 0 no callbacks, no logging and no interrupt checkpoint.
    """
    policies = [agent.policy for agent in agents]  # what the optimizers train: no callback may swap one
    total_timesteps = _start(agents, callbacks, total_timesteps, reset_num_timesteps)  # callbacks read this name
    lead, world = agents[0], world or World()
    precision = lead.config.precision
    hooks = scaling.StepHooks(scale_losses=precision == "fp16", world_size=world.size, scalers=lead.grad_scalers)
    sums: Losses = {}
    n_summed, start_time, start_timesteps = 0, time.time(), lead.num_timesteps
    try:
        with deferred_interrupt() as interrupt, scaling.use(hooks):
            while lead.num_timesteps < total_timesteps:
                before = lead.num_timesteps
                if world.rank > 0:  # a stream per (rank, step): nothing but rank 0's to save and resume
                    lead.generator.manual_seed(scaling.rank_stream_seed(lead.seed, world.rank, lead.n_updates))
                with scaling.autocast(precision, lead.device):
                    step = timestep()
                n_summed += _add(sums, step.losses)
                # SB3's off-policy callbacks read the VecEnv step ("dones", "infos", ...) from locals.
                seen = locals() if step.rollout is None else {**locals(), **step.rollout._asdict()}
                go_on, interrupted = _on_step(callbacks, seen), interrupt.requested
                _check_policies_kept(agents, policies, callbacks)
                if world.size > 1:
                    go_on, interrupted = scaling.agree(go_on, interrupted, lead.device)
                if not go_on:
                    break
                if log_interval and lead.num_timesteps // log_interval > before // log_interval:
                    _dump_all(agents, sums, n_summed, start_time, start_timesteps)
                    sums, n_summed = {}, 0
                if interrupted:
                    raise KeyboardInterrupt(f"training interrupted after timestep {lead.num_timesteps}")
    except BaseException as error:
        for agent in agents:
            agent.policy.eval()
        # A lost peer stopped this rank inside a step: that state is not one to resume from.
        if interrupt_checkpoint is not None and not isinstance(error, scaling.PeerLostError):
            _save_interrupt_checkpoint(lead, interrupt_checkpoint)
        raise
    if n_summed and log_interval:
        _dump_all(agents, sums, n_summed, start_time, start_timesteps)
    for agent in agents:
        agent.policy.eval()
    for callback in callbacks:
        callback.on_training_end()


def _start(agents: Sequence[BaseAgent], callbacks: Sequence[BaseCallback], total: int, reset: bool) -> int:
    """Before the first timestep: counters (reset, or continued), callbacks bound and started,
    policies in training mode; returns the timestep to stop at."""
    for agent in agents:
        agent.check_can_learn()
        if reset:
            agent.num_timesteps, agent._episode_num, agent._last_obs = 0, 0, None
            agent.ep_info_buffer.clear()
    total_timesteps = int(total) + agents[0].num_timesteps
    for agent, callback in zip(agents, callbacks, strict=True):
        agent._total_timesteps = total_timesteps
        callback.init_callback(cast(Any, agent))  # SB3 callbacks take any model with its protocol
        callback.on_training_start({"total_timesteps": total_timesteps, "callback": callback}, globals())
        agent.policy.train()
    return total_timesteps


def _add(sums: Losses, losses: list[Losses]) -> int:
    """Add each gradient step's losses to ``sums`` (on the device: no host sync per step); returns
    how many steps were added."""
    for step in losses:
        for key, value in step.items():
            sums[key] = sums[key] + value if key in sums else value.clone()
    return len(losses)


def _on_step(callbacks: Sequence[BaseCallback], seen: dict[str, Any]) -> bool:
    """Every callback's ``on_step`` (each runs, even after another said stop); False stops training."""
    go_on = True
    for callback in callbacks:
        callback.update_locals(seen)
        go_on = callback.on_step() and go_on
    return go_on


def _check_policies_kept(
    agents: Sequence[BaseAgent], policies: Sequence[Any], callbacks: Sequence[BaseCallback]
) -> None:
    """Raise when a callback replaced an agent's ``policy``: the optimizers hold the parameters of
    the one training started with, so the new object would be used but never trained. The agent
    gets its policy back first, so what is saved after the error (the interrupt checkpoint) is the
    trained one."""
    for i, (agent, policy, callback) in enumerate(zip(agents, policies, callbacks, strict=True)):
        if agent.policy is not policy:
            agent.policy = policy
            which = f"agents[{i}].policy" if len(agents) > 1 else "model.policy"
            raise RuntimeError(
                f"a callback ({type(callback).__name__}) replaced {which} during learn, at timestep "
                f"{agent.num_timesteps}; the optimizers train the policy learn started with, so the new one "
                "would never be trained: load the weights into it instead, "
                "model.policy.load_state_dict(other.policy.state_dict())"
            )


def _save_interrupt_checkpoint(agent: BaseAgent, path: str | os.PathLike[str]) -> None:
    try:
        agent.save(path, include_optimizer=True)
    except Exception as save_error:  # the training error matters more; the last good save is intact
        warnings.warn(f"could not save the interrupt checkpoint {path}: {save_error}", stacklevel=4)
    else:
        warnings.warn(
            f"training stopped at timestep {agent.num_timesteps} (gradient step {agent.n_updates}); "
            f"resumable checkpoint saved to {path}",
            stacklevel=4,
        )


def _dump_all(agents: Sequence[BaseAgent], sums: Losses, n: int, start_time: float, start_timesteps: int) -> None:
    if len(agents) == 1:
        dump_logs(agents[0], sums, n, start_time, start_timesteps)
        return
    for i, agent in enumerate(agents):  # a stack's losses hold one value per agent
        dump_logs(agent, {key: value[i] for key, value in sums.items()}, n, start_time, start_timesteps)


def dump_logs(agent: BaseAgent, sums: Losses, n: int, start_time: float, start_timesteps: int) -> None:
    """Write the mean of ``n`` gradient steps' summed losses (``train/*``), episode statistics
    (``rollout/*``) and timing (``time/*``) to the agent's logger, and dump it at ``num_timesteps``."""
    logger = agent.logger
    if agent.ep_info_buffer:
        logger.record("rollout/ep_rew_mean", float(np.mean([e["r"] for e in agent.ep_info_buffer])))
        logger.record("rollout/ep_len_mean", float(np.mean([e["l"] for e in agent.ep_info_buffer])))
    if agent._episode_num:
        logger.record("time/episodes", agent._episode_num, exclude="tensorboard")
    for key, value in sums.items():
        logger.record(f"train/{key}", float(value) / n)
    if n:
        logger.record("train/n_updates", agent.n_updates, exclude="tensorboard")
    elapsed = max(time.time() - start_time, 1e-9)
    logger.record("time/total_timesteps", agent.num_timesteps, exclude="tensorboard")
    logger.record("time/time_elapsed", int(elapsed), exclude="tensorboard")
    logger.record("time/fps", int((agent.num_timesteps - start_timesteps) / elapsed))
    logger.dump(step=agent.num_timesteps)
