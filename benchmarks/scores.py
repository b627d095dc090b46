"""Learning quality: Diffusion-QL against behaviour cloning and d3rlpy's TD3+BC / IQL.

Every algorithm trains on the same Minari datasets (e.g. those of ``benchmarks/datasets.py``) for
the same number of gradient steps (batch 256), for each seed; the policy is evaluated every
``--eval-every`` steps on ``--eval-episodes`` episodes of the dataset's environment, scored with
``minari.get_normalized_score`` (x100). Algorithms:

- ``dql``: DiffusionQL with the official per-task preset (hopper-medium, ...);
- ``bc-diffusion``: the same DiffusionQL with ``eta=0`` (diffusion behaviour cloning);
- ``bc-mlp``: a plain 3x256 MLP regressing actions (the mean of a fixed-variance Gaussian);
- ``td3bc``, ``iql``: d3rlpy's TD3+BC and IQL (needs ``d3rlpy``; skipped with a note when absent);
- ``--dql-variant NAME=JSON``: more DiffusionQL rows with hyperparameters over the preset (e.g. a
  stabilising option), named ``dql:NAME``.

The table gives the final score and the best of training (online, at the evaluation points).
``--compile`` runs DiffusionQL through ``compile_training()`` (the same math, fused kernels) and
``--device cuda`` on a GPU, for the 50k-step and longer budgets.

Outputs under ``--out``: ``scores.json`` (every curve point), ``scores.md`` (the table),
``curve_<dataset>.png`` per dataset and ``bandit.png``, the 2-D bandit of the paper's Fig. 1:
sampled actions of diffusion BC, Diffusion-QL and a Gaussian TD3+BC-style policy over the four
reward modes. Example::

    OMP_NUM_THREADS=2 python -m benchmarks.scores --minari-path /tmp/minari \
        --datasets dql_bench/hopper/medium-v0 dql_bench/hopper/expert-v0 --steps 5000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.common import parse_named_hyperparameters

ALGOS = ("dql", "bc-diffusion", "bc-mlp", "td3bc", "iql")
LABELS = {
    "dql": "Diffusion-QL",
    "bc-diffusion": "Diffusion BC (eta=0)",
    "bc-mlp": "MLP BC",
    "td3bc": "TD3+BC (d3rlpy)",
    "iql": "IQL (d3rlpy)",
}
Act = Callable[[np.ndarray], np.ndarray]  # (n, obs_dim) -> (n, act_dim)


# ---------------------------------------------------------------------------------------------
# evaluation
def evaluate(act: Act, env_id: str, n_episodes: int, seed: int) -> np.ndarray:
    """Returns of ``n_episodes`` episodes run side by side, one batched ``act`` call per step."""
    import gymnasium as gym

    envs = [gym.make(env_id) for _ in range(n_episodes)]
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns, active = np.zeros(n_episodes), list(range(n_episodes))
    while active:
        actions = act(np.stack([obs[i] for i in active]).astype(np.float32))
        still = []
        for i, action in zip(active, actions, strict=True):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += reward
            if not (terminated or truncated):
                still.append(i)
        active = still
    for env in envs:
        env.close()
    return returns


class Curve:
    """Normalised score (x100) after each chunk of gradient steps."""

    def __init__(self, dataset: Any, env_id: str, n_episodes: int, seed: int):
        import minari

        self.minari, self.dataset, self.env_id = minari, dataset, env_id
        self.n_episodes, self.seed = n_episodes, seed
        self.points: list[dict[str, float]] = []

    def __call__(self, step: int, act: Act) -> None:
        returns = evaluate(act, self.env_id, self.n_episodes, 10_000 + 100 * self.seed)
        score = float(np.mean(self.minari.get_normalized_score(self.dataset, returns)) * 100.0)
        self.points.append({"step": step, "return": float(returns.mean()), "score": score})
        print(f"  step {step}: return {returns.mean():.1f}, normalized score {score:.1f}", flush=True)


# ---------------------------------------------------------------------------------------------
# the algorithms: each trains for `steps` gradient steps, calling `curve(step, act)` every `every`
def dql_preset(dataset_id: str) -> str:
    from dql_agent import PRESETS

    env, kind = dataset_id.split("/")[-2], dataset_id.split("/")[-1].rsplit("-v", 1)[0]
    for name in (f"{env}-{kind}", f"{env}-medium-expert", f"{env}-medium"):
        if name in PRESETS:
            return name
    return "hopper-medium"


def train_dql(
    data: dict,
    space: Any,
    dataset_id: str,
    steps: int,
    every: int,
    seed: int,
    curve: Curve,
    extra: dict[str, Any] | None = None,
    compile_training: bool = False,
    device: str = "cpu",
):
    """DiffusionQL with the dataset's preset, ``extra`` hyperparameters over it (a variant)."""
    from dql_agent import DiffusionQL, OfflineBuffer

    buffer = OfflineBuffer(**data, action_space=space)
    model = DiffusionQL(buffer, device=device, seed=seed, preset=dql_preset(dataset_id), **(extra or {}))
    if compile_training:
        model.compile_training()  # same math (tests/test_fast_paths.py), fused kernels
    done = 0
    while done < steps:
        n = min(every, steps - done)
        model.learn(n, reset_num_timesteps=False, log_interval=0)
        done += n
        curve(done, lambda obs: model.predict(obs)[0])


