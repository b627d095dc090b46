"""The official Diffusion-QL and dql_agent trained side by side: same data, same budget, same evaluation.

Each implementation trains from scratch for ``--steps`` gradient steps (batch 256) on one Minari
dataset, once per seed, with the official per-task settings (``--preset``, default
walker2d-medium-expert: lr 3e-4, eta 1, grad_norm 5, vp schedule with T=5, EMA 0.995 every 5
steps from step 1000, constant LR). Then each trained agent plays the same ``--eval-episodes``
evaluation episodes (reset seeds ``--eval-seed + i``), selecting actions stochastically as the
official ``sample_action`` does (softmax over the target critics' min-Q of 50 fresh candidates):
the official agent through its own ``sample_action``, one state at a time; ours through
``predict(..., deterministic=False)``. Scores are normalised with the dataset's reference scores
(0 = uniform random actions, 100 = the noiseless expert).

Every finished run is appended to ``--out`` (JSON lines; by default
``benchmarks/results/side_by_side.jsonl``, kept in the repository), so the two implementations can run
as two processes (one thread each) and an interrupted run resumes where it stopped. ``--report`` reads
the file and prints mean +- std per implementation with two exact two-sample tests (a permutation test
of the difference of means, and Mann-Whitney's U; both enumerate every split of the runs).

Build the dataset (Walker2d: half the expert with sigma 0.1 action noise, half with sigma 0.5 and 30%
uniform random actions, 50 episodes each), then run both sides and report::

    MINARI_DATASETS_PATH=/tmp/sbs python -m benchmarks.datasets /work/shared/agents/sac_Walker2d.zip \
        --env Walker2d-v5 --kinds medium-expert --episodes 50 --expert-noise 0.1 --medium-noise 0.5 \
        --medium-random-prob 0.3 --namespace dql_sbs
    export MINARI_DATASETS_PATH=/tmp/sbs OMP_NUM_THREADS=1
    python -m benchmarks.side_by_side --impl ours &
    python -m benchmarks.side_by_side --impl official --reference /tmp/official
    python -m benchmarks.side_by_side --report
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine, official_imports
from benchmarks.scores import evaluate

IMPLEMENTATIONS = ("ours", "official")
# The runs are kept in the repository: a run takes 30-40 min of a core and must outlive the machine.
RESULTS = Path(__file__).resolve().parent / "results" / "side_by_side.jsonl"


def train_ours(data: dict[str, np.ndarray], space: Any, preset: str, steps: int, seed: int) -> Any:
    """A DiffusionQL with the preset, trained for ``steps``; returns the batched stochastic ``act``."""
    from dql_agent import DiffusionQL, OfflineBuffer

    buffer = OfflineBuffer(**data, action_space=space)
    model = DiffusionQL(buffer, device="cpu", seed=seed, preset=preset)
    model.learn(steps, log_interval=0)
    return lambda obs: model.predict(obs, deterministic=False)[0]


def train_official(data: dict[str, np.ndarray], space: Any, preset: str, steps: int, seed: int, reference: Path) -> Any:
    """The official agent as its main.py builds it for the preset, trained for ``steps``; returns an
    ``act`` that calls its ``sample_action`` once per state."""
    from dql_agent import get_preset

    settings = get_preset(preset)
    if settings["reward_transform"] != "none":
        raise ValueError(f"--preset {preset!r}: only presets without a reward transform are supported here")
    with official_imports(reference):
        ql = importlib.import_module("agents.ql_diffusion")
        sampler = importlib.import_module("utils.data_sampler")
    torch.manual_seed(seed)  # main.py seeds torch and numpy before building the agent
    np.random.seed(seed)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    agent = ql.Diffusion_QL(
        obs_dim, act_dim, float(space.high[0]), "cpu", 0.99, 0.005, max_q_backup=settings["max_q_backup"],
        eta=settings["eta"], beta_schedule="vp", n_timesteps=5, ema_decay=0.995, step_start_ema=1000,
        update_ema_every=5, lr=settings["learning_rate"], lr_decay=False, grad_norm=settings["grad_norm"],
    )  # fmt: skip
    agent.train(sampler.Data_Sampler(data, "cpu", "no"), iterations=steps, batch_size=256)

    def act(obs: np.ndarray) -> np.ndarray:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sample_action's F.softmax without dim
            return np.stack([agent.sample_action(np.asarray(o)) for o in obs])

    return act


def run(args: argparse.Namespace) -> None:
    import minari

    from dql_agent.integrations.minari import load_minari_dataset, minari_to_transitions

    torch.set_num_threads(args.threads)
    dataset = load_minari_dataset(args.dataset)
    data = minari_to_transitions(dataset)
    env_id = dataset.spec.env_spec.id
    done = {
        (r["impl"], r["seed"]) for r in read_runs(args.out) if r["dataset"] == args.dataset and r["steps"] == args.steps
    }
    for seed in args.seeds:
        if (args.impl, seed) in done:
            print(f"{args.impl} seed {seed}: already in {args.out}", flush=True)
            continue
        start = time.perf_counter()
        if args.impl == "ours":
            act = train_ours(data, dataset.action_space, args.preset, args.steps, seed)
        else:
            act = train_official(data, dataset.action_space, args.preset, args.steps, seed, args.reference)
        trained = time.perf_counter() - start
        returns = evaluate(act, env_id, args.eval_episodes, args.eval_seed)
        scores = minari.get_normalized_score(dataset, returns) * 100.0
        record = {
            "impl": args.impl, "seed": seed, "dataset": args.dataset, "preset": args.preset, "steps": args.steps,
            "eval_seed": args.eval_seed, "returns": returns.tolist(), "score": float(np.mean(scores)),
            "train_seconds": trained, "total_seconds": time.perf_counter() - start,
            "machine": machine(torch.device("cpu"), args.threads),
        }  # fmt: skip
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{args.impl} seed {seed}: score {record['score']:.1f} ({trained:.0f} s training)", flush=True)


def read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split_masks(n_a: int, n_b: int) -> np.ndarray:
    """Every split of ``n_a + n_b`` pooled runs into groups of ``n_a`` and ``n_b``: (splits, n_a + n_b) bool,
    True for the first group; row 0 is the observed split (the first ``n_a`` runs)."""
    size = n_a + n_b
    return np.array([np.isin(np.arange(size), s) for s in itertools.combinations(range(size), n_a)])


def permutation_p(masks: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact p of the difference of means of ``a`` and ``b`` over the splits in ``masks``."""
    pooled = np.concatenate([a, b])
    gaps = masks @ pooled / len(a) - (~masks) @ pooled / len(b)  # (splits,)
    return float(np.mean(np.abs(gaps) >= abs(gaps[0]) - 1e-9))


