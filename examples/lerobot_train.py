"""Diffusion-QL on a LeRobot dataset (cameras + state): load, train, save, load back, export to ONNX.

The dataset is a local LeRobotDataset folder (v3.0 or v2.1) or a Hub dataset id; by default the tiny
fixture this repo's tests use (two cameras of 24x32 and 36x64 pixels, a 6-D state, 5 episodes,
written by lerobot 0.6.1's own writer). That dataset has no reward column, so ``--reward`` says how to
reward its steps (see :mod:`dql_agent.readers.lerobot`). There is no environment to evaluate in: the
script checks that the loaded model and the exported ONNX graph act like the trained one. Needs
``pip install dql_agent[lerobot,deploy]``::

    python examples/lerobot_train.py --steps 2000 --out runs/lerobot
    python examples/lerobot_train.py --dataset lerobot/pusht --reward dataset --image-size 48 64 --out runs/pusht
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "lerobot" / "v3_cameras"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=str(FIXTURE), help="a LeRobot dataset folder or a Hub dataset id")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub dataset")
    parser.add_argument("--episodes", type=int, nargs="*", default=None, help="episode indices (default all)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="resize frames")
    parser.add_argument(
        "--reward",
        default="success-all",
        choices=["dataset", "success-all", "success-column", "step-cost"],
        help="dataset: next.reward/next.done; success-all: 1 at the end of every episode (demonstrations); "
        "success-column: 1 at the end of episodes whose next.success is set; step-cost: -1 per step",
    )
    parser.add_argument("--steps", type=int, default=2000, help="gradient steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--diffusion-steps", type=int, default=5)
    parser.add_argument("--cnn-channels", type=int, default=16)
    parser.add_argument("--image-features", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/lerobot"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def reward_choice(name: str) -> Any:
    from dql_agent.readers.lerobot import StepCost, SuccessAtEnd

    return {
        "dataset": None,
        "success-all": SuccessAtEnd(successes="all"),
        "success-column": SuccessAtEnd(successes="next.success"),
        "step-cost": StepCost(cost=1.0, successes="all"),
    }[name]


def first_observations(buffer: Any, n: int) -> dict[str, Any]:
    """The buffer's first ``n`` observations, nested as ``predict`` takes them ({"images": {...}, ...})."""
    out: dict[str, Any] = {}
    for key, value in buffer.observations.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value[:n].cpu().numpy()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from dql_agent import DiffusionQL, OfflineBuffer

    buffer = OfflineBuffer.from_lerobot(
        args.dataset,
        revision=args.revision,
        episodes=args.episodes,
        image_size=tuple(args.image_size) if args.image_size else None,
        reward=reward_choice(args.reward),
    )
    print(buffer)
    print(f"observations: {buffer.observation_space}")
    print(f"reward: {buffer.metadata['reward']}")
    model = DiffusionQL(
        buffer,
        device=args.device,
        seed=args.seed,
        hidden_dim=args.hidden_dim,
        diffusion_steps=args.diffusion_steps,
        batch_size=args.batch_size,
        cnn_channels=args.cnn_channels,
        image_features=args.image_features,
    )
    model.learn(args.steps, log_interval=max(1, args.steps // 5))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "model")
    loaded = DiffusionQL.load(args.out / "model", device="cpu")
    observations = first_observations(buffer, 4)
    actions, _ = loaded.predict(observations, deterministic=True)
    same = bool(np.array_equal(actions, model.predict(observations, deterministic=True)[0]))
    summary: dict[str, Any] = {
        "dataset": buffer.metadata["dataset_id"],
        "revision": buffer.metadata["dataset_revision"],
        "transitions": len(buffer),
        "reward": buffer.metadata["reward"],
        "steps": args.steps,
        "loaded_acts_the_same": same,
        "actions": actions.tolist(),
    }
    onnx_path = loaded.export(args.out / "policy.onnx")
    summary["onnx"] = str(onnx_path)
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime is not installed (pip install dql_agent[deploy]): the ONNX file is not run")
    else:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        feeds = {name: buffer.observations[name][:4].cpu().numpy() for name in (i.name for i in session.get_inputs())}
        (exported,) = session.run(["action"], feeds)
        summary["onnx_max_difference"] = float(np.abs(exported - actions).max())
        print(f"ONNX inputs {list(feeds)}; largest difference from predict: {summary['onnx_max_difference']:.2e}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"saved the model to {args.out / 'model'} and the policy to {onnx_path}")
    return summary


if __name__ == "__main__":
    main()
