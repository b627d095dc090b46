"""Load a dql_agent model from the Hub and evaluate it with plain Stable-Baselines3.

The model speaks SB3's ``predict`` protocol, so ``evaluate_policy`` and vectorised envs work as
they do for any SB3 model::

    python examples/load_and_evaluate_sb3.py me/dql-pendulum --n-eval-episodes 10 --n-envs 4
    python examples/load_and_evaluate_sb3.py ./dql-pendulum-hub      # a local folder works too
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="Hub repo id (owner/name) or a local model folder")
    parser.add_argument("--env-id", help="env to evaluate on (default: the one it was trained for)")
    parser.add_argument("--n-eval-episodes", type=int, default=10)
    parser.add_argument("--n-envs", type=int, default=1, help="envs in the SB3 DummyVecEnv")
    parser.add_argument("--revision", help="Hub branch, tag or commit")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Returns (mean_reward, std_reward)."""
    args = parse_args(argv)

    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    import dql_agent

    model = dql_agent.load_from_hub(args.model, revision=args.revision, device=args.device)
    env_id = args.env_id or model.metadata.get("env_id")
    if env_id is None:
        raise SystemExit("the model does not record its env id: pass --env-id")
    env = make_vec_env(env_id, n_envs=args.n_envs, seed=args.seed)  # Monitor-wrapped sub-envs
    mean_reward, std_reward = evaluate_policy(model, env, n_eval_episodes=args.n_eval_episodes, deterministic=True)
    env.close()
    print(
        f"{type(model).__name__} on {env_id}: mean reward {mean_reward:.2f} +/- "
        f"{std_reward:.2f} over {args.n_eval_episodes} episodes"
    )
    return float(mean_reward), float(std_reward)


if __name__ == "__main__":
    main()
