"""LeRobot datasets into OfflineBuffer (dql_agent.readers.lerobot), on fixtures written by lerobot 0.6.1's
own writer (benchmarks/lerobot_fixtures.py) and compared with what lerobot's own loader returned for them
(tests/data/lerobot/<name>.npz): frames, states, actions and episode boundaries.

Decoder tolerance: frames may differ from lerobot's by at most DECODER_TOLERANCE uint8 levels per
pixel. Both decode with FFmpeg through PyAV (lerobot's fallback when torchcodec does not load) and
convert YUV to RGB24 the same way; measured here (PyAV 18.1 against lerobot's PyAV 15.1) they are
equal, so the bound only leaves room for another FFmpeg build's YUV->RGB rounding. States and
actions are exact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.hub_server import aim_client, hub_offline_fixture, hub_server_fixture, unreachable_endpoint  # noqa: F401

pytest.importorskip("av", reason="needs the lerobot extra: pip install dql_agent[lerobot]")
pytest.importorskip("pyarrow", reason="needs the lerobot extra: pip install dql_agent[lerobot]")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from dql_agent import OfflineBuffer  # noqa: E402
from dql_agent.readers.lerobot import StepCost, SuccessAtEnd  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "lerobot"
DECODER_TOLERANCE = 2  # uint8 levels; measured 0 (see the module docstring)
V3, V21, REWARD = DATA / "v3_cameras", DATA / "v21_cameras", DATA / "v3_reward"
CAMERAS = {"top": "observation.images.top", "wrist": "observation.images.wrist"}
ALL = SuccessAtEnd(successes="all")  # every episode ends terminal: every frame is a row, in order


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dump(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{name}.npz", allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def broken_copy(tmp_path: Path, source: Path = V3) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def episode_of(ref: dict[str, np.ndarray]) -> list[range]:
    return [range(a, b) for a, b in zip(ref["episode_from"], ref["episode_to"], strict=True)]


def assert_frames(found: torch.Tensor, expected: np.ndarray) -> None:
    found_array = found.numpy()
    assert found_array.shape == expected.shape and found_array.dtype == np.uint8
    assert np.abs(found_array.astype(int) - expected).max() <= DECODER_TOLERANCE


# --- equal to lerobot's loader --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["v3_cameras", "v21_cameras"])
def test_frames_states_actions_and_boundaries_equal_lerobots(name):
    ref = dump(name)
    buffer = OfflineBuffer.from_lerobot(DATA / name, reward=ALL, verbose=False)
    assert len(buffer) == len(ref["index"]) == 47
    for key, feature in CAMERAS.items():
        assert_frames(buffer.observations[f"images.{key}"], ref[f"frames/{feature}"])
    np.testing.assert_array_equal(buffer.observations["state"].numpy(), ref["observation.state"])
    np.testing.assert_array_equal(buffer.actions.numpy(), ref["action"])
    # episode boundaries: each episode's last row is its (terminal) end
    ends = np.flatnonzero(buffer.terminals.numpy())
    np.testing.assert_array_equal(ends, ref["episode_to"] - 1)
    assert not buffer.timeouts.any()
    # next observations: the following frame inside the episode, the frame itself at a terminal end
    for episode in episode_of(ref):
        rows = np.array(episode)
        following = np.minimum(rows + 1, rows[-1])
        for key, feature in CAMERAS.items():
            assert_frames(buffer.next_observations[f"images.{key}"][rows], ref[f"frames/{feature}"][following])
        np.testing.assert_array_equal(
            buffer.next_observations["state"][rows].numpy(), ref["observation.state"][following]
        )
    # the frames are the ones written, not neighbours: red steps >= 20 levels from frame to frame
    red = buffer.observations["images.top"].numpy()[:, :, :, 0].astype(float)
    written = 20 + (29 * np.arange(47)) % 200
    assert np.abs(np.median(red, axis=(1, 2)) - written).max() < 10


@pytest.mark.parametrize("name", ["v3_cameras", "v3_reward"])
def test_seeking_is_frame_accurate(name, monkeypatch):
    """With SEEK_GAP_S = 0 the reader seeks (to the keyframe before, then decodes on) for every frame,
    in AV1 (keyframe every 2 frames) and H.264 (every 4) files with episodes back to back."""
    from dql_agent.readers import lerobot

    ref = dump(name)
    camera = "observation.images.top" if name == "v3_cameras" else "observation.images.front"
    monkeypatch.setattr(lerobot, "SEEK_GAP_S", 0.0)
    reward = ALL if name == "v3_cameras" else SuccessAtEnd()
    episodes = [0, 2, 4] if name == "v3_cameras" else [2, 0]
    buffer = OfflineBuffer.from_lerobot(DATA / name, keys=[camera], episodes=episodes, reward=reward, verbose=False)
    rows = np.concatenate([np.array(episode_of(ref)[e]) for e in sorted(episodes)])
    assert_frames(buffer.observations[camera[len("observation.") :]], ref[f"frames/{camera}"][rows])


def test_observation_space_nests_lerobots_names():
    buffer = OfflineBuffer.from_lerobot(V3, reward=ALL, verbose=False)
    space = buffer.observation_space
    assert list(space.spaces) == ["images", "state"]
    assert space["images"]["top"].shape == (24, 32, 3) and space["images"]["wrist"].shape == (36, 64, 3)
    assert space["images"]["top"].dtype == np.uint8 and space["state"].shape == (6,)
    assert sorted(buffer.observations) == ["images.top", "images.wrist", "state"]
    assert buffer.metadata["observation_keys"] == {
        "state": "observation.state",
        "images.top": "observation.images.top",
        "images.wrist": "observation.images.wrist",
    }
    assert buffer.metadata["dataset_format"] == "LeRobotDataset v3.0" and buffer.metadata["fps"] == 10


def test_episode_ends_without_done_are_truncations():
    """The last frame has no successor: dropped, and the step before it ends the episode as a timeout."""
    ref = dump("v3_cameras")
    buffer = OfflineBuffer.from_lerobot(V3, reward=StepCost(cost=0.5, successes=None), verbose=False)
    assert len(buffer) == 47 - 5 and not buffer.terminals.any()
    kept = np.concatenate([np.array(e)[:-1] for e in episode_of(ref)])
    assert_frames(buffer.observations["images.wrist"], ref["frames/observation.images.wrist"][kept])
    assert_frames(buffer.next_observations["images.wrist"], ref["frames/observation.images.wrist"][kept + 1])
    ends = np.cumsum([len(e) - 1 for e in episode_of(ref)]) - 1
    np.testing.assert_array_equal(np.flatnonzero(buffer.timeouts.numpy()), ends)
    np.testing.assert_array_equal(buffer.rewards.numpy(), np.full(42, -0.5, np.float32))
    assert "truncations" in buffer.metadata["reward"] and "-0.5 per step" in buffer.metadata["reward"]


def test_next_reward_and_done_from_the_dataset_h264():
    ref = dump("v3_reward")
    buffer = OfflineBuffer.from_lerobot(REWARD, verbose=False)
    # episodes of 7 (done), 9 (no done: truncated, its last frame dropped) and 5 (done) frames
    assert len(buffer) == 7 + 8 + 5
    kept = np.r_[0:7, 7:15, 16:21]
    np.testing.assert_array_equal(buffer.rewards.numpy(), ref["next.reward"][kept])
    np.testing.assert_array_equal(np.flatnonzero(buffer.terminals.numpy()), [6, 19])
    np.testing.assert_array_equal(np.flatnonzero(buffer.timeouts.numpy()), [14])
    assert_frames(buffer.observations["images.front"], ref["frames/observation.images.front"][kept])
    assert buffer.metadata["reward"] == "next.reward from the dataset; terminals from next.done"


# --- choices ------------------------------------------------------------------------------------
def test_keys_and_episodes_across_file_boundaries():
    """Episode 2 is the last of data file 0 and of the top camera's file 0, and the first of the wrist
    camera's file 1; episode 4 is the last of every file."""
    ref = dump("v3_cameras")
    buffer = OfflineBuffer.from_lerobot(
        V3, keys=["observation.images.wrist", "observation.state"], episodes=[4, 2], reward=ALL
    )
    assert sorted(buffer.observations) == ["images.wrist", "state"]
    rows = np.r_[21:27, 38:47]
    assert_frames(buffer.observations["images.wrist"], ref["frames/observation.images.wrist"][rows])
    np.testing.assert_array_equal(buffer.actions.numpy(), ref["action"][rows])
    assert buffer.metadata["episodes"] == "2,4"
    vectors = OfflineBuffer.from_lerobot(V21, keys=["observation.state"], episodes=[1], reward=ALL, verbose=False)
    assert not vectors.has_images and len(vectors) == 13


