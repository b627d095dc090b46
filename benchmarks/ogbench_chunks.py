"""Action chunks on OGBench manipulation: Diffusion-QL with and without chunks, diffusion BC with and
without chunks, and an MLP BC baseline, trained on datasets built by ``benchmarks.ogbench_data``.

Each run trains one configuration on one single-task dataset (OGBench's ``*-singletask-task<k>``:
the play data relabelled with the task's rewards, reward = (subtasks done) - (subtasks), a state
that solves the task ends the episode) for ``--steps`` gradient steps, then evaluates the success
rate over ``--episodes`` episodes of the single-task env (OGBench's own success flag). Runs append
to a JSON-lines file, so an interrupted study resumes where it stopped; ``--report`` prints the
table (mean +- std over seeds) beside the published full-budget numbers (FQL paper, Table 2: 1M
steps, 8 seeds, 5 tasks per domain), a reference, not a claim about this budget.

    MUJOCO_GL=egl OMP_NUM_THREADS=1 python -m benchmarks.ogbench_chunks --data data/ogbench \\
        --domains cube-single scene --seeds 0 1 2 --steps 20000 --out benchmarks/results/ogbench_chunks.jsonl
    python -m benchmarks.ogbench_chunks --report --out benchmarks/results/ogbench_chunks.jsonl

Configurations (every one with ``normalize_observations=True``: OGBench's observations mix joint
angles, velocities and positions of very different scales):

- ``dql``: Diffusion-QL, the library's defaults (one action per observation);
- ``dql-h5``: Diffusion-QL with ``action_horizon=5`` (Q-chunking's h on OGBench), the whole chunk run
  before the next plan (``n_action_steps=5``);
- ``bc``, ``bc-h5``: the same without the Q term (``eta=0``): diffusion behaviour cloning;
- ``mlp-bc``: a 3 x 256 ReLU MLP regressing actions (MSE, Adam 3e-4), the non-diffusion baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine

CONFIGS: dict[str, dict[str, Any]] = {
    "dql": {},
    "dql-h5": {"action_horizon": 5, "n_action_steps": 5},
    "bc": {"eta": 0.0},
    "bc-h5": {"eta": 0.0, "action_horizon": 5, "n_action_steps": 5},
    "mlp-bc": {},
}
# FQL paper (Park, Li, Levine 2025), Table 2: success (%) at 1M steps, 8 seeds, 5 tasks per domain.
PUBLISHED = {
    "cube-double": {"ReBRAC": 12, "IDQL": 15, "SRPO": 2, "FBRAC": 15, "FQL": 29},
    "scene": {"ReBRAC": 41, "IDQL": 46, "SRPO": 20, "FBRAC": 45, "FQL": 56},
    "puzzle-3x3": {"ReBRAC": 21, "IDQL": 10, "SRPO": 18, "FBRAC": 14, "FQL": 30},
}


def load(data: Path, domain: str, task: int) -> tuple[Any, Any]:
    """The single-task env and the relabelled training dataset as an OfflineBuffer."""
    from ogbench.utils import make_env_and_datasets

    from dql_agent import OfflineBuffer

    name = f"{domain}-play-singletask-task{task}-v0"  # OGBench's name: the env without "play"
    env, train, _ = make_env_and_datasets(name, dataset_path=str(data / f"{domain}-play-v0.npz"))
    solved = train["masks"] == 0.0  # a state that solves the task: no bootstrap after it
    buffer = OfflineBuffer(
        train["observations"],
        train["actions"],
        train["rewards"],
        train["next_observations"],
        terminals=solved,
        timeouts=(train["terminals"] > 0) & ~solved,  # the end of an OGBench episode is a truncation
        action_space=env.action_space,
        metadata={"dataset_id": f"{domain}-play (built by benchmarks.ogbench_data)", "env_id": env.spec.id},
    )
    return env, buffer


def success_rate(act: Any, env: Any, episodes: int, seed: int) -> tuple[float, float]:
    """The fraction of ``episodes`` in which OGBench's success flag was up at the end, and the mean
    final reward: minus the number of the task's objects (cubes, buttons, drawer, window) not at
    their goal, a graded score where the success rate is all or nothing."""
    successes, final_rewards = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        state, start, done, info, reward = None, True, False, {}, 0.0
        while not done:
            action, state = act(obs, state, start)
            obs, reward, terminated, truncated, info = env.step(action)
            done, start = terminated or truncated, False
        successes.append(bool(info.get("success", False)))
        final_rewards.append(float(reward))
    return float(np.mean(successes)), float(np.mean(final_rewards))


def train_mlp_bc(buffer: Any, steps: int, seed: int, batch_size: int = 256) -> Any:
    """A 3 x 256 MLP regressing the dataset's actions (scaled to [-1, 1]) from standardised states."""
    torch.manual_seed(seed)
    obs, actions = buffer.observations, buffer.actions
    low = torch.as_tensor(buffer.action_space.low)
    high = torch.as_tensor(buffer.action_space.high)
    mean, std = obs.mean(0), obs.std(0) + 1e-3
    target = 2 * (actions - low) / (high - low) - 1
    layers: list[torch.nn.Module] = []
    width = obs.shape[1]
    for _ in range(3):
        layers += [torch.nn.Linear(width, 256), torch.nn.ReLU()]
        width = 256
    net = torch.nn.Sequential(*layers, torch.nn.Linear(width, actions.shape[1]), torch.nn.Tanh())
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(obs), (batch_size,), generator=generator)
        loss = (net((obs[idx] - mean) / std) - target[idx]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def act(observation: np.ndarray, state: Any, start: bool) -> tuple[np.ndarray, Any]:
        with torch.no_grad():
            x = (torch.as_tensor(observation, dtype=torch.float32) - mean) / std
            scaled = net(x[None])[0]
        return (low + (scaled + 1) * (high - low) / 2).numpy(), None

    return act


def run(data: Path, domain: str, task: int, config: str, seed: int, steps: int, episodes: int) -> dict[str, Any]:
    """One configuration, seed and task: train, evaluate; the JSON record."""
    env, buffer = load(data, domain, task)
    start = time.time()
    if config == "mlp-bc":
        act = train_mlp_bc(buffer, steps, seed)
    else:
        from dql_agent import DiffusionQL

        model = DiffusionQL(buffer, seed=seed, device="cpu", normalize_observations=True, **CONFIGS[config])
        model.learn(steps, log_interval=0)

        def act(observation: np.ndarray, state: Any, start: bool) -> tuple[np.ndarray, Any]:
            action, state = model.predict(observation, state=state, episode_start=np.array([start]), deterministic=True)
            return action, state

    trained = time.time() - start
    rate, final_reward = success_rate(act, env, episodes, seed=10_000 + 100 * seed)
    return {
        "domain": domain,
        "task": task,
        "config": config,
        "seed": seed,
        "steps": steps,
        "episodes": episodes,
        "success": rate,
        "final_reward": final_reward,
        "train_seconds": round(trained, 1),
        "eval_seconds": round(time.time() - start - trained, 1),
        "transitions": len(buffer),
        "machine": machine(),
    }


def done_runs(out: Path) -> set[tuple]:
    if not out.exists():
        return set()
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return {(r["domain"], r["task"], r["config"], r["seed"], r["steps"]) for r in rows}


def report(out: Path) -> str:
    """The markdown table of the runs in ``out``: success (%) mean +- std over seeds, and the mean
    final reward (0 = every object at its goal) where the runs recorded it."""
    if not out.exists():
        return f"no runs yet in {out}"
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["domain"], r["task"], r["steps"], r["config"]), []).append(r)
    lines = [
        "| domain (task) | steps | " + " | ".join(CONFIGS) + " |",
        "|---|---:|" + "---:|" * len(CONFIGS),
    ]
    for domain, task, steps in sorted({key[:3] for key in groups}):
        cells = []
        for config in CONFIGS:
            runs = groups.get((domain, task, steps, config), [])
            if not runs:
                cells.append("-")
                continue
            success = [100 * r["success"] for r in runs]
            cell = f"{np.mean(success):.0f} +- {np.std(success):.0f}"
            rewards = [r["final_reward"] for r in runs if "final_reward" in r]
            if len(rewards) == len(runs):
                cell += f" [{np.mean(rewards):.2f}]"
            cells.append(f"{cell} (n={len(runs)})")
        lines.append(f"| {domain} (task {task}) | {steps:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/ogbench"))
    parser.add_argument("--domains", nargs="+", default=["cube-single"])
    parser.add_argument("--task", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ogbench_chunks.jsonl"))
    parser.add_argument("--report", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.out))
        return []
    torch.set_num_threads(1)
    done, records = done_runs(args.out), []
    for domain in args.domains:
        for seed in args.seeds:
            for config in args.configs:
                if (domain, args.task, config, seed, args.steps) in done:
                    continue
                record = run(args.data, domain, args.task, config, seed, args.steps, args.episodes)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps({k: v for k, v in record.items() if k != "machine"}), flush=True)
                records.append(record)
    return records


if __name__ == "__main__":
    main()
