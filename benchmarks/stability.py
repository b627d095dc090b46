"""Stable long runs (issue 16): the gap between the best return seen during training and the final one.

For each dataset, configuration and seed: train DiffusionQL on the whole dataset for ``--steps``
gradient steps and, every ``--every`` steps, measure the true return: ``--eval-episodes``
deterministic episodes of the dataset's env, resets seeded ``--eval-seed + i`` (the same episodes
at every checkpoint, seed and configuration). Per run this gives the best return of training, the
final return and their gap (best - final, >= 0); per configuration their mean and std over seeds.

Configurations (``--configs`` picks a subset; ``--extra NAME=JSON`` adds one by its
hyperparameters, e.g. ``combo='{"act_with_ema": true, "critic_layer_norm": true}'``):

- ``default``: the base hyperparameters (``--base paper``: the library defaults, which are the
  paper's settings; ``--base dataset``: the ones benchmarks/model_selection_study.py uses for the dataset, the
  ``dql-agent demo`` settings on Pendulum), plus ``--set`` overrides. Every config is default plus
  its own changes;
- ``ema`` (``act_with_ema=True``), ``eta0.5`` (``eta=0.5``), ``gamma0.95`` (``gamma=0.95``),
  ``layernorm`` (``critic_layer_norm=True``). A config the installed DiffusionQL rejects (an
  unknown field: TypeError, a bad value: ValueError) is reported as unavailable, with the message,
  and the others still run.

The verdict rule (printed with the table): a config *closes the gap without lowering the best
score* when its mean gap is below default's by more than the seeds' spread, and its mean best is
not below default's by more than the spread. The spread of a quantity is the larger of the two
configs' standard deviations over seeds (ddof=1), so it needs at least 2 seeds.

Datasets are benchmarks/model_selection_study.py's (its dataset builder and evaluation are imported, not
copied): ``pendulum-mixed`` (25 good + 25 noisy swing-up episodes, 10,000 transitions),
``pendulum-noisy``, or Minari ids such as ``dql_bench/hopper/medium-v0`` of
``benchmarks/datasets.py`` (``--preset hopper-medium`` applies the official per-task settings).

Prints a markdown table per dataset (and the mean curves) and writes every curve point to
``--out`` (JSON, rewritten after each run so a cut-short run keeps what it measured). Example
(docs/STABILITY.md)::

    OMP_NUM_THREADS=1 python -m benchmarks.stability --datasets pendulum-mixed --steps 6000 \
        --every 500 --seeds 0 1 2 --eval-episodes 5 --set hidden_dim=64 --out stability.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, parse_named_hyperparameters, parse_set
from benchmarks.model_selection_study import evaluate, load_dataset

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "ema": {"act_with_ema": True},
    "eta0.5": {"eta": 0.5},
    "gamma0.95": {"gamma": 0.95},
    "layernorm": {"critic_layer_norm": True},
}
RULE = (
    "a config closes the gap without lowering the best score when mean gap < default's mean gap - spread_gap "
    "and mean best >= default's mean best - spread_best, where spread_x is the larger of the two configs' "
    "std over seeds (ddof=1) of x"
)


# ---------------------------------------------------------------------------------------------
# statistics
def run_stats(points: list[dict[str, float]]) -> dict[str, float]:
    """Best, final, gap and step of best of one run's curve (the first of equal bests)."""
    returns = np.array([p["return"] for p in points])
    i = int(np.argmax(returns))
    best, final = float(returns[i]), float(returns[-1])
    return {"best": best, "final": final, "gap": best - final, "best_step": points[i]["step"]}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; NaN for one value)."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("error") is None]
    failed = [r["seed"] for r in runs if r.get("error") is not None]
    summary: dict[str, Any] = {"seeds": [r["seed"] for r in ok], "failed_seeds": failed}
    if not ok:
        return summary
    for key in ("best", "final", "gap"):
        summary[f"{key}_mean"], summary[f"{key}_std"] = mean_std([r[key] for r in ok])
    summary["best_steps"] = [r["best_step"] for r in ok]
    return summary