def test_image_size_resizes_at_load():
    ref = dump("v3_cameras")
    buffer = OfflineBuffer.from_lerobot(V3, image_size=(12, 16), reward=ALL, verbose=False)
    top = buffer.observations["images.top"].numpy()
    assert top.shape == (47, 12, 16, 3) and buffer.observation_space["images"]["top"].shape == (12, 16, 3)
    assert buffer.observations["images.wrist"].shape == (47, 12, 16, 3)
    # area averaging of the full frames, up to swscale resizing in YUV before converting
    blocks = ref["frames/observation.images.top"].reshape(47, 12, 2, 16, 2, 3).mean(axis=(2, 4))
    assert np.abs(top - blocks).mean() < 5
    assert buffer.metadata["image_size"] == {"observation.images.top": [12, 16], "observation.images.wrist": [12, 16]}
    one = OfflineBuffer.from_lerobot(V3, image_size={"observation.images.wrist": (18, 32)}, reward=ALL, verbose=False)
    assert one.observations["images.top"].shape[1:] == (24, 32, 3)
    assert one.observations["images.wrist"].shape[1:] == (18, 32, 3)
    assert one.metadata["image_size"] == {"observation.images.wrist": [18, 32]}


def test_memory_estimate_is_reported_before_decoding_and_within_10_percent(caplog):
    caplog.set_level("INFO", logger="dql_agent")
    buffer = OfflineBuffer.from_lerobot(V3, reward=ALL)
    printed = caplog.records[0].getMessage()  # the plan comes first, the buffer's own summary after
    estimate = int(re.search(r"the buffer will take ([\d,]+) bytes", printed).group(1).replace(",", ""))
    tensors = [buffer.actions, buffer.rewards, buffer.terminals, buffer.timeouts]
    tensors += [*buffer.observations.values(), *buffer.next_observations.values()]
    real = sum(t.numel() * t.element_size() for t in tensors)
    assert abs(estimate - real) <= 0.1 * real
    with pytest.raises(ValueError, match=rf"{estimate:,} bytes.*over memory_budget_bytes={estimate - 1:,}"):
        OfflineBuffer.from_lerobot(V3, reward=ALL, memory_budget_bytes=estimate - 1)
    assert len(OfflineBuffer.from_lerobot(V3, reward=ALL, memory_budget_bytes=estimate, verbose=False)) == 47