class MLPPolicy(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(obs_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()
        )
        self.head = nn.Linear(256, act_dim)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.net((obs - self.mean) / self.std)))


def train_bc_mlp(data: dict, space: Any, dataset_id: str, steps: int, every: int, seed: int, curve: Curve) -> None:
    torch.manual_seed(seed)
    obs = torch.as_tensor(data["observations"], dtype=torch.float32)
    low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
    act = (2 * (torch.as_tensor(data["actions"], dtype=torch.float32) - low) / (high - low) - 1).clamp(-1, 1)
    policy = MLPPolicy(obs.shape[1], act.shape[1], obs.mean(0).numpy(), obs.std(0).numpy() + 1e-3)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4)
    generator = torch.Generator().manual_seed(seed)

    def act_fn(o: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            a = policy(torch.as_tensor(o)).numpy()
        return low.numpy() + (a + 1) * (high - low).numpy() / 2

    for step in range(1, steps + 1):
        idx = torch.randint(0, len(obs), (256,), generator=generator)
        loss = F.mse_loss(policy(obs[idx]), act[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            curve(step, act_fn)


def train_d3rlpy(algo: str, data: dict, space: Any, dataset_id: str, steps: int, every: int, seed: int, curve: Curve):
    import logging

    import d3rlpy
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # d3rlpy's chatter
    d3rlpy.seed(seed)
    ends = data["terminals"] | data["timeouts"]
    ends[-1] = True
    dataset = d3rlpy.dataset.MDPDataset(
        observations=data["observations"],
        actions=data["actions"],
        rewards=data["rewards"],
        terminals=data["terminals"].astype(np.float32),
        timeouts=(ends & ~data["terminals"]).astype(np.float32),
    )
    scaler = d3rlpy.preprocessing.StandardObservationScaler()
    if algo == "td3bc":  # settings of d3rlpy's reproduction script (Fujimoto & Gu 2021)
        config = d3rlpy.algos.TD3PlusBCConfig(batch_size=256, alpha=2.5, update_actor_interval=2)
    else:  # IQL locomotion settings (Kostrikov et al. 2021)
        config = d3rlpy.algos.IQLConfig(
            batch_size=256,
            expectile=0.7,
            weight_temp=3.0,
            max_weight=100.0,
            reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0),
        )
    config.observation_scaler = scaler
    model = config.create(device="cpu:0")
    model.fit(
        dataset,
        n_steps=steps,
        n_steps_per_epoch=every,
        experiment_name=f"{algo}_{seed}",
        with_timestamp=False,
        logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
        show_progress=False,
        save_interval=10**9,
        epoch_callback=lambda algo_, epoch, step: curve(step, lambda obs: algo_.predict(obs)),
    )


# ---------------------------------------------------------------------------------------------
# the bandit of the paper's Fig. 1
def bandit_figure(path: Path, ql_steps: int, bc_steps: int, td3bc_steps: int, seed: int = 0) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dql_agent import DiffusionQL, OfflineBuffer

    # Data and toy settings of tests/test_bandit.py (the official toy script).
    modes = np.array([[-0.8, 0.8], [-0.8, -0.8], [0.8, 0.8], [0.8, -0.8]])
    mean_rewards = np.array([3.0, 0.0, 1.5, 5.0])
    rng = np.random.default_rng(seed)
    mode = rng.integers(0, 4, 10_000)
    actions = np.clip(modes[mode] + rng.normal(0, 0.05, (10_000, 2)), -1, 1).astype(np.float32)
    rewards = rng.normal(mean_rewards[mode], 0.5).astype(np.float32)
    states = np.zeros((10_000, 1), np.float32)
    toy = {"hidden_dim": 128, "time_dim": 4, "batch_size": 100, "grad_norm": None}

    def diffusion(eta: float, steps: int, diffusion_steps: int) -> np.ndarray:
        buffer = OfflineBuffer(states, actions, rewards, states, np.ones(10_000, bool))
        model = DiffusionQL(buffer, seed=seed, device="cpu", eta=eta, diffusion_steps=diffusion_steps, **toy)
        model.learn(steps, log_interval=0)
        with torch.no_grad():
            return model.actor.sample(torch.zeros(1000, 1), torch.Generator().manual_seed(1)).numpy()

    samples = {
        "Diffusion BC (T=50)": diffusion(0.0, bc_steps, 50),
        "Diffusion-QL (T=5, eta=2.5)": diffusion(2.5, ql_steps, 5),
        "TD3+BC, Gaussian policy": gaussian_td3bc(actions, rewards, td3bc_steps, seed),
    }
    shares = {}
    for name, s in samples.items():
        distance = np.linalg.norm(s[:, None, :] - modes[None], axis=-1)
        nearest, close = distance.argmin(1), distance.min(1) < 0.3
        shares[name] = [float(np.mean((nearest == k) & close)) for k in range(4)]

    fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharex=True, sharey=True)
    axes[0].scatter(actions[:2000, 0], actions[:2000, 1], s=2, c=rewards[:2000], cmap="viridis")
    axes[0].set_title("dataset (colour: reward)")
    for k, (x, y) in enumerate(modes):
        axes[0].annotate(f"r~{mean_rewards[k]:g}", (x, y), textcoords="offset points", xytext=(-12, 10))
    for ax, (name, s) in zip(axes[1:], samples.items(), strict=True):
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5)
        ax.set_title(f"{name}\nbest mode: {shares[name][3]:.0%}")
    for ax in axes:
        ax.set_xlim(-1.1, 1.1)
        ax.set_ylim(-1.1, 1.1)
        ax.set_aspect("equal")
    fig.suptitle("2-D bandit (Diffusion-QL paper, Fig. 1): 1000 sampled actions each; best mode at (0.8, -0.8)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"shares_within_0.3_of_each_mode": shares, "steps": {"ql": ql_steps, "bc": bc_steps, "td3bc": td3bc_steps}}


def gaussian_td3bc(actions: np.ndarray, rewards: np.ndarray, steps: int, seed: int, alpha: float = 2.5) -> np.ndarray:
    """A state-free Gaussian policy trained TD3+BC-style on the bandit: Q(a) regressed on r, actor
    loss -lambda Q(a~pi) + (a~pi - a_data)^2 with lambda = alpha / mean|Q| (Fujimoto & Gu 2021)."""
    torch.manual_seed(seed)
    a, r = torch.as_tensor(actions), torch.as_tensor(rewards)
    critic = nn.Sequential(nn.Linear(2, 128), nn.Mish(), nn.Linear(128, 128), nn.Mish(), nn.Linear(128, 1))
    mean, log_std = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    c_opt = torch.optim.Adam(critic.parameters(), lr=3e-4)
    a_opt = torch.optim.Adam([mean, log_std], lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(a), (100,), generator=generator)
        c_loss = F.mse_loss(critic(a[idx]).squeeze(-1), r[idx])
        c_opt.zero_grad(set_to_none=True)
        c_loss.backward()
        c_opt.step()
        pi = (mean + log_std.clamp(-5, 1).exp() * torch.randn(100, 2, generator=generator)).tanh()
        q = critic(pi).squeeze(-1)
        lam = alpha / q.abs().mean().detach()
        a_loss = -lam * q.mean() + F.mse_loss(pi, a[idx])
        a_opt.zero_grad(set_to_none=True)
        a_loss.backward()
        a_opt.step()
    with torch.no_grad():
        return (mean + log_std.clamp(-5, 1).exp() * torch.randn(1000, 2, generator=generator)).tanh().numpy()


# ---------------------------------------------------------------------------------------------
def available_algos(requested: Sequence[str]) -> tuple[list[str], list[str]]:
    notes = []
    algos = list(requested)
    if {"td3bc", "iql"} & set(algos):
        try:
            import d3rlpy  # noqa: F401
        except ImportError:
            algos = [a for a in algos if a not in ("td3bc", "iql")]
            notes.append("d3rlpy is not installed: TD3+BC and IQL skipped")
    return algos, notes


def plot_curves(path: Path, dataset_id: str, runs: dict[str, list[list[dict]]], steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algo, curves in runs.items():
        x = np.array([p["step"] for p in curves[0]])
        y = np.array([[p["score"] for p in c] for c in curves])
        m, s = y.mean(0), y.std(0)
        ax.plot(x, m, marker="o", label=LABELS[algo])
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    ax.set_xlabel("gradient steps (batch 256)")
    ax.set_ylabel("normalized score")
    ax.set_title(f"{dataset_id} (mean +/- std over {len(next(iter(runs.values())))} seed(s); short CPU budget)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["dql_bench/hopper/medium-v0", "dql_bench/hopper/expert-v0"])
    p.add_argument("--minari-path", default=None, help="MINARI_DATASETS_PATH holding the datasets")
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--steps", type=int, default=5000, help="gradient steps per run (every algorithm)")
    p.add_argument("--eval-every", type=int, default=1000, help="evaluate every this many gradient steps")
    p.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: OMP_NUM_THREADS if set, else all visible cores)",
    )
    p.add_argument("--bandit-ql-steps", type=int, default=1000, help="Diffusion-QL steps on the bandit (0: no figure)")
    p.add_argument("--bandit-bc-steps", type=int, default=15_000, help="diffusion BC (T=50) steps on the bandit")
    p.add_argument("--bandit-td3bc-steps", type=int, default=3000, help="Gaussian TD3+BC steps on the bandit")
    p.add_argument("--compile", action="store_true", help="DiffusionQL through compile_training() (same math)")
    p.add_argument("--device", default="cpu", help="DiffusionQL's device (cpu, cuda)")
    p.add_argument(
        "--dql-variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an extra DiffusionQL row with hyperparameters over the preset, e.g. ln='{\"critic_layer_norm\": true}'",
    )
    p.add_argument("--out", type=Path, default=Path("benchmark_results/scores"))
    args = p.parse_args(argv)
    try:
        variants = parse_named_hyperparameters(args.dql_variant, "--dql-variant")
    except ValueError as e:
        p.error(str(e))
    args.dql_variant = [(f"dql:{name}", hyperparameters) for name, hyperparameters in variants.items()]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.minari_path is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(args.minari_path).resolve())
    # --threads, else an explicit OMP_NUM_THREADS, else every visible core
    omp = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(args.threads or (int(omp) if omp.isdigit() else 0) or len(os.sched_getaffinity(0)))
    args.out.mkdir(parents=True, exist_ok=True)
    from dql_agent.integrations.minari import load_minari_dataset, minari_to_transitions

    algos, notes = available_algos(args.algos)
    plots = importlib.util.find_spec("matplotlib") is not None
    if not plots:
        notes.append("matplotlib is not installed: no curve PNGs and no bandit figure (pip install dql_agent[bench])")
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "notes": notes, "datasets": {}}
    fast = {"compile_training": args.compile, "device": args.device}
    trainers = {
        "dql": lambda *a: train_dql(*a, **fast),
        "bc-diffusion": lambda *a: train_dql(*a, extra={"eta": 0.0}, **fast),
        "bc-mlp": train_bc_mlp,
        "td3bc": lambda *a: train_d3rlpy("td3bc", *a),
        "iql": lambda *a: train_d3rlpy("iql", *a),
    }
    for name, hyperparameters in args.dql_variant:  # e.g. dql:ln = {"critic_layer_norm": true}
        trainers[name] = lambda *a, hp=hyperparameters: train_dql(*a, extra=hp, **fast)
        algos.append(name)
        LABELS[name] = f"Diffusion-QL {name.split(':', 1)[1]} {json.dumps(hyperparameters)}"
    for dataset_id in args.datasets:
        dataset = load_minari_dataset(dataset_id)
        data = minari_to_transitions(dataset)
        env_id = dataset.spec.env_spec.id
        runs: dict[str, list[list[dict]]] = {}
        seconds: dict[str, float] = {}
        for algo in algos:
            for seed in args.seeds:
                curve = Curve(dataset, env_id, args.eval_episodes, seed)
                start = time.perf_counter()
                trainers[algo](data, dataset.action_space, dataset_id, args.steps, args.eval_every, seed, curve)
                seconds[algo] = seconds.get(algo, 0.0) + time.perf_counter() - start
                runs.setdefault(algo, []).append(curve.points)
                print(f"{dataset_id} {algo} seed {seed}: {curve.points[-1]['score']:.1f}", flush=True)
        final = {a: [c[-1]["score"] for c in runs[a]] for a in runs}
        best = {a: [max(p["score"] for p in c) for c in runs[a]] for a in runs}  # best-of-training, online
        results["datasets"][dataset_id] = {
            "env_id": env_id,
            "transitions": len(data["rewards"]),
            "final_scores": final,
            "mean": {a: float(np.mean(v)) for a, v in final.items()},
            "std": {a: float(np.std(v)) for a, v in final.items()},
            "best_scores": best,
            "best_mean": {a: float(np.mean(v)) for a, v in best.items()},
            "best_std": {a: float(np.std(v)) for a, v in best.items()},
            "seconds_per_run": {a: seconds[a] / len(args.seeds) for a in seconds},
            "curves": runs,
            "preset": dql_preset(dataset_id),
        }
        if plots:
            plot_curves(args.out / f"curve_{dataset_id.replace('/', '_')}.png", dataset_id, runs, args.steps)
    if args.bandit_ql_steps > 0 and plots:
        results["bandit"] = bandit_figure(
            args.out / "bandit.png", args.bandit_ql_steps, args.bandit_bc_steps, args.bandit_td3bc_steps
        )
    table = markdown_table(results, algos, args)
    print(table)
    (args.out / "scores.md").write_text(table + "\n")
    (args.out / "scores.json").write_text(json.dumps(results, indent=2))
    return results


