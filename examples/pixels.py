"""Diffusion-QL from camera images: a point-mass reach whose goal is visible only in the picture.

Builds a Minari dataset of PixelReach (``dql_agent/PixelReach-v0``: a 48x48 RGB camera, plus the
agent's position with ``--observation image+state``) from a scripted controller, half clean and
half noisy, trains Diffusion-QL on it (a CNN per image key feeds the diffusion actor and the
critics), compares the policy with random actions and the two halves of the data, saves it, loads
it back and records a video. Headless, no downloads::

    python examples/pixels.py --steps 3000 --out runs/pixels
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--observation", default="image+state", choices=["image", "image+state"])
    parser.add_argument("--episodes", type=int, default=200, help="dataset episodes (half clean, half noisy)")
    parser.add_argument("--steps", type=int, default=3000, help="gradient steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cnn-channels", type=int, default=16)
    parser.add_argument("--encoder-loss", default="critic", choices=["critic", "actor"], help="what trains the CNN")
    parser.add_argument("--eval-episodes", type=int, default=30)
    parser.add_argument("--data-dir", type=Path, default=None, help="MINARI_DATASETS_PATH (default: minari's)")
    parser.add_argument("--out", type=Path, default=Path("runs/pixels"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def mean_return(model: object, observation: str, n_episodes: int) -> float:
    """Mean return of ``model.predict`` (deterministic) on evaluation seeds 10000, 10001, ..."""
    from dql_agent.pixel_reach import PixelReachEnv

    env, total = PixelReachEnv(observation=observation), 0.0
    for i in range(n_episodes):
        obs, _ = env.reset(seed=10_000 + i)
        done = False
        while not done:
            action, _ = model.predict(obs, deterministic=True)  # type: ignore[attr-defined]
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
    return total / n_episodes


def main(argv: list[str] | None = None) -> dict:
    """Returns the results written to ``<out>/results.json``."""
    args = parse_args(argv)
    import os

    if args.data_dir is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(args.data_dir.resolve())

    from dql_agent import DiffusionQL, OfflineBuffer
    from dql_agent.integrations.video import record_video
    from dql_agent.pixel_reach import (
        IMAGE_ENV_ID,
        STATE_ENV_ID,
        PixelReachEnv,
        pixel_reach_returns,
        write_pixel_reach_dataset,
    )

    dataset_id = f"pixel_reach/{args.observation.replace('+', '-')}-{args.episodes}-v0"
    dataset = write_pixel_reach_dataset(
        dataset_id, args.episodes, observation=args.observation, seed=args.seed, overwrite=True
    )
    buffer = OfflineBuffer.from_minari(dataset)  # camera frames stay uint8
    model = DiffusionQL(
        buffer,
        env=IMAGE_ENV_ID if args.observation == "image" else STATE_ENV_ID,
        device=args.device,
        seed=args.seed,
        batch_size=args.batch_size,
        cnn_channels=args.cnn_channels,
        encoder_loss=args.encoder_loss,
    )
    model.learn(args.steps, log_interval=max(args.steps // 5, 1))

    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "model")
    loaded = DiffusionQL.load(args.out / "model")
    results = {
        "dataset": pixel_reach_returns(dataset),
        "steps": args.steps,
        "eval_episodes": args.eval_episodes,
        "policy_return": mean_return(model, args.observation, args.eval_episodes),
        "reloaded_return": mean_return(loaded, args.observation, args.eval_episodes),
    }
    video_env = PixelReachEnv(observation=args.observation, render_mode="rgb_array")
    results["video"] = str(record_video(loaded, video_env, args.out / "pixels.mp4", n_episodes=2, seed=args.seed))
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    data = results["dataset"]
    print(
        f"return after {args.steps} steps: {results['policy_return']:.1f} (random {data['random_return']:.1f}, "
        f"noisy half {data['noisy_return']:.1f}, clean half {data['clean_return']:.1f}, "
        f"expert {data['expert_return']:.1f})"
    )
    return results


if __name__ == "__main__":
    main()