def test_reward_choices_are_recorded():
    ref = dump("v3_cameras")
    state_only = {"keys": ["observation.state"], "verbose": False}

    def speed(columns):
        return -np.abs(columns["action"]).sum(axis=1)

    fn = OfflineBuffer.from_lerobot(V3, reward=speed, **state_only)
    kept = np.concatenate([np.array(e)[:-1] for e in episode_of(ref)])
    np.testing.assert_allclose(fn.rewards.numpy(), -np.abs(ref["action"][kept]).sum(axis=1), rtol=1e-6)
    assert fn.metadata["reward"].startswith("per-step function ") and "speed" in fn.metadata["reward"]
    assert "truncations" in fn.metadata["reward"] and not fn.terminals.any()

    with_done = OfflineBuffer.from_lerobot(
        REWARD, reward=lambda columns: np.zeros(len(columns["action"])), **state_only
    )
    assert np.flatnonzero(with_done.terminals.numpy()).tolist() == [6, 19]  # next.done still gives the terminals
    assert with_done.metadata["reward"].endswith("<lambda>; terminals from next.done")

    success = OfflineBuffer.from_lerobot(V3, reward=SuccessAtEnd(successes=[1, 3], value=10.0), **state_only)
    ends = np.flatnonzero(success.terminals.numpy())
    assert success.rewards.numpy()[ends].tolist() == [10.0, 10.0] and success.rewards.sum() == 20.0
    assert len(success) == 47 - 3 and int(success.timeouts.sum()) == 3  # episodes 0, 2, 4 truncated
    assert "2 of 5 episodes succeed (1,3)" in success.metadata["reward"]

    column = OfflineBuffer.from_lerobot(REWARD, reward=SuccessAtEnd(), **state_only)  # next.success: episodes 0 and 2
    assert np.flatnonzero(column.terminals.numpy()).tolist() == [6, 19] and column.rewards.sum() == 2.0

    cost = OfflineBuffer.from_lerobot(V21, reward=StepCost(cost=1.0, successes="all"), **state_only)
    assert len(cost) == 47 and cost.rewards.eq(-1.0).all() and int(cost.terminals.sum()) == 5