def markdown_table(results: dict[str, Any], algos: list[str], args: argparse.Namespace) -> str:
    lines = [
        f"Normalized score (x100) after {args.steps} gradient steps, mean +/- std over seeds {args.seeds}, "
        f"{args.eval_episodes} evaluation episodes per seed: final / best of training (evaluated every "
        f"{args.eval_every} steps; seconds per run in brackets)",
        "",
        "| dataset | " + " | ".join(LABELS[a] for a in algos) + " |",
        "|---" * (len(algos) + 1) + "|",
    ]
    for dataset_id, r in results["datasets"].items():
        cells = [
            f"{r['mean'][a]:.1f} +/- {r['std'][a]:.1f} / {r['best_mean'][a]:.1f} +/- {r['best_std'][a]:.1f} "
            f"({r['seconds_per_run'][a]:.0f} s)"
            for a in algos
        ]
        lines.append(f"| {dataset_id} | " + " | ".join(cells) + " |")
    if "bandit" in results:
        lines += ["", "Bandit: share of 1000 samples within 0.3 of each mode (r~3, 0, 1.5, 5)", ""]
        for name, shares in results["bandit"]["shares_within_0.3_of_each_mode"].items():
            lines.append(f"- {name}: " + ", ".join(f"{s:.0%}" for s in shares))
    lines += [f"- note: {n}" for n in results["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