def exact_tests(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided exact p-values over every split of the pooled runs into groups of len(a) and len(b):
    the difference of means (permutation test) and Mann-Whitney's U (ties count half)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    masks = split_masks(len(a), len(b))
    pooled = np.concatenate([a, b])

    def u_stat(mask: np.ndarray) -> float:
        diff = pooled[mask][:, None] - pooled[~mask][None, :]
        return float((diff > 0).sum() + 0.5 * (diff == 0).sum())

    us = np.array([u_stat(mask) for mask in masks])
    centre = len(a) * len(b) / 2.0
    return {
        "mean_difference": float(a.mean() - b.mean()),
        "permutation_p": permutation_p(masks, a, b),
        "mann_whitney_u": float(us[0]),
        "mann_whitney_p": float(np.mean(np.abs(us - centre) >= abs(us[0] - centre) - 1e-9)),
        "splits": len(masks),
    }


def shift_interval(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, step: float = 0.1
) -> tuple[float, float]:
    """The shifts d (on a grid of ``step``) that the exact permutation test does not reject at 1 - ``level``
    for ``a - d`` against ``b``: a distribution-free confidence interval for how much ``a`` exceeds ``b``
    (the test inverted). With too few runs for any split to reach p <= 1 - level, nothing is rejected
    and the interval is (-inf, inf)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    masks = split_masks(len(a), len(b))
    spread = float(np.ptp(np.concatenate([a, b]))) + 1.0
    grid = np.arange(a.mean() - b.mean() - 2 * spread, a.mean() - b.mean() + 2 * spread + step, step)
    kept = [shift for shift in grid if permutation_p(masks, a - shift, b) > 1.0 - level]
    if kept[0] == grid[0] or kept[-1] == grid[-1]:  # kept shifts far beyond any data gap: no bound
        return -math.inf, math.inf
    return float(kept[0]), float(kept[-1])


def report(path: Path) -> str:
    runs = read_runs(path)
    if not runs:
        raise SystemExit(f"no runs in {path}")
    lines = []
    for (dataset, steps), group in itertools.groupby(
        sorted(runs, key=lambda r: (r["dataset"], r["steps"])), key=lambda r: (r["dataset"], r["steps"])
    ):
        group = list(group)
        scores = {impl: [r["score"] for r in group if r["impl"] == impl] for impl in IMPLEMENTATIONS}
        lines.append(f"{dataset}, {steps} gradient steps, {len(group[0]['returns'])} evaluation episodes each")
        lines.append("")
        lines.append("| implementation | runs | score per seed | mean +- std | train s/run |")
        lines.append("|---|---|---|---|---|")
        for impl in IMPLEMENTATIONS:
            rows = sorted((r for r in group if r["impl"] == impl), key=lambda r: r["seed"])
            if not rows:
                continue
            s = np.array([r["score"] for r in rows])
            per_seed = ", ".join(f"{r['seed']}: {r['score']:.1f}" for r in rows)
            seconds = np.mean([r["train_seconds"] for r in rows])
            lines.append(
                f"| {impl} | {len(rows)} | {per_seed} | {s.mean():.1f} +- {s.std(ddof=1) if len(s) > 1 else 0:.1f} "
                f"| {seconds:.0f} |"
            )
        if all(len(v) >= 2 for v in scores.values()):
            t = exact_tests(scores["ours"], scores["official"])
            lines.append("")
            lines.append(
                f"ours - official: {t['mean_difference']:+.1f} points; exact permutation p = {t['permutation_p']:.3f}, "
                f"Mann-Whitney U = {t['mann_whitney_u']:.1f}, exact p = {t['mann_whitney_p']:.3f} "
                f"(two-sided, {t['splits']} splits)"
            )
            low, high = shift_interval(scores["ours"], scores["official"])
            bounds = f"[{low:+.1f}, {high:+.1f}]" if math.isfinite(low) else "unbounded with this few runs"
            lines.append(f"95% interval for ours - official (the permutation test inverted): {bounds}")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--impl", choices=IMPLEMENTATIONS, help="which implementation to train")
    p.add_argument("--report", action="store_true", help="print the table and tests of the runs in --out")
    p.add_argument("--reference", type=Path, help="the official Diffusion-QL checkout (for --impl official)")
    p.add_argument("--dataset", default="dql_sbs/walker2d/medium-expert-v0", help="local Minari dataset id")
    p.add_argument("--preset", default="walker2d-medium-expert", help="the official settings (dql_agent.PRESETS)")
    p.add_argument("--steps", type=int, default=20_000, help="gradient steps per run (default 20000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--eval-seed", type=int, default=10_000, help="episode i resets with seed eval_seed + i")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument(
        "--out", type=Path, default=RESULTS, help=f"JSON-lines file the runs are appended to (default {RESULTS})"
    )
    args = p.parse_args(argv)
    if not args.report and args.impl is None:
        p.error("give --impl ours|official, or --report")
    if args.impl == "official" and args.reference is None:
        p.error("--impl official needs --reference DIR (a checkout of the official Diffusion-QL)")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        print(report(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
