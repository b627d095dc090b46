"""LeRobot reader throughput: camera frames per second that ``OfflineBuffer.from_lerobot`` turns into an OfflineBuffer.

For each camera of a LeRobot dataset, times ``OfflineBuffer.from_lerobot(keys=[camera], decode_threads=1)`` end to end
(tables, checks, decoding with PyAV at the table's timestamps, RGB conversion, the buffer) and, as a
floor, a bare PyAV loop over the same files (demux, decode, ``to_ndarray("rgb24")``), one FFmpeg
thread each; the median of ``--repeats`` runs. Frames/s counts the frames decoded (each table row of
each camera once).

The default dataset is the larger benchmark dataset that ``python -m benchmarks.lerobot_fixtures --bench``
writes with lerobot's own writer (6 episodes x 150 frames at 30 fps, AV1 as lerobot encodes by
default, cameras of 240x320 and 96x128); ``--dataset tests/data/lerobot/v3_cameras`` times the tiny
committed fixture. Example (one thread, as the numbers in docs/BENCHMARKS.md were taken)::

    /work/lerobot-venv/bin/python -m benchmarks.lerobot_fixtures --bench /tmp/lerobot_bench
    OMP_NUM_THREADS=1 python -m benchmarks.lerobot_decode_speed --dataset /tmp/lerobot_bench --out /tmp/lerobot.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, write_results
from dql_agent import OfflineBuffer  # noqa: E402
from dql_agent.readers.lerobot import SuccessAtEnd  # noqa: E402


def bare_pyav(paths: Sequence[Path]) -> tuple[int, float]:
    """Frames and seconds to decode every frame of ``paths`` to RGB24 arrays, one FFmpeg thread."""
    import av

    frames, start = 0, time.perf_counter()
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            for frame in container.decode(stream):
                frame.to_ndarray(format="rgb24")
                frames += 1
    return frames, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", type=Path, default=Path("/tmp/lerobot_bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = json.loads((args.dataset / "meta" / "info.json").read_text())
    cameras = [k for k, f in info["features"].items() if f["dtype"] == "video"]
    results: dict[str, Any] = {"dataset": str(args.dataset), "machine": machine(torch.device("cpu"), 1), "cameras": {}}
    for camera in cameras:
        height, width = info["features"][camera]["shape"][:2]
        paths = sorted((args.dataset / "videos" / camera).glob("*/*.mp4"))
        reader, bare, frames = [], [], 0
        for _ in range(args.repeats):  # interleaved, so that both see the same load
            start = time.perf_counter()
            buffer = OfflineBuffer.from_lerobot(
                args.dataset, keys=[camera], reward=SuccessAtEnd(successes="all"), decode_threads=1, verbose=False
            )
            reader.append(time.perf_counter() - start)
            frames = len(buffer)  # every frame is a row (every episode ends terminal)
            del buffer
            bare.append(bare_pyav(paths))
        row = {
            "size": [height, width],
            "codec": info["features"][camera].get("info", {}).get("video.codec"),
            "frames": frames,
            "reader_seconds": statistics.median(reader),
            "reader_frames_per_s": frames / statistics.median(reader),
            "bare_pyav_frames_per_s": bare[0][0] / statistics.median(t for _, t in bare),
        }
        results["cameras"][camera] = row
        print(
            f"{camera} {height}x{width} ({row['codec']}): from_lerobot {row['reader_frames_per_s']:,.0f} frames/s "
            f"({frames} frames in {row['reader_seconds']:.2f} s), bare PyAV decode "
            f"{row['bare_pyav_frames_per_s']:,.0f} frames/s (one thread)"
        )
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores_visible']} cores visible")
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main()
