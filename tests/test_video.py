"""record_video writes a decodable H.264 mp4 with one frame per step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import imageio.v3 as iio
import numpy as np
import pytest

from dql_agent.integrations.video import record_video

# Headless MuJoCo. The GL backend is picked when mujoco is first imported, which gymnasium
# only does on gym.make of a MuJoCo env, so setting it here (after the imports above) is in
# time; conftest.py sets the same default at pytest start for other modules.
os.environ.setdefault("MUJOCO_GL", "egl")


class ConstantPolicy:
    """A deterministic SB3-style policy: always the same action; counts its calls."""

    def __init__(self, action: Any) -> None:
        self.action = np.asarray(action)
        self.calls = 0
        self.episode_starts: list[bool] = []

    def predict(
        self,
        observation: Any,
        state: Any = None,
        episode_start: Any = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, Any]:
        assert deterministic
        self.calls += 1
        self.episode_starts.append(bool(np.asarray(episode_start).item()))
        return self.action, state


class TinyEnv(gym.Env):
    """Never terminates; renders a (height, width) frame whose colour follows the step count."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, height: int = 33, width: int = 45, frame: Any = "auto") -> None:
        self.render_mode = "rgb_array"
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.height, self.width, self.frame, self.t = height, width, frame, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action: Any):
        self.t += 1
        return np.zeros(1, np.float32), 0.0, False, False, {}

    def render(self) -> Any:
        if not isinstance(self.frame, str):
            return self.frame
        img = np.zeros((self.height, self.width, 3), np.uint8)
        img[: self.height // 2] = (20 * self.t) % 256  # top half changes; not blank
        return img


def _decode(path: Path) -> np.ndarray:
    return iio.imread(path, plugin="FFMPEG")  # (T, H, W, 3)


def test_pendulum_two_episodes(tmp_path: Path) -> None:
    pytest.importorskip("pygame", reason="Pendulum-v1 renders with pygame")
    env = gym.make("Pendulum-v1", render_mode="rgb_array", max_episode_steps=12)
    policy = ConstantPolicy([0.5])
    out = record_video(policy, env, tmp_path / "new" / "dir" / "pendulum.mp4", n_episodes=2, seed=0)
    assert out == tmp_path / "new" / "dir" / "pendulum.mp4" and out.is_file()

    frames = _decode(out)
    assert policy.calls == 24 and len(frames) == policy.calls  # one frame per step
    assert policy.episode_starts.count(True) == 2
    assert frames.shape[1:] == (500, 500, 3) and frames.dtype == np.uint8
    assert all(f.std() > 0 for f in frames)
    assert iio.immeta(out, plugin="FFMPEG")["fps"] == env.metadata["render_fps"]

    # The first frame is the seeded reset state (H.264 is lossy: compare loosely).
    env.reset(seed=0)
    expected = env.render().astype(float)
    assert np.abs(frames[0].astype(float) - expected).mean() < 3.0
    env.close()


def test_mujoco_env_renders_headless(tmp_path: Path) -> None:
    env = gym.make("InvertedPendulum-v5", render_mode="rgb_array", width=128, height=96)
    try:
        env.reset(seed=0)
        env.render()
    except Exception as err:  # no GL backend on this machine: say exactly why
        pytest.skip(f"MuJoCo cannot render with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {err!r}")
    policy = ConstantPolicy([0.0])
    out = record_video(policy, env, tmp_path / "inv.mp4", max_steps=15, seed=1, fps=20)
    frames = _decode(out)
    assert len(frames) == policy.calls <= 15
    assert frames.shape[1:] == (96, 128, 3) and frames[0].std() > 0
    env.close()


def test_max_steps_and_odd_frame_size(tmp_path: Path) -> None:
    policy = ConstantPolicy(1)
    out = record_video(policy, TinyEnv(33, 45), tmp_path / "tiny.mp4", n_episodes=3, max_steps=7)
    frames = _decode(out)
    assert policy.calls == len(frames) == 7  # budget is over all episodes, stops mid-episode
    assert frames.shape[1:] == (34, 46, 3)  # padded to even sizes for yuv420p, not rescaled
    assert iio.immeta(out, plugin="FFMPEG")["fps"] == 10  # from env.metadata["render_fps"]


def test_env_without_rgb_array_is_rejected(tmp_path: Path) -> None:
    env = gym.make("CartPole-v1")  # render_mode=None
    with pytest.raises(ValueError, match=r"render_mode is None.*render_mode='rgb_array'"):
        record_video(ConstantPolicy(0), env, tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()


def test_vec_env_is_rejected(tmp_path: Path) -> None:
    vec = gym.vector.SyncVectorEnv([TinyEnv])
    with pytest.raises(TypeError, match="single gymnasium.Env"):
        record_video(ConstantPolicy(0), vec, tmp_path / "x.mp4")


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (None, "returned None"),
        (np.zeros((0, 4, 3), np.uint8), "shape"),
        (np.zeros((4, 4)), "shape"),
        (np.zeros((4, 4, 3)), "uint8"),
    ],
)
def test_bad_frames_raise_and_leave_no_file(tmp_path: Path, frame: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        record_video(ConstantPolicy(0), TinyEnv(frame=frame), tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists()
