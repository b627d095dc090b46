"""Which offline signal picks good checkpoints? Offline signals against the true online return.

For each dataset and seed: split the data by whole episodes (``--validation-fraction`` held out,
the split drawn with the run's seed), train DiffusionQL on the rest for ``--steps`` gradient
steps and, every ``--every`` steps, record the offline signals of :mod:`dql_agent.model_selection`
on the held-out episodes AND the true return: ``--eval-episodes`` episodes of the dataset's env,
deterministic actions, env resets seeded ``--eval-seed + i`` (the same episodes at every
checkpoint and seed). The true return is the ground truth the signals are judged by:

- Spearman rank correlation between the signal (oriented so higher means "better": -td_error,
  -bc_loss, policy_q, -action_distance) and the true return over the checkpoints of one run,
  averaged over seeds;
- regret of the signal's pick: the true return of the best checkpoint of the run minus the true
  return at the checkpoint the signal picks, averaged over seeds. Two baselines: ``last`` (keep
  the final checkpoint) and ``random`` (the expected regret of a uniformly drawn checkpoint).

Datasets: ``pendulum-mixed`` (25 good + 25 noisy episodes of ``dql_agent.demo_data``'s swing-up
controller, 10,000 transitions, built in seconds), ``pendulum-noisy`` (50 noisy episodes), or
Minari ids (e.g. ``dql_bench/hopper/medium-v0`` of ``benchmarks/datasets.py``; their env comes
from the dataset). Pendulum runs use the ``dql-agent demo`` hyperparameters (hidden_dim 64, gamma
0.95, act_with_ema), Minari runs the library defaults; ``--set key=value`` overrides either.

Prints a markdown table and writes every point to ``--out`` (JSON). Example (docs/SELECTION.md)::

    OMP_NUM_THREADS=1 python -m benchmarks.model_selection_study --steps 4000 --every 400 --seeds 0 1 2 \
        --eval-episodes 5 --out selection.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.common import machine, parse_set

PENDULUM_DATASETS = {"pendulum-mixed": (25, 25), "pendulum-noisy": (0, 50)}
ORIENTATION = {"td_error": -1.0, "bc_loss": -1.0, "policy_q": 1.0, "action_distance": -1.0}
"""The selection criteria and the sign that makes higher better."""


# ---------------------------------------------------------------------------------------------
# statistics
def rankdata(values: npt.ArrayLike) -> np.ndarray:
    """Ranks 1..n of ``values``, ties given their average rank (scipy's 'average' method)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, weights=ranks) / np.bincount(inverse))[inverse]


def spearman(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Spearman rank correlation (Pearson's on average ranks); NaN when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def judge(points: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per criterion (and the baselines) of one run: Spearman with the true return, the step it
    picks and the regret of that pick."""
    returns = np.array([p["return"] for p in points])
    best = float(returns.max())
    out: dict[str, dict[str, float]] = {}
    for name, sign in ORIENTATION.items():
        score = sign * np.array([p[name] for p in points])
        score = np.where(np.isnan(score), -np.inf, score)
        pick = int(np.argmax(score))  # the first of equal scores, as the callback keeps the first best
        out[name] = {
            "spearman": spearman(score, returns),
            "pick_step": points[pick]["step"],
            "regret": best - float(returns[pick]),
        }
    out["last"] = {"spearman": float("nan"), "pick_step": points[-1]["step"], "regret": best - float(returns[-1])}
    out["random"] = {"spearman": float("nan"), "pick_step": float("nan"), "regret": best - float(returns.mean())}
    return out


# ---------------------------------------------------------------------------------------------
# data, training, evaluation
def load_dataset(name: str) -> tuple[Any, str, dict[str, Any]]:
    """(OfflineBuffer, env id, default hyperparameters) of a dataset name or Minari id."""
    import gymnasium as gym

    from dql_agent import OfflineBuffer

    if name in PENDULUM_DATASETS:
        from dql_agent.cli import DEMO_HYPERPARAMETERS
        from dql_agent.demo_data import ENV_ID, collect_pendulum_episodes

        n_good, n_noisy = PENDULUM_DATASETS[name]
        episodes = collect_pendulum_episodes(n_good=n_good, n_noisy=n_noisy, seed=0)
        env = gym.make(ENV_ID)
        action_space: Any = env.action_space  # a Box
        buffer = OfflineBuffer(
            observations=np.concatenate([e["observations"][:-1] for e in episodes]),
            actions=np.concatenate([e["actions"] for e in episodes]),
            rewards=np.concatenate([e["rewards"] for e in episodes]),
            next_observations=np.concatenate([e["observations"][1:] for e in episodes]),
            terminals=np.concatenate([e["terminations"] for e in episodes]),
            timeouts=np.concatenate([e["truncations"] for e in episodes]),
            observation_space=env.observation_space,
            action_space=action_space,
            metadata={"dataset_id": f"dql_agent/{name}", "env_id": ENV_ID},
        )
        env.close()
        return buffer, ENV_ID, dict(DEMO_HYPERPARAMETERS)
    buffer = OfflineBuffer.from_minari(name)
    env_id = buffer.metadata.get("env_id")
    if env_id is None:
        raise ValueError(f"Minari dataset {name!r} names no env (env_spec is None): cannot measure the true return")
    return buffer, str(env_id), {}


def evaluate(act: Callable[[np.ndarray], np.ndarray], env_id: str, n_episodes: int, seed: int) -> float:
    """Mean return of ``n_episodes`` episodes run side by side (resets seeded ``seed + i``), one
    batched deterministic ``act`` call per step."""
    import gymnasium as gym

    envs = [gym.make(env_id) for _ in range(n_episodes)]
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns, active = np.zeros(n_episodes), list(range(n_episodes))
    while active:
        actions = act(np.stack([obs[i] for i in active]))
        still = []
        for i, action in zip(active, actions, strict=True):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += float(reward)
            if not (terminated or truncated):
                still.append(i)
        active = still
    for env in envs:
        env.close()
    return float(returns.mean())


def run(buffer: Any, env_id: str, hyperparameters: dict[str, Any], seed: int, args: argparse.Namespace) -> dict:
    """One training run: the signals and the true return at every checkpoint."""
    from dql_agent import DiffusionQL
    from dql_agent.model_selection import offline_signals, split_episodes

    train, validation = split_episodes(buffer, args.validation_fraction, seed=seed)
    model = DiffusionQL(train, seed=seed, device=args.device, **hyperparameters)
    points, start = [], time.time()
    for step in range(args.every, args.steps + 1, args.every):
        model.learn(args.every, reset_num_timesteps=False, log_interval=0)
        signals = offline_signals(model, validation, batch_size=args.validation_batch, seed=0)
        true_return = evaluate(
            lambda o: model.predict(o, deterministic=True)[0], env_id, args.eval_episodes, args.eval_seed
        )
        points.append({"step": step, **signals, "return": true_return, "elapsed_s": time.time() - start})
        print(
            f"  seed {seed} step {step:>6}: return {true_return:9.1f}  "
            + "  ".join(f"{k} {v:.4g}" for k, v in signals.items()),
            flush=True,
        )
    return {
        "seed": seed,
        "train_transitions": len(train),
        "validation_transitions": len(validation),
        "points": points,
        "judged": judge(points),
    }


# ---------------------------------------------------------------------------------------------
# report
def summarise(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Per criterion and baseline: the mean (and std) over seeds of Spearman and regret."""
    summary: dict[str, dict[str, Any]] = {}
    for name in [*ORIENTATION, "last", "random"]:
        rhos = np.array([r["judged"][name]["spearman"] for r in runs])
        regrets = np.array([r["judged"][name]["regret"] for r in runs])
        summary[name] = {
            "spearman_mean": float(np.nanmean(rhos)) if np.isfinite(rhos).any() else float("nan"),
            "spearman_std": float(np.nanstd(rhos)) if np.isfinite(rhos).any() else float("nan"),
            "regret_mean": float(regrets.mean()),
            "regret_std": float(regrets.std()),
            "pick_steps": [r["judged"][name]["pick_step"] for r in runs],
        }
    return summary


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for dataset, entry in results["datasets"].items():
        runs, summary = entry["runs"], entry["summary"]
        best = np.mean([max(p["return"] for p in r["points"]) for r in runs])
        last = np.mean([r["points"][-1]["return"] for r in runs])
        lines += [
            f"**{dataset}** ({entry['env_id']}; {len(runs)} seeds; mean best-of-training return {best:.1f}, "
            f"mean final return {last:.1f})",
            "",
            "| selection by | Spearman rho with return (mean +/- sd over seeds) | regret of its pick (mean +/- sd) "
            "| picked steps (per seed) |",
            "|---|---|---|---|",
        ]
        for name, row in summary.items():
            rho = (
                "-" if np.isnan(row["spearman_mean"]) else f"{row['spearman_mean']:+.2f} +/- {row['spearman_std']:.2f}"
            )
            picks = "-" if name == "random" else ", ".join(str(int(s)) for s in row["pick_steps"])
            if name in ORIENTATION:
                label = f"{name} ({'higher' if ORIENTATION[name] > 0 else 'lower'} is better)"
            else:
                label = {"last": "last checkpoint (baseline)", "random": "random checkpoint (baseline, expected)"}[name]
            lines.append(f"| {label} | {rho} | {row['regret_mean']:.1f} +/- {row['regret_std']:.1f} | {picks} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["pendulum-mixed"], help=f"{list(PENDULUM_DATASETS)} or Minari ids")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=4000, help="gradient steps per run")
    p.add_argument("--every", type=int, default=400, help="checkpoint (signals + true return) every this many steps")
    p.add_argument("--eval-episodes", type=int, default=5, help="env episodes per checkpoint (the ground truth)")
    p.add_argument("--eval-seed", type=int, default=10_000, help="env resets are seeded eval_seed + i")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="share of episodes held out")
    p.add_argument("--validation-batch", type=int, default=1024, help="held-out transitions the signals use")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="hyperparameter overrides")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None, help="write every point and the summary to this JSON file")
    args = p.parse_args(argv)
    if args.steps < args.every or args.every < 1:
        p.error(f"need 1 <= --every <= --steps, got --every {args.every} --steps {args.steps}")
    if args.steps // args.every < 2:
        p.error("need at least 2 checkpoints (--steps >= 2 * --every) to rank them")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = parse_set(args.set)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict[str, Any] = {"machine": machine(), "settings": settings, "datasets": {}}
    print("machine:", json.dumps(results["machine"]), flush=True)
    start = time.time()
    for name in args.datasets:
        buffer, env_id, hyperparameters = load_dataset(name)
        hyperparameters.update(overrides)
        print(f"{name}: {len(buffer)} transitions, env {env_id}, hyperparameters {hyperparameters}", flush=True)
        runs = [run(buffer, env_id, hyperparameters, seed, args) for seed in args.seeds]
        results["datasets"][name] = {
            "env_id": env_id,
            "hyperparameters": hyperparameters,
            "runs": runs,
            "summary": summarise(runs),
        }
    results["wall_s"] = time.time() - start
    table = markdown(results)
    results["table"] = table
    print()
    print(table)
    print(f"wall time {results['wall_s']:.0f}s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, allow_nan=True))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