@pytest.mark.bad_input("data", "clear error")
def test_a_dataset_without_rewards_needs_a_choice():
    with pytest.raises(ValueError, match=r"no next.reward column.*reward=<function.*SuccessAtEnd.*StepCost"):
        OfflineBuffer.from_lerobot(V3)
    with pytest.raises(ValueError, match=r"no next.success column.*successes='all'"):
        OfflineBuffer.from_lerobot(V3, reward=SuccessAtEnd())
    with pytest.raises(ValueError, match=r"one reward per step: shape \(8,\) for episode 0, got \(3,\)"):
        OfflineBuffer.from_lerobot(V3, keys=["observation.state"], reward=lambda columns: np.zeros(3))
    with pytest.raises(TypeError, match="reward must be None"):
        OfflineBuffer.from_lerobot(V3, reward="success")


def test_action_bounds_from_the_statistics_or_given():
    buffer = OfflineBuffer.from_lerobot(V3, keys=["observation.state"], reward=ALL, verbose=False)
    stats = json.loads((V3 / "meta" / "stats.json").read_text())["action"]
    np.testing.assert_array_equal(buffer.action_space.low, np.float32(stats["min"]))
    np.testing.assert_array_equal(buffer.action_space.high, np.float32(stats["max"]))
    assert buffer.metadata["action_bounds"] == "meta/stats.json"
    v21 = OfflineBuffer.from_lerobot(V21, keys=["observation.state"], reward=ALL, verbose=False)
    np.testing.assert_array_equal(v21.action_space.low, buffer.action_space.low)
    given = OfflineBuffer.from_lerobot(
        V3, keys=["observation.state"], reward=ALL, action_low=-3, action_high=3, verbose=False
    )
    assert given.action_space.low.tolist() == [-3.0] * 4 and given.metadata["action_bounds"] == "given"


@pytest.mark.bad_input("data", "clear error")
def test_actions_outside_the_given_bounds_are_refused():
    with pytest.raises(
        ValueError, match=r"outside the action bounds \(given\).*first: episode 0 frame \d+, dimension 3"
    ):
        OfflineBuffer.from_lerobot(V3, reward=ALL, action_low=-1.0, action_high=1.0)


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.bad_input("data", "clear error")
def test_missing_video_file(tmp_path):
    root = broken_copy(tmp_path)
    (root / "videos/observation.images.wrist/chunk-000/file-001.mp4").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"video of observation.images.wrist .*wrist/chunk-000/file-001.mp4 is missing"
    ):
        OfflineBuffer.from_lerobot(root, reward=ALL, verbose=False)
    # without that camera the rest loads
    assert len(OfflineBuffer.from_lerobot(root, keys=["observation.images.top"], reward=ALL, verbose=False)) == 47


@pytest.mark.bad_input("data", "clear error")
def test_truncated_mp4(tmp_path):
    root = broken_copy(tmp_path)
    path = root / "videos/observation.images.top/chunk-000/file-000.mp4"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=r"top/chunk-000/file-000.mp4.*(truncated|cannot be decoded)"):
        OfflineBuffer.from_lerobot(root, reward=ALL, verbose=False)


def rewrite_table(path: Path, **columns: np.ndarray) -> None:
    table = pq.read_table(path)
    for name, values in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(
            index, table.schema.field(index), pa.array(values, type=table.schema.field(index).type)
        )
    pq.write_table(table, path)


@pytest.mark.bad_input("data", "clear error")
def test_timestamps_that_match_no_frame(tmp_path):
    root = broken_copy(tmp_path)
    path = root / "data/chunk-000/file-001.parquet"
    timestamps = pq.read_table(path).column("timestamp").to_numpy().copy()
    timestamps[4] += 0.05  # episode 3, frame 4: half a frame period late
    rewrite_table(path, timestamp=timestamps)
    with pytest.raises(
        ValueError, match=r"no frame of observation.images.\w+ within tolerance_s=0.0001 of .*episode 3, frame_index 4"
    ):
        OfflineBuffer.from_lerobot(root, reward=ALL, verbose=False)


