"""OGBench manipulation datasets, built here from the scripted oracles the ``ogbench`` package ships.

OGBench's published datasets are downloaded at run time, which this machine cannot do; its
oracles (``ogbench.manipspace.oracles``) come with the package. This script rolls them out the
way the OGBench paper describes its datasets (Park et al., 2025, section 5 and appendix; facts in
../shared/reference/robotics.md):

- the environment is made with ``terminate_at_goal=False, mode="data_collection"`` and runs
  episodes of ``--max-steps`` (1,001 in OGBench) steps;
- ``play`` data follows the plan oracles (non-Markovian: a plan through keyframes with
  temporally correlated noise, ``noise=0.1``, ``noise_smoothing=0.5``); ``noisy`` data the
  Markov oracles with Gaussian action noise of a scale drawn per episode in [0, ``noise``]
  (10x on the gripper, 3x on the yaw);
- when the oracle finishes its task, the env draws the next target (``set_new_target``;
  cube stacking with the per-domain probabilities) and the oracle for that task takes over;
- actions are clipped to [-1, 1]; each step records the observation, the action, the episode's
  end and the simulator state before the step (``qpos``, ``qvel``, button states), which the
  single-task reward relabelling reads.

The output is OGBench's own npz layout (``observations``, ``actions``, ``terminals`` marking each
episode's last step, ``qpos``, ``qvel``[, ``button_states``]), with a tenth as many validation
episodes in ``*-val.npz``, so ``ogbench.utils.make_env_and_datasets(name, dataset_path=...)``
reads it. Needs the ``ogbench`` package (``pip install ogbench==1.2.2``)::

    MUJOCO_GL=egl python -m benchmarks.ogbench_data --env cube-single --episodes 100 --out data/ogbench
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DOMAINS = ("cube-single", "cube-double", "scene", "puzzle-3x3")


def oracles(env: Any, domain: str, kind: str, noise: float, smoothing: float, min_norm: float) -> dict[str, Any]:
    """The oracle for each task kind the domain's env asks for (``info["privileged/target_task"]``)."""
    from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle
    from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
    from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle
    from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle
    from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
    from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
    from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

    plan = {"noise": noise, "noise_smoothing": smoothing}
    markov = {"min_norm": min_norm}
    play = kind == "play"
    if domain.startswith("cube"):
        return {"cube": CubePlanOracle(env=env, **plan) if play else CubeMarkovOracle(env=env, **markov)}
    if domain == "scene":
        if play:
            return {
                "cube": CubePlanOracle(env=env, **plan),
                "button": ButtonPlanOracle(env=env, **plan),
                "drawer": DrawerPlanOracle(env=env, **plan),
                "window": WindowPlanOracle(env=env, **plan),
            }
        return {
            "cube": CubeMarkovOracle(env=env, max_step=100, **markov),
            "button": ButtonMarkovOracle(env=env, **markov),
            "drawer": DrawerMarkovOracle(env=env, **markov),
            "window": WindowMarkovOracle(env=env, **markov),
        }
    if domain.startswith("puzzle"):  # lights out: buttons only, the gripper kept closed
        if play:
            return {"button": ButtonPlanOracle(env=env, gripper_always_closed=True, **plan)}
        return {"button": ButtonMarkovOracle(env=env, gripper_always_closed=True, **markov)}
    raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")


def stacking_probability(domain: str, rng: np.random.Generator) -> float:
    """How often a cube task is a stacking one, drawn per episode (OGBench's ranges per cube count)."""
    ranges = {"cube-single": (0.0, 0.0), "cube-double": (0.0, 0.25), "cube-triple": (0.05, 0.35)}
    low, high = ranges.get(domain, (0.5, 0.5))
    return float(rng.uniform(low, high))


def scene_is_healthy(qpos: np.ndarray) -> bool:
    """Scene episodes in which the cube left the table (not into the drawer) are redone, as OGBench does."""
    cube = qpos[:, 14:17]
    too_far_right = (cube[:, 1] >= 0.29).any()
    lost_left = ((cube[:, 1] <= -0.3) & ((cube[:, 2] < 0.06) | (cube[:, 2] > 0.08))).any()
    return not (too_far_right or lost_left)


