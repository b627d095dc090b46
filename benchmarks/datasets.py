"""Build D4RL-style Minari datasets locally from a Stable-Baselines3 expert.

Three datasets per environment, named like D4RL's locomotion sets:

- ``expert``: the expert's deterministic action plus small Gaussian noise;
- ``medium``: the expert plus large Gaussian noise, each action replaced by a uniform random one
  with probability ``--medium-random-prob`` (a weaker, more diverse behaviour policy);
- ``medium-expert``: the episodes of both, concatenated (as in D4RL).

Every dataset carries ``ref_min_score`` (mean return of uniform random actions) and
``ref_max_score`` (mean return of the noiseless expert), so ``minari.get_normalized_score`` works.
Datasets are written with :func:`dql_agent.integrations.minari.write_minari_dataset` (no jax).

Loading the SB3 zips of ``DLR-RM/rl-trained-agents`` needs ``shimmy>=2`` (the zips hold old gym
spaces). Example::

    python -m benchmarks.datasets /work/shared/agents/sac_Hopper.zip --env Hopper-v5 \
        --steps 50000 --out /tmp/minari
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from dql_agent.demo_data import record_episode

KINDS = ("expert", "medium", "medium-expert")
# SB3 2.x cannot unpickle the schedules stored in the old zips; they are not needed to act.
CUSTOM_OBJECTS = {"learning_rate": 0.0, "lr_schedule": lambda _: 0.0}


def load_expert(source: str, hub_filename: str | None = None, env: gym.Env | None = None) -> Any:
    """An SB3 agent from a zip path, or from a Hub repo id (``sb3/sac-Hopper-v3``) when no such file exists.

    The algorithm class is read from the zip name or repo id (``sac``, ``td3``, ``ppo``...); SAC by default.
    With ``env``, its spaces replace the zip's pickled ones (old ``gym`` spaces, which need the
    ``gym`` package to unpickle).
    """
    import stable_baselines3 as sb3

    path = Path(source)
    if not path.exists():
        if source.endswith(".zip") or source.count("/") != 1:
            raise FileNotFoundError(f"expert {source!r} is neither an existing zip file nor a Hub repo id 'owner/name'")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, hub_filename or f"{source.split('/')[-1]}.zip"))
    name = path.name.lower()
    algo = next((a for a in ("td3", "ddpg", "ppo", "a2c", "sac") if a in name), "sac")
    cls = getattr(sb3, algo.upper())
    spaces = {} if env is None else {"observation_space": env.observation_space, "action_space": env.action_space}
    return cls.load(str(path), device="cpu", custom_objects={**CUSTOM_OBJECTS, **spaces})


def noisy_policy(
    expert: Any, space: gym.spaces.Box, rng: np.random.Generator, noise: float, random_prob: float
) -> Callable[[np.ndarray], np.ndarray]:
    """Expert action + N(0, noise * half-range), replaced by U(low, high) with ``random_prob``."""
    half = (space.high - space.low) / 2.0

    def act(obs: np.ndarray) -> np.ndarray:
        if random_prob > 0 and rng.random() < random_prob:
            return rng.uniform(space.low, space.high)
        action, _ = expert.predict(obs, deterministic=True)
        if noise > 0:
            action = action + rng.normal(0.0, noise, size=action.shape) * half
        return action

    return act


def collect(
    env: gym.Env, act: Callable, n_steps: int, rng: np.random.Generator, n_episodes: int | None = None
) -> list[dict]:
    """Whole episodes until at least ``n_steps`` transitions; the last one is cut (truncated) to fit exactly.

    With ``n_episodes``, exactly that many whole episodes instead (``n_steps`` is then ignored).
    """
    if n_episodes is not None:
        return [record_episode(env, act, int(rng.integers(2**31))) for _ in range(n_episodes)]
    episodes, total = [], 0
    while total < n_steps:
        episode = record_episode(env, act, int(rng.integers(2**31)), max_steps=n_steps - total)
        episodes.append(episode)
        total += len(episode["rewards"])
    return episodes


def mean_return(env: gym.Env, act: Callable, n_episodes: int, seed: int) -> float:
    return float(np.mean([record_episode(env, act, seed + i)["rewards"].sum() for i in range(n_episodes)]))


def dataset_id(namespace: str, env_id: str, kind: str) -> str:
    """``<namespace>/<env name>/<kind>-v0``, e.g. ``dql_bench/hopper/medium-v0``."""
    return f"{namespace}/{env_id.split('-')[0].lower()}/{kind}-v0"


def build(
    expert_source: str,
    env_id: str = "Hopper-v5",
    n_steps: int = 50_000,
    kinds: Sequence[str] = KINDS,
    expert_noise: float = 0.1,
    medium_noise: float = 0.3,
    medium_random_prob: float = 0.1,
    n_reference_episodes: int = 10,
    namespace: str = "dql_bench",
    seed: int = 0,
    overwrite: bool = True,
    hub_filename: str | None = None,
    n_episodes: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Collect and write the datasets; returns ``{dataset_id: summary}`` (steps, episodes, returns, refs).

    ``n_episodes`` collects that many whole episodes of expert and of medium instead of ``n_steps``
    transitions.
    """
    import minari
    from minari.storage import get_dataset_path

    from dql_agent.integrations.minari import write_minari_dataset

    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"kinds must be among {KINDS}, got {unknown}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    env = gym.make(env_id)
    expert = load_expert(expert_source, hub_filename, env)
    space = env.action_space
    rng = np.random.default_rng(seed)

    ref_seed = seed + 10**6  # reference rollouts stay off the datasets' reset seeds
    ref_rng = np.random.default_rng(ref_seed)
    ref_min = mean_return(env, lambda obs: ref_rng.uniform(space.low, space.high), n_reference_episodes, ref_seed)
    ref_max = mean_return(env, noisy_policy(expert, space, ref_rng, 0.0, 0.0), n_reference_episodes, ref_seed)

    parts: dict[str, list[dict]] = {}
    if {"expert", "medium-expert"} & set(kinds):
        parts["expert"] = collect(env, noisy_policy(expert, space, rng, expert_noise, 0.0), n_steps, rng, n_episodes)
    if {"medium", "medium-expert"} & set(kinds):
        act = noisy_policy(expert, space, rng, medium_noise, medium_random_prob)
        parts["medium"] = collect(env, act, n_steps, rng, n_episodes)
    settings = {
        "expert": f"expert + N(0, {expert_noise} * half-range) action noise",
        "medium": f"expert + N(0, {medium_noise} * half-range) noise, uniform random actions w.p. {medium_random_prob}",
    }
    settings["medium-expert"] = f"the episodes of medium ({settings['medium']}) and expert ({settings['expert']})"

    summaries = {}
    for kind in kinds:
        episodes = parts["medium"] + parts["expert"] if kind == "medium-expert" else parts[kind]
        name = dataset_id(namespace, env_id, kind)
        path = get_dataset_path(name)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"Minari dataset {name!r} already exists at {path}")
            shutil.rmtree(path)
        returns = np.array([e["rewards"].sum() for e in episodes])
        write_minari_dataset(
            name,
            episodes,
            observation_space=env.observation_space,
            action_space=space,
            env_id=env_id,
            ref_min_score=ref_min,
            ref_max_score=ref_max,
            description=(
                f"{env_id} {kind}: {settings[kind]}; {len(episodes)} episodes, mean return {returns.mean():.1f}. "
                f"ref_min_score: uniform random actions; ref_max_score: the noiseless expert "
                f"({n_reference_episodes} episodes each)."
            ),
            algorithm_name=f"SB3 expert {expert_source} + noise (benchmarks/datasets.py)",
        )
        dataset = minari.load_dataset(name)
        summaries[name] = {
            "steps": int(sum(len(e["rewards"]) for e in episodes)),
            "episodes": len(episodes),
            "mean_return": float(returns.mean()),
            "normalized_score": float(minari.get_normalized_score(dataset, returns).mean() * 100.0),
            "ref_min_score": ref_min,
            "ref_max_score": ref_max,
            "behaviour": settings[kind],
        }
    env.close()
    return summaries


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("expert", help="SB3 agent: a zip path, or a Hub repo id such as sb3/sac-Hopper-v3")
    p.add_argument("--hub-filename", default=None, help="file in the Hub repo (default <repo name>.zip)")
    p.add_argument("--env", default="Hopper-v5", help="Gymnasium env id (default Hopper-v5)")
    p.add_argument("--steps", type=int, default=50_000, help="transitions of expert and of medium (default 50000)")
    p.add_argument(
        "--episodes", type=int, default=None, help="whole episodes of expert and of medium (instead of --steps)"
    )
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--expert-noise", type=float, default=0.1, help="expert action noise std / half-range")
    p.add_argument("--medium-noise", type=float, default=0.3, help="medium action noise std / half-range")
    p.add_argument("--medium-random-prob", type=float, default=0.1, help="medium: P(uniform random action)")
    p.add_argument("--ref-episodes", type=int, default=10, help="episodes for each reference score")
    p.add_argument("--namespace", default="dql_bench", help="dataset ids are <namespace>/<env>/<kind>-v0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="MINARI_DATASETS_PATH to write to (default: minari's own)")
    p.add_argument("--json", default=None, help="write the summaries to this JSON file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    if args.out is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(args.out).resolve())
    start = time.perf_counter()
    summaries = build(
        args.expert,
        env_id=args.env,
        n_steps=args.steps,
        kinds=args.kinds,
        expert_noise=args.expert_noise,
        medium_noise=args.medium_noise,
        medium_random_prob=args.medium_random_prob,
        n_reference_episodes=args.ref_episodes,
        namespace=args.namespace,
        seed=args.seed,
        hub_filename=args.hub_filename,
        n_episodes=args.episodes,
    )
    print(f"built in {time.perf_counter() - start:.0f} s")
    print("| dataset | steps | episodes | mean return | normalized | ref_min | ref_max |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summaries.items():
        print(
            f"| {name} | {s['steps']} | {s['episodes']} | {s['mean_return']:.1f} | {s['normalized_score']:.1f} | "
            f"{s['ref_min_score']:.1f} | {s['ref_max_score']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return summaries


if __name__ == "__main__":
    main()