@pytest.mark.bad_input("data", "clear error")
def test_nan_in_a_table(tmp_path):
    root = broken_copy(tmp_path)
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    actions = table.column("action").to_pylist()
    actions[10][2] = float("nan")  # episode 1, frame 2
    index = table.schema.get_field_index("action")
    pq.write_table(
        table.set_column(index, table.schema.field(index), pa.array(actions, table.schema.field(index).type)), path
    )
    with pytest.raises(
        ValueError, match=r"file-000.parquet \(episode 1\): column 'action' has NaN/inf in 1 row\(s\), first at frame 2"
    ):
        OfflineBuffer.from_lerobot(root, keys=["observation.state"], reward=ALL, verbose=False)


@pytest.mark.bad_input("data", "clear error")
def test_table_columns_that_disagree_with_info_json(tmp_path):
    root = broken_copy(tmp_path)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.velocity"] = {"dtype": "float32", "shape": [6], "names": None}
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(
        ValueError,
        match=r"file-000.parquet has columns that disagree with meta/info.json.*missing \['observation.velocity'\]",
    ):
        OfflineBuffer.from_lerobot(root, keys=["observation.state"], reward=ALL, verbose=False)
    info["features"].pop("observation.velocity")
    info["features"]["observation.state"]["shape"] = [7]
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"'observation.state' must hold 7 value\(s\) per row.*got 6"):
        OfflineBuffer.from_lerobot(root, keys=["observation.state"], reward=ALL, verbose=False)


def encode_mjpeg(path: Path, frames: np.ndarray, fps: int = 10) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("mjpeg", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuvj420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.bad_input("data", "clear error")
def test_unknown_codec(tmp_path):
    root = broken_copy(tmp_path)
    encode_mjpeg(root / "videos/observation.images.top/chunk-000/file-001.mp4", np.zeros((20, 24, 32, 3), np.uint8))
    with pytest.raises(
        ValueError,
        match=r"file-001.mp4 \(observation.images.top\) holds 'mjpeg' video; the codecs read are av1, h264",
    ):
        OfflineBuffer.from_lerobot(root, reward=ALL, verbose=False)
    info = json.loads((V3 / "meta/info.json").read_text())
    info["features"]["observation.images.wrist"]["info"]["video.codec"] = "h264"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"holds 'av1' video, but meta/info.json declares video.codec 'h264'"):
        OfflineBuffer.from_lerobot(root, keys=["observation.images.wrist"], reward=ALL, verbose=False)


@pytest.mark.bad_input("data", "clear error")
def test_episode_index_out_of_range_and_bad_arguments():
    with pytest.raises(ValueError, match=r"episodes: index 5 is out of range: .*has 5 episodes \(0..4\)"):
        OfflineBuffer.from_lerobot(V3, episodes=[0, 5], reward=ALL)
    with pytest.raises(ValueError, match=r"episodes: 1 is given twice"):
        OfflineBuffer.from_lerobot(V3, episodes=[1, 1], reward=ALL)
    with pytest.raises(ValueError, match=r"keys: 'action' is not an observation feature"):
        OfflineBuffer.from_lerobot(V3, keys=["action"], reward=ALL)
    with pytest.raises(ValueError, match=r"tolerance_s must be under half a frame period \(0.5 / fps = 0.05 s"):
        OfflineBuffer.from_lerobot(V3, reward=ALL, tolerance_s=0.05)
    with pytest.raises(ValueError, match=r"image_size must be \(height, width\)"):
        OfflineBuffer.from_lerobot(V3, reward=ALL, image_size=(0, 3))


@pytest.mark.bad_input("data", "clear error")
def test_versions_other_than_v21_and_v30_are_refused(tmp_path):
    root = broken_copy(tmp_path, V21)
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = "v2.0"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(
        ValueError, match=r"codebase_version 'v2.0'; this reader reads LeRobot datasets of versions v2.1, v3.0"
    ):
        OfflineBuffer.from_lerobot(root, reward=ALL)


