"""Writes the LeRobot test fixtures under ``tests/data/lerobot/`` with the real ``lerobot`` writer, and
dumps what lerobot's own loader returns for them (``<name>.npz`` beside each dataset folder).

``lerobot`` needs Python >= 3.12 and torch < 2.12, so this script runs in a venv of its own, never in
dql_agent's::

    /root/.pyenv/versions/3.12.1/bin/python -m venv /work/lerobot-venv
    /work/lerobot-venv/bin/pip install "lerobot[dataset]==0.6.1"
    /work/lerobot-venv/bin/python -m benchmarks.lerobot_fixtures --out tests/data/lerobot
    /work/lerobot-venv/bin/python -m benchmarks.lerobot_fixtures --bench /tmp/lerobot_bench  # not committed

It writes three datasets (and, with ``--bench``, only a larger one for the decode benchmark):

- ``v3_cameras``: v3.0 from ``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` /
  ``finalize`` with lerobot's default video encoder (AV1, libsvtav1): two cameras of different
  sizes (``observation.images.top`` 24x32, ``observation.images.wrist`` 36x64), a 6-D
  ``observation.state``, a 4-D ``action``, 5 episodes of 6 to 13 frames and 2 tasks, with file-size
  limits small enough that the data and video files hold 1 to 3 episodes each (the script checks
  that episodes are spread over several files and that some file holds several episodes).
- ``v3_reward``: v3.0 with ``next.reward``, ``next.done`` and ``next.success`` columns, one 24x40
  camera encoded as H.264, 3 episodes of which the middle one ends without ``done`` (a truncation).
- ``v21_cameras``: the v2.1 layout of ``v3_cameras``. lerobot 0.6.1 writes only v3.0, so this
  script lays v2.1 out itself: one Parquet file per episode (the v3 table's rows, same columns),
  one MP4 per episode and camera cut from the v3 files by stream copy (no re-encoding: the frames
  are the same coded frames), and ``meta/info.json``, ``episodes.jsonl``, ``tasks.jsonl`` and
  ``episodes_stats.jsonl`` as v2.1 wrote them. Its dump comes from lerobot itself: a copy is
  converted with lerobot's own ``convert_dataset_v21_to_v30`` (which reads the v2.1 files) and
  loaded with ``LeRobotDataset``.

Each dump (``np.savez_compressed``, no pickled objects) holds, per frame as lerobot's
``dataset[i]`` returns it with ``video_backend="pyav"`` (torchcodec does not load here): each camera
as uint8 HWC (``frames/<key>``, lerobot's float [0, 1] times 255, exact), ``observation.state``,
``action``, ``timestamp``, ``frame_index``, ``episode_index``, ``index``, ``task_index`` and the
``next.*`` columns; and per episode ``episode_from`` / ``episode_to`` (row range) from
``meta.episodes``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import av  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

FPS = 10
TASKS = ("pick the cube", "push the cube left")
CAMERAS = {"observation.images.top": (24, 32), "observation.images.wrist": (36, 64)}
STATE_DIM, ACTION_DIM = 6, 4
LENGTHS = (8, 13, 6, 11, 9)


def camera_frame(key: str, height: int, width: int, episode: int, frame: int, global_index: int) -> np.ndarray:
    """A frame whose colours change by >= 20 levels from one frame to the next (so a frame off by
    one is plain to see), with a bright square that moves along the episode."""
    image = np.empty((height, width, 3), np.uint8)
    shift = 0 if key.endswith("top") else 97
    image[..., 0] = 20 + (29 * global_index + shift) % 200
    image[..., 1] = 20 + (53 * episode + 11 * frame + shift) % 200
    image[..., 2] = np.linspace(40, 200, width, dtype=np.uint8)[None, :]
    size = max(4, height // 4)
    top = (3 * frame) % (height - size)
    left = (5 * frame) % (width - size)
    image[top : top + size, left : left + size] = 250
    return image


def write_v3_cameras(root: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features: dict[str, Any] = {
        "observation.state": {"dtype": "float32", "shape": (STATE_DIM,), "names": [f"joint_{i}" for i in range(6)]},
        "action": {"dtype": "float32", "shape": (ACTION_DIM,), "names": [f"motor_{i}" for i in range(4)]},
    }
    for key, (height, width) in CAMERAS.items():
        features[key] = {"dtype": "video", "shape": (height, width, 3), "names": ["height", "width", "channels"]}
    dataset = LeRobotDataset.create(
        "dql-agent-tests/v3_cameras",
        FPS,
        features,
        root=root,
        robot_type="test_arm",
        use_videos=True,
        # Small limits, so that episodes are spread over several data and video files (checked below).
        data_files_size_in_mb=0.004,
        video_files_size_in_mb=0.0055,
        metadata_buffer_size=2,
    )
    rng = np.random.default_rng(0)
    global_index = 0
    for episode, length in enumerate(LENGTHS):
        state = rng.uniform(-1, 1, STATE_DIM).astype(np.float32)
        for frame in range(length):
            action = rng.uniform(-0.8, 0.8, ACTION_DIM).astype(np.float32)
            action[3] = 3.0 * action[3]  # a gripper-like dimension with a wider range
            values: dict[str, Any] = {"observation.state": state.copy(), "action": action, "task": TASKS[episode % 2]}
            for key, (height, width) in CAMERAS.items():
                values[key] = camera_frame(key, height, width, episode, frame, global_index)
            dataset.add_frame(values)
            state = (state + 0.1 * np.resize(action, STATE_DIM)).astype(np.float32)
            global_index += 1
        dataset.save_episode()
    dataset.finalize()


def write_v3_reward(root: Path) -> None:
    from lerobot.configs.video import RGBEncoderConfig
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    features: dict[str, Any] = {
        "observation.state": {"dtype": "float32", "shape": (3,), "names": ["x", "y", "z"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["vx", "vy"]},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.done": {"dtype": "bool", "shape": (1,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
        "observation.images.front": {"dtype": "video", "shape": (24, 40, 3), "names": ["height", "width", "channels"]},
    }
    dataset = LeRobotDataset.create(
        "dql-agent-tests/v3_reward",
        FPS,
        features,
        root=root,
        use_videos=True,
        rgb_encoder=RGBEncoderConfig(vcodec="h264", g=4, crf=23),
    )
    rng = np.random.default_rng(1)
    global_index = 0
    for episode, (length, ends_done) in enumerate(((7, True), (9, False), (5, True))):
        for frame in range(length):
            last = frame == length - 1
            dataset.add_frame(
                {
                    "observation.state": rng.uniform(-1, 1, 3).astype(np.float32),
                    "action": rng.uniform(-1, 1, 2).astype(np.float32),
                    "next.reward": np.array([1.0 if (last and ends_done) else -0.1], np.float32),
                    "next.done": np.array([last and ends_done]),
                    "next.success": np.array([last and ends_done]),
                    "observation.images.front": camera_frame("front", 24, 40, episode, frame, global_index),
                    "task": TASKS[0],
                }
            )
            global_index += 1
        dataset.save_episode()
    dataset.finalize()


# v2.1 ------------------------------------------------------------------------------------------
def _cut_video(source: Path, target: Path, start: float, end: float) -> int:
    """Copy the packets of ``source`` with pts in [start, end) seconds to ``target``, times shifted
    to start at 0 (stream copy: the coded frames are unchanged). Returns the packets copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    copied = 0
    with av.open(str(source)) as inp, av.open(str(target), "w", format="mp4") as out:
        stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(template=stream, opaque=True)  # as lerobot's concatenation
        out_stream.time_base = stream.time_base
        base = stream.time_base
        first = None
        for packet in inp.demux(stream):
            if packet.pts is None:
                continue
            t = float(packet.pts * base)
            if t < start - 1e-6 or t >= end - 1e-6:
                continue
            if first is None:
                first = packet.pts
                if not packet.is_keyframe:
                    raise RuntimeError(f"{source}: the episode at {start}s does not start on a keyframe")
            packet.pts -= first
            if packet.dts is not None:
                packet.dts -= first
            packet.stream = out_stream
            out.mux(packet)
            copied += 1
    return copied