def rollout(env: Any, agents: dict[str, Any], domain: str, kind: str, noise: float, rng: np.random.Generator) -> dict:
    """One episode of the oracles, as lists of per-step records."""
    ob, info = env.reset(seed=int(rng.integers(2**31)))
    p_stack = stacking_probability(domain, rng)
    scale = rng.uniform(0.0, noise)  # the Markov oracles' noise level of this episode
    agent = agents[info["privileged/target_task"]]
    agent.reset(ob, info)
    episode: dict[str, list] = {"observations": [], "actions": [], "terminals": [], "qpos": [], "qvel": []}
    buttons = hasattr(env.unwrapped, "_cur_button_states")
    if buttons:
        episode["button_states"] = []
    done = False
    while not done:
        action = np.asarray(agent.select_action(ob, info), np.float64)
        if kind == "noisy":
            action = action + rng.normal(0.0, [scale, scale, scale, scale * 3, scale * 10], action.shape)
        action = np.clip(action, -1.0, 1.0)
        next_ob, _, terminated, truncated, info = env.step(action)
        done = terminated or truncated
        if agent.done:  # the task is done: the env draws the next one
            agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=p_stack)
            agent = agents[agent_info["privileged/target_task"]]
            agent.reset(agent_ob, agent_info)
        episode["observations"].append(ob)
        episode["actions"].append(action)
        episode["terminals"].append(done)
        episode["qpos"].append(info["prev_qpos"])
        episode["qvel"].append(info["prev_qvel"])
        if buttons:
            episode["button_states"].append(info["prev_button_states"])
        ob = next_ob
    return episode


def collect(
    domain: str,
    n_episodes: int,
    *,
    kind: str = "play",
    seed: int = 0,
    noise: float = 0.1,
    noise_smoothing: float = 0.5,
    min_norm: float = 0.4,
    max_steps: int = 1001,
) -> dict[str, np.ndarray]:
    """``n_episodes`` episodes of the domain's oracles, concatenated in OGBench's npz layout."""
    import gymnasium as gym
    import ogbench.manipspace  # noqa: F401  # registers the environments

    if kind not in ("play", "noisy"):
        raise ValueError(f"kind must be 'play' or 'noisy', got {kind!r}")
    env = gym.make(f"{domain}-v0", terminate_at_goal=False, mode="data_collection", max_episode_steps=max_steps)
    agents = oracles(env, domain, kind, noise, noise_smoothing, min_norm)
    rng = np.random.default_rng(seed)
    episodes = []
    while len(episodes) < n_episodes:
        episode = rollout(env, agents, domain, kind, noise, rng)
        if domain == "scene" and not scene_is_healthy(np.asarray(episode["qpos"])):
            continue
        episodes.append(episode)
    env.close()
    keys = episodes[0].keys()
    out = {key: np.concatenate([np.asarray(e[key]) for e in episodes]) for key in keys}
    out["observations"] = out["observations"].astype(np.float32)
    out["actions"] = out["actions"].astype(np.float32)
    out["terminals"] = out["terminals"].astype(np.float32)
    return out


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", dest="domains", nargs="+", default=["cube-single"], choices=DOMAINS)
    parser.add_argument("--kind", default="play", choices=("play", "noisy"))
    parser.add_argument("--episodes", type=int, default=100, help="training episodes (validation: a tenth more)")
    parser.add_argument("--max-steps", type=int, default=1001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for domain in args.domains:
        for split, n, offset in (("", args.episodes, 0), ("-val", max(1, args.episodes // 10), 10_000)):
            start = time.time()
            data = collect(domain, n, kind=args.kind, seed=args.seed + offset, max_steps=args.max_steps)
            path = args.out / f"{domain}-{args.kind}-v0{split}.npz"
            np.savez_compressed(path, **data)
            steps = len(data["actions"])
            print(f"{path}: {n} episodes, {steps:,} steps, {steps / (time.time() - start):.0f} steps/s", flush=True)
            written.append(path)
    return written


if __name__ == "__main__":
    main()