@pytest.mark.bad_input("data", "clear error")
def test_only_regular_files_inside_the_dataset_are_opened(tmp_path):
    root = broken_copy(tmp_path)
    video = root / "videos/observation.images.top/chunk-000/file-000.mp4"
    video.unlink()
    os.mkfifo(video)  # a reader that opened it would block forever
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"file-000.mp4 is not a regular file"):
        OfflineBuffer.from_lerobot(root, reward=ALL, verbose=False)
    assert time.monotonic() - start < 10
    video.unlink()
    outside = tmp_path / "elsewhere.mp4"
    shutil.copy(V3 / "videos/observation.images.top/chunk-000/file-000.mp4", outside)
    video.symlink_to(outside)
    with pytest.raises(ValueError, match=r"file-000.mp4 is a link that leads out of the dataset"):
        OfflineBuffer.from_lerobot(root, reward=ALL, verbose=False)
    info = json.loads((V3 / "meta/info.json").read_text())
    info["data_path"] = "data/{chunk_index.__class__}/x.parquet"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"data_path .* has the field \{chunk_index.__class__\}"):
        OfflineBuffer.from_lerobot(root, reward=ALL, verbose=False)
    info["data_path"] = "../../data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"refusing the path '../../data/chunk-000/file-000.parquet'"):
        OfflineBuffer.from_lerobot(root, reward=ALL, verbose=False)


@pytest.mark.bad_input("data", "clear error")
def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"pip install dql_agent\[lerobot\]"):
        OfflineBuffer.from_lerobot(V3, reward=ALL)


# --- the Hub ------------------------------------------------------------------------------------
def test_hub_dataset_by_id_and_revision_downloads_only_what_it_needs(hub_server, hub_offline):
    from huggingface_hub import HfApi

    from dql_agent.hub import HubNotFoundError

    api = HfApi()
    api.create_repo("alice/tiny-lerobot", repo_type="dataset")
    first = api.upload_folder(repo_id="alice/tiny-lerobot", folder_path=V3, repo_type="dataset").oid
    api.upload_file(
        path_or_fileobj=b"later", path_in_repo="NOTES.md", repo_id="alice/tiny-lerobot", repo_type="dataset"
    )
    ref = dump("v3_cameras")
    buffer = OfflineBuffer.from_lerobot(
        "alice/tiny-lerobot",
        revision=first,
        keys=["observation.images.top", "observation.state"],
        episodes=[3],
        reward=ALL,
        verbose=False,
    )
    assert_frames(buffer.observations["images.top"], ref["frames/observation.images.top"][27:38])
    assert buffer.metadata["dataset_id"] == "alice/tiny-lerobot" and buffer.metadata["dataset_revision"] == first
    fetched = {
        r.path.split(f"/resolve/{first}/")[1]
        for r in hub_server.requests
        if "/resolve/" in r.path and r.method == "GET"
    }
    assert {"data/chunk-000/file-001.parquet", "videos/observation.images.top/chunk-000/file-001.mp4"} <= fetched
    assert not any(p.startswith(("videos/observation.images.wrist", "data/chunk-000/file-000")) for p in fetched)

    n_requests = len(hub_server.requests)
    hub_offline()
    again = OfflineBuffer.from_lerobot(
        "alice/tiny-lerobot", revision=first, keys=["observation.state"], episodes=[3], reward=ALL
    )
    assert len(again) == 11 and len(hub_server.requests) == n_requests  # from the cache, nothing asked
    with pytest.raises(
        HubNotFoundError, match=r"data/chunk-000/file-000.parquet are not in the local cache and offline mode"
    ):
        OfflineBuffer.from_lerobot(
            "alice/tiny-lerobot", revision=first, keys=["observation.state"], episodes=[0], reward=ALL
        )
    with pytest.raises(
        HubNotFoundError, match=r"dataset repo 'alice/never-downloaded'.*not in the local cache.*offline"
    ):
        OfflineBuffer.from_lerobot("alice/never-downloaded", reward=ALL)


