"""Load a dql_agent model (Hub repo or local folder) and record a rollout video to mp4.

Needs no display: frames come from ``render_mode="rgb_array"`` and imageio-ffmpeg's own ffmpeg
(for MuJoCo envs set ``MUJOCO_GL=egl``)::

    python examples/record_rollout.py me/dql-pendulum --out pendulum.mp4 --episodes 2
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="Hub repo id (owner/name) or a local model folder")
    parser.add_argument("--out", type=Path, default=Path("rollout.mp4"), help="the .mp4 to write")
    parser.add_argument("--env-id", help="env to roll out in (default: the one it was trained for)")
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=1000, help="frame budget of the video")
    parser.add_argument("--fps", type=float, help="default: the env's render_fps")
    parser.add_argument("--stochastic", action="store_true", help="sample actions")
    parser.add_argument("--revision", help="Hub branch, tag or commit")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Returns the path of the video written."""
    args = parse_args(argv)

    import gymnasium as gym

    import dql_agent
    from dql_agent.integrations.video import record_video

    model = dql_agent.load_from_hub(args.model, revision=args.revision, device=args.device)
    env_id = args.env_id or model.metadata.get("env_id")
    if env_id is None:
        raise SystemExit("the model does not record its env id: pass --env-id")
    env = gym.make(env_id, render_mode="rgb_array")
    path = record_video(
        model,
        env,
        args.out,
        n_episodes=args.episodes,
        max_steps=args.max_steps,
        fps=args.fps,
        deterministic=not args.stochastic,
        seed=args.seed,
    )
    env.close()
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
