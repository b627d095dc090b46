"""Train Diffusion-QL on the Pendulum demo dataset, then push it to the Hugging Face Hub.

The pushed repo holds the weights (model.safetensors), config.json, a model card (README.md),
an evaluation (results.json) and a rollout video (replay.mp4)::

    python examples/train_and_push.py --repo-id me/dql-pendulum            # needs `hf auth login`
    python examples/train_and_push.py --local-dir dql-pendulum-hub         # no Hub: a folder

The demo dataset (dql_agent.demo_data: a swing-up controller with and without noise) is written as
a local Minari dataset under --data-dir; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ENV_ID = "Pendulum-v1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", help="Hub model repo to push to, e.g. me/dql-pendulum")
    target.add_argument("--local-dir", type=Path, help="write the hub-ready folder here instead")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("minari_datasets"),
        help="where the demo Minari dataset is written (MINARI_DATASETS_PATH)",
    )
    parser.add_argument(
        "--episodes", type=int, default=25, help="episodes of each half (good / noisy) of the demo dataset"
    )
    parser.add_argument(
        "--reference-episodes", type=int, default=20, help="episodes measuring the dataset's reference scores"
    )
    parser.add_argument("--steps", type=int, default=5000, help="gradient steps")
    parser.add_argument("--hidden-dim", type=int, default=256, help="width of the MLPs")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n-eval-episodes", type=int, default=10)
    parser.add_argument("--video-length", type=int, default=400, help="frames of replay.mp4")
    parser.add_argument("--no-video", action="store_true", help="skip replay.mp4")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Returns the commit URL (or the local folder written)."""
    args = parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(args.data_dir.resolve())  # read by Minari per call

    import gymnasium as gym

    from dql_agent import DiffusionQL, OfflineBuffer
    from dql_agent.demo_data import build_pendulum_dataset
    from dql_agent.integrations.hub import write_hub_folder

    info = build_pendulum_dataset(
        n_good=args.episodes, n_noisy=args.episodes, seed=args.seed, n_reference_episodes=args.reference_episodes
    )
    print(
        f"dataset {info.dataset.spec.dataset_id}: {info.dataset.total_steps} transitions, "
        f"good half {info.good_return:.1f}, noisy half {info.noisy_return:.1f}"
    )
    buffer = OfflineBuffer.from_minari(info.dataset)
    model = DiffusionQL(
        buffer=buffer,
        env=ENV_ID,
        device=args.device,
        seed=args.seed,
        hidden_dim=args.hidden_dim,
        batch_size=args.batch_size,
    )
    model.learn(total_timesteps=args.steps)

    eval_env = gym.make(ENV_ID, render_mode="rgb_array")
    options = {
        "eval_env": eval_env,
        "n_eval_episodes": args.n_eval_episodes,
        "video": not args.no_video,
        "video_length": args.video_length,
    }
    if args.local_dir is not None:
        where = str(write_hub_folder(model, args.local_dir, **options))
        print(f"hub-ready folder written to {where}")
    else:
        where = model.push_to_hub(args.repo_id, private=args.private or None, **options)
        print(f"pushed: {where}")
    eval_env.close()
    return where


if __name__ == "__main__":
    main()