@pytest.mark.bad_input("hub", "clear error")
@pytest.mark.parametrize("kind", ["refused", "blackhole"])
def test_hub_dataset_errors(kind, hub_server, monkeypatch, tmp_path):
    from dql_agent.hub import HubNotFoundError, HubUnreachableError

    with pytest.raises(HubNotFoundError, match=r"dataset repo 'alice/missing' not found on"):
        OfflineBuffer.from_lerobot("alice/missing", reward=ALL)
    from huggingface_hub import HfApi

    HfApi().create_repo("alice/tiny-lerobot", repo_type="dataset")
    with pytest.raises(HubNotFoundError, match=r"dataset repo 'alice/tiny-lerobot' has no revision 'v9'"):
        OfflineBuffer.from_lerobot("alice/tiny-lerobot", revision="v9", reward=ALL)
    with pytest.raises(HubNotFoundError, match=r"'alice/tiny-lerobot' at \w+ has no meta/info.json: it is not a"):
        OfflineBuffer.from_lerobot("alice/tiny-lerobot", reward=ALL)  # a dataset repo without a LeRobot dataset in it
    with pytest.raises(ValueError, match=r"neither a dataset folder nor a valid Hub dataset id"):
        OfflineBuffer.from_lerobot("not a/valid/id", reward=ALL)
    with unreachable_endpoint(kind) as url:
        aim_client(monkeypatch, url, tmp_path / "hf_home")
        start = time.monotonic()
        with pytest.raises(HubUnreachableError) as info:
            OfflineBuffer.from_lerobot("alice/tiny-lerobot", reward=ALL)
        assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert f"cannot reach the Hub at {url}" in message and "'alice/tiny-lerobot'" in message
    for way_offline in ("HF_HUB_OFFLINE=1", "local_files_only=True", "local dataset folder"):
        assert way_offline in message


# --- end to end ---------------------------------------------------------------------------------
def test_diffusion_ql_learns_saves_loads_and_exports_on_cameras_and_state(tmp_path):
    import onnxruntime as ort

    from dql_agent import DiffusionQL

    buffer = OfflineBuffer.from_lerobot(V3, reward=ALL, verbose=False)
    tiny = {"hidden_dim": 32, "n_hidden": 2, "diffusion_steps": 3, "batch_size": 16, "n_action_samples": 4}
    model = DiffusionQL(buffer, seed=0, device="cpu", cnn_channels=4, image_features=8, **tiny).learn(3, log_interval=0)
    assert model.metadata["dataset_id"] == "v3_cameras" and "success" in model.metadata["reward"]
    model.save(tmp_path / "model")
    loaded = DiffusionQL.load(tmp_path / "model", device="cpu")
    assert loaded.metadata["reward"] == buffer.metadata["reward"]
    obs = {"images": {k: buffer.observations[f"images.{k}"][:2].numpy() for k in CAMERAS}}
    obs["state"] = buffer.observations["state"][:2].numpy()
    actions, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(actions, model.predict(obs, deterministic=True)[0])
    assert buffer.action_space.contains(actions[0])
    path = loaded.export(tmp_path / "policy.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images.top", "images.wrist", "state"]
    feeds = {"images.top": obs["images"]["top"], "images.wrist": obs["images"]["wrist"], "state": obs["state"]}
    (exported,) = session.run(["action"], feeds)
    np.testing.assert_allclose(exported, actions, atol=1e-4, rtol=0)
    # The model card names the dataset and the reward choice.
    from dql_agent.hub import make_model_card

    card = str(make_model_card(loaded, repo_id="alice/lerobot-dql"))
    assert "- Dataset: `v3_cameras`" in card
    assert "- Reward: " in card and "success" in card.split("- Reward: ")[1].splitlines()[0]


def test_example_trains_saves_loads_and_exports(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "lerobot_train.py"
    spec = importlib.util.spec_from_file_location("example_lerobot_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = "--steps 3 --hidden-dim 32 --batch-size 16 --diffusion-steps 3 --cnn-channels 4 --image-features 8"
    summary = module.main([*tiny.split(), "--device", "cpu", "--episodes", "0", "3", "--out", str(tmp_path / "run")])
    assert summary["transitions"] == 8 + 11 and summary["loaded_acts_the_same"]
    assert summary["onnx_max_difference"] < 1e-4
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dataset"] == "v3_cameras"
    assert (tmp_path / "run" / "model").is_dir() and (tmp_path / "run" / "policy.onnx").is_file()


def test_from_lerobot_builds_an_offline_buffer():
    buffer = OfflineBuffer.from_lerobot(V21, keys=["observation.state"], episodes=[0], reward=ALL, verbose=False)
    assert isinstance(buffer, OfflineBuffer) and len(buffer) == 8
    assert buffer.metadata["dataset_format"] == "LeRobotDataset v2.1"