def verdict(config: dict[str, Any], default: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The verdict of RULE for one config's summary against default's, and the numbers it used."""
    if "gap_mean" not in config or "gap_mean" not in default:
        return "no verdict (no finished runs)", {}
    if len(config["seeds"]) < 2 or len(default["seeds"]) < 2:
        return "no verdict (needs >= 2 seeds for a spread)", {}
    spread_gap = max(config["gap_std"], default["gap_std"])
    spread_best = max(config["best_std"], default["best_std"])
    gap_limit = default["gap_mean"] - spread_gap
    best_limit = default["best_mean"] - spread_best
    closes = config["gap_mean"] < gap_limit
    keeps_best = config["best_mean"] >= best_limit
    numbers = {"spread_gap": spread_gap, "spread_best": spread_best, "gap_limit": gap_limit, "best_limit": best_limit}
    if closes and keeps_best:
        text = "closes the gap without lowering the best score"
    elif closes:
        text = "closes the gap but lowers the best score"
    elif keeps_best:
        text = "does not close the gap (best not lowered)"
    else:
        text = "does not close the gap and lowers the best score"
    return text, numbers


# ---------------------------------------------------------------------------------------------
# training
class ConfigRejected(Exception):
    """DiffusionQL refused the hyperparameters (the message names the TypeError or ValueError)."""


def run(
    buffer: Any, env_id: str, hyperparameters: dict[str, Any], seed: int, args: argparse.Namespace, label: str
) -> dict[str, Any]:
    """One training run: the true return every ``--every`` steps. A config DiffusionQL rejects
    raises ConfigRejected (the caller reports it unavailable); a training error ends the run and is
    recorded."""
    from dql_agent import DiffusionQL

    try:
        model = DiffusionQL(buffer, seed=seed, device=args.device, preset=args.preset, **hyperparameters)
    except (TypeError, ValueError) as e:  # an unknown field, a bad value: the config is unavailable
        raise ConfigRejected(f"{type(e).__name__}: {e}") from e
    points: list[dict[str, float]] = []
    start = time.time()
    error = None
    for step in range(args.every, args.steps + 1, args.every):
        try:
            model.learn(args.every, reset_num_timesteps=False, log_interval=0)
        except (FloatingPointError, RuntimeError) as e:  # a non-finite loss, a diverged run
            error = f"{type(e).__name__} at step <= {step}: {e}"
            print(f"  {label} seed {seed}: {error}", flush=True)
            break
        true_return = evaluate(
            lambda o: model.predict(o, deterministic=True)[0], env_id, args.eval_episodes, args.eval_seed
        )
        points.append({"step": step, "return": true_return, "elapsed_s": time.time() - start})
        print(f"  {label} seed {seed} step {step:>6}: return {true_return:9.1f}", flush=True)
    out: dict[str, Any] = {"seed": seed, "points": points, "wall_s": time.time() - start, "error": error}
    if error is None:
        out.update(run_stats(points))
    return out


# ---------------------------------------------------------------------------------------------
# report
def fmt(mean: float, std: float) -> str:
    return f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = []
    for dataset, entry in results["datasets"].items():
        configs = entry["configs"]
        lines += [
            f"**{dataset}** ({entry['env_id']}; {s['steps']} steps, return of {s['eval_episodes']} deterministic "
            f"episodes every {s['every']} steps; mean ± std over seeds, ddof=1)",
            "",
            "| config | best | final | gap (best - final) | step of best (per seed) |",
            "|---|---|---|---|---|",
        ]
        for name, c in configs.items():
            m = c.get("summary", {})
            if not c["available"]:
                short = c["error"] if len(c["error"]) <= 100 else c["error"][:100] + "..."
                lines.append(f"| {name} | unavailable: {short} | | | |")
            elif "gap_mean" not in m:
                lines.append(f"| {name} | no finished run | | | |")
            else:
                failed = f" (failed seeds {m['failed_seeds']})" if m["failed_seeds"] else ""
                steps = ", ".join(str(int(x)) for x in m["best_steps"])
                lines.append(
                    f"| {name}{failed} | {fmt(m['best_mean'], m['best_std'])} | {fmt(m['final_mean'], m['final_std'])} "
                    f"| {fmt(m['gap_mean'], m['gap_std'])} | {steps} |"
                )
        lines += ["", f"Verdicts against default (rule: {RULE}):", ""]
        for name, c in configs.items():
            if name == "default":
                continue
            if not c["available"]:
                lines.append(f"- {name}: unavailable ({c['error']})")
                continue
            v = c.get("verdict", {})
            n = v.get("numbers", {})
            detail = (
                f" (gap {c['summary']['gap_mean']:.1f} vs limit {n['gap_limit']:.1f}; "
                f"best {c['summary']['best_mean']:.1f} vs limit {n['best_limit']:.1f})"
                if n
                else ""
            )
            lines.append(f"- {name}: {v.get('text', 'no verdict')}{detail}")
        # mean curves over seeds
        curves = {
            name: c["runs"] for name, c in configs.items() if c["available"] and any(r["points"] for r in c["runs"])
        }
        if curves:
            steps_all = sorted({p["step"] for runs in curves.values() for r in runs for p in r["points"]})
            lines += ["", "Mean return over seeds at each checkpoint:", ""]
            lines += ["| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
            for step in steps_all:
                cells = []
                for runs in curves.values():
                    vals = [p["return"] for r in runs for p in r["points"] if p["step"] == step]
                    cells.append(f"{np.mean(vals):.0f}" if vals else "-")
                lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["pendulum-mixed"], help="pendulum-mixed/-noisy or Minari ids")
    p.add_argument("--configs", nargs="+", default=None, help=f"a subset of {list(CONFIGS)} and --extra names")
    p.add_argument("--extra", nargs="*", default=[], metavar="NAME=JSON", help="add a config by its hyperparameters")
    p.add_argument("--base", choices=["paper", "dataset"], default="paper", help="default's hyperparameters")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides applied to every config")
    p.add_argument("--preset", default=None, help="a DiffusionQL preset (e.g. hopper-medium) under every config")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=6000, help="gradient steps per run")
    p.add_argument("--every", type=int, default=500, help="evaluate every this many steps")
    p.add_argument("--eval-episodes", type=int, default=5, help="deterministic env episodes per evaluation")
    p.add_argument("--eval-seed", type=int, default=10_000, help="env resets are seeded eval_seed + i")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None, help="write every curve point and the summary to this JSON")
    args = p.parse_args(argv)
    if args.every < 1 or args.steps < args.every:
        p.error(f"need 1 <= --every <= --steps, got --every {args.every} --steps {args.steps}")
    try:
        args.extra_configs = parse_named_hyperparameters(args.extra, "--extra")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    known = {**CONFIGS, **args.extra_configs}
    args.config_names = list(dict.fromkeys(["default", *(args.configs or known)]))
    unknown = [n for n in args.config_names if n not in known]
    if unknown:
        p.error(f"unknown config(s) {unknown}; known: {list(known)} (add one with --extra NAME=JSON)")
    args.config_table = {n: known[n] for n in args.config_names}
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = parse_set(args.set)
    settings = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in ("extra_configs", "config_names", "config_table")
    }
    settings["configs"] = args.config_table
    results: dict[str, Any] = {"machine": machine(), "settings": settings, "rule": RULE, "datasets": {}}
    print("machine:", json.dumps(results["machine"]), flush=True)

    def save() -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1, allow_nan=True))

    start = time.time()
    for dataset in args.datasets:
        buffer, env_id, dataset_hyperparameters = load_dataset(dataset)
        base = {**(dataset_hyperparameters if args.base == "dataset" else {}), **overrides}
        print(f"{dataset}: {len(buffer)} transitions, env {env_id}, base hyperparameters {base}", flush=True)
        configs: dict[str, Any] = {}
        results["datasets"][dataset] = {"env_id": env_id, "base": base, "configs": configs}
        default_hp = base
        for name, changes in args.config_table.items():
            hyperparameters = {**base, **changes}
            entry: dict[str, Any] = {"hyperparameters": hyperparameters, "available": True, "error": None, "runs": []}
            configs[name] = entry
            if name != "default" and hyperparameters == default_hp:
                entry["note"] = "same hyperparameters as default under this base"
                print(f"{dataset} {name}: note: {entry['note']}", flush=True)
            print(f"{dataset} {name}: {hyperparameters}", flush=True)
            for seed in args.seeds:
                try:
                    entry["runs"].append(run(buffer, env_id, hyperparameters, seed, args, name))
                except ConfigRejected as e:  # the installed DiffusionQL rejects the config
                    entry["available"], entry["error"] = False, str(e)
                    print(f"{dataset} {name}: unavailable: {entry['error']}", flush=True)
                    break
                entry["summary"] = summarise(entry["runs"])
                save()
        for name, entry in configs.items():
            if name != "default" and entry["available"] and "summary" in configs["default"]:
                text, numbers = verdict(entry["summary"], configs["default"]["summary"])
                entry["verdict"] = {"text": text, "numbers": numbers}
    results["wall_s"] = time.time() - start
    table = markdown(results)
    results["table"] = table
    save()
    print()
    print(table)
    print(f"wall time {results['wall_s']:.0f}s")
    if args.out is not None:
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