def write_v21_from_v3(v3_root: Path, root: Path) -> None:
    """The v2.1 layout of the v3.0 dataset at ``v3_root`` (see the module docstring)."""
    info = json.loads((v3_root / "meta" / "info.json").read_text())
    episodes = pq.read_table(sorted((v3_root / "meta" / "episodes").glob("*/*.parquet"))[0]).to_pylist()
    for extra in sorted((v3_root / "meta" / "episodes").glob("*/*.parquet"))[1:]:
        episodes += pq.read_table(extra).to_pylist()
    episodes.sort(key=lambda e: e["episode_index"])
    tasks = pq.read_table(v3_root / "meta" / "tasks.parquet").to_pylist()
    data = pa.concat_tables([pq.read_table(p) for p in sorted((v3_root / "data").glob("*/*.parquet"))])
    video_keys = [k for k, f in info["features"].items() if f["dtype"] == "video"]
    chunks_size = 1000
    (root / "meta").mkdir(parents=True, exist_ok=True)
    stats_lines, episode_lines = [], []
    for episode in episodes:
        e = int(episode["episode_index"])
        rows = data.filter(pa.compute.equal(data.column("episode_index"), e))
        assert rows.num_rows == episode["length"] and np.all(np.diff(rows.column("index").to_numpy()) == 1)
        path = root / f"data/chunk-{e // chunks_size:03d}/episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, path)
        for key in video_keys:
            source = v3_root / info["video_path"].format(
                video_key=key,
                chunk_index=episode[f"videos/{key}/chunk_index"],
                file_index=episode[f"videos/{key}/file_index"],
            )
            start, end = episode[f"videos/{key}/from_timestamp"], episode[f"videos/{key}/to_timestamp"]
            target = root / f"videos/chunk-{e // chunks_size:03d}/{key}/episode_{e:06d}.mp4"
            copied = _cut_video(source, target, start, end)
            assert copied == episode["length"], (key, e, copied, episode["length"])
        episode_lines.append({"episode_index": e, "tasks": list(episode["tasks"]), "length": int(episode["length"])})
        stats: dict[str, Any] = {}
        for name in info["features"]:
            prefix = f"stats/{name}/"
            # v2.1 wrote min, max, mean, std and count per feature (v3.0 added quantiles)
            values = {k[len(prefix) :]: v for k, v in episode.items() if k.startswith(prefix)}
            values = {k: v for k, v in values.items() if k in ("min", "max", "mean", "std", "count")}
            if values:
                stats[name] = values
        stats_lines.append({"episode_index": e, "stats": stats})
    features = {}
    for name, feature in info["features"].items():
        feature = dict(feature)
        feature.pop("fps", None)  # v3.0 added a per-feature fps
        features[name] = feature
    n_episodes = len(episodes)
    info21 = {
        "codebase_version": "v2.1",
        "robot_type": info.get("robot_type"),
        "total_episodes": n_episodes,
        "total_frames": int(data.num_rows),
        "total_tasks": len(tasks),
        "total_videos": n_episodes * len(video_keys),
        "total_chunks": (n_episodes - 1) // chunks_size + 1,
        "chunks_size": chunks_size,
        "fps": info["fps"],
        "splits": {"train": f"0:{n_episodes}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": features,
    }
    (root / "meta" / "info.json").write_text(json.dumps(info21, indent=4))
    write_jsonl(root / "meta" / "episodes.jsonl", episode_lines)
    write_jsonl(root / "meta" / "tasks.jsonl", [{"task_index": t["task_index"], "task": t["task"]} for t in tasks])
    write_jsonl(root / "meta" / "episodes_stats.jsonl", stats_lines)


def write_jsonl(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line, default=_plain) + "\n" for line in lines))


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# the loader's dump -------------------------------------------------------------------------------
def dump_lerobot(repo_id: str, root: Path, out: Path) -> dict[str, Any]:
    """What ``LeRobotDataset`` returns for every frame, as plain arrays in ``out`` (.npz)."""
    import lerobot
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset(repo_id, root=root, video_backend="pyav")
    columns: dict[str, list[Any]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        for key, value in item.items():
            if key == "task":
                continue
            array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
            if key in dataset.meta.video_keys:
                scaled = array.transpose(1, 2, 0) * 255.0
                assert np.abs(scaled - np.round(scaled)).max() < 1e-3, "lerobot frames are uint8 / 255"
                columns.setdefault(f"frames/{key}", []).append(np.round(scaled).astype(np.uint8))
            else:
                columns.setdefault(key, []).append(array)
    arrays = {key: np.stack(values) for key, values in columns.items()}
    episodes = dataset.meta.episodes
    arrays["episode_from"] = np.asarray(episodes["dataset_from_index"], np.int64)
    arrays["episode_to"] = np.asarray(episodes["dataset_to_index"], np.int64)
    arrays["lerobot_version"] = np.array(lerobot.__version__)
    arrays["av_version"] = np.array(av.__version__)
    np.savez_compressed(out, **arrays)
    return {key: value.shape for key, value in arrays.items()}


def check_spread(root: Path) -> None:
    """The v3 fixture's episodes lie in several data and video files, some holding several episodes."""
    episodes = pa.concat_tables(
        [pq.read_table(p) for p in sorted((root / "meta" / "episodes").glob("*/*.parquet"))]
    ).to_pylist()
    for prefix in ["data", *[f"videos/{k}" for k in CAMERAS]]:
        files = [(e[f"{prefix}/chunk_index"], e[f"{prefix}/file_index"]) for e in episodes]
        per_file = {f: files.count(f) for f in files}
        print(f"{root.name} {prefix}: episodes per file {list(per_file.values())}")
        if len(per_file) < 2 or max(per_file.values()) < 2:
            raise RuntimeError(f"{prefix}: want several files and a file with several episodes, got {per_file}")


def write_bench(root: Path, episodes: int = 6, length: int = 150) -> None:
    """A larger dataset for benchmarks/lerobot_decode_speed.py (not committed): 30 fps, lerobot's
    default encoder (AV1, keyframe every 2 frames), cameras of 240x320 and 96x128, a 6-D state."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    cameras = {"observation.images.front": (240, 320), "observation.images.wrist": (96, 128)}
    features: dict[str, Any] = {
        "observation.state": {"dtype": "float32", "shape": (STATE_DIM,), "names": None},
        "action": {"dtype": "float32", "shape": (ACTION_DIM,), "names": None},
    }
    for key, (height, width) in cameras.items():
        features[key] = {"dtype": "video", "shape": (height, width, 3), "names": ["height", "width", "channels"]}
    dataset = LeRobotDataset.create("dql-agent-bench/v3_bench", 30, features, root=root, use_videos=True)
    rng = np.random.default_rng(2)
    noise = {k: rng.integers(0, 40, (h, w, 3), dtype=np.uint8) for k, (h, w) in cameras.items()}
    global_index = 0
    for episode in range(episodes):
        for frame in range(length):
            values: dict[str, Any] = {
                "observation.state": rng.uniform(-1, 1, STATE_DIM).astype(np.float32),
                "action": rng.uniform(-1, 1, ACTION_DIM).astype(np.float32),
                "task": TASKS[0],
            }
            for key, (height, width) in cameras.items():
                # a moving scene with texture, so that the codec has real work
                image = camera_frame(key, height, width, episode, frame, global_index)
                values[key] = np.roll(image, frame, axis=1) + noise[key]
            dataset.add_frame(values)
            global_index += 1
        dataset.save_episode()
    dataset.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data/lerobot"))
    parser.add_argument(
        "--bench", type=Path, default=None, help="write only the benchmark dataset (6 x 150 frames) to this folder"
    )
    args = parser.parse_args()
    if args.bench is not None:
        shutil.rmtree(args.bench, ignore_errors=True)
        write_bench(args.bench)
        return
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("v3_cameras", "v3_reward", "v21_cameras"):
        shutil.rmtree(out / name, ignore_errors=True)
    write_v3_cameras(out / "v3_cameras")
    check_spread(out / "v3_cameras")
    write_v3_reward(out / "v3_reward")
    write_v21_from_v3(out / "v3_cameras", out / "v21_cameras")
    for name in ("v3_cameras", "v3_reward"):
        print(name, dump_lerobot(f"dql-agent-tests/{name}", out / name, out / f"{name}.npz"))
    # v2.1: lerobot converts a copy with its own converter, then its loader reads the result.
    from lerobot.scripts.convert_dataset_v21_to_v30 import convert_dataset

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "v21_cameras"
        shutil.copytree(out / "v21_cameras", copy)
        convert_dataset("dql-agent-tests/v21_cameras", root=copy, push_to_hub=False)
        print("v21_cameras", dump_lerobot("dql-agent-tests/v21_cameras", copy, out / "v21_cameras.npz"))
    for stray in out.rglob(".cache"):  # huggingface_hub's local-dir metadata, if any
        shutil.rmtree(stray)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1024:.0f} KiB under {out}")


if __name__ == "__main__":
    main()
