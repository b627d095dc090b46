"""Record a policy rollout to an mp4 with imageio's ffmpeg plugin.

imageio-ffmpeg ships its own ffmpeg binary, so this works offline with no system ffmpeg and no
moviepy (which gymnasium's ``RecordVideo`` and SB3's ``VecVideoRecorder`` need).

Headless MuJoCo: set ``MUJOCO_GL=egl`` in the environment *before* gymnasium/mujoco is imported
(MuJoCo picks its GL backend at import); ``osmesa`` is the fallback where EGL is missing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np


def render_headless() -> None:
    """Let pygame-drawn envs (classic control) render to arrays on a machine without a display.

    Without a display SDL tries its Wayland and X11 drivers first and prints ``error:
    XDG_RUNTIME_DIR is invalid or not set`` before it falls back, although frames for
    ``render_mode="rgb_array"`` need no window. With no display and no driver chosen by the user,
    SDL's dummy driver is picked, which is silent. It only sets an environment default, read by
    SDL when pygame first opens its display.
    """
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


class Predictor(Protocol):
    """Anything with SB3's ``predict``: one unbatched observation in, one action out."""

    def predict(
        self,
        observation: Any,
        state: Any = None,
        episode_start: Any = None,
        deterministic: bool = False,
    ) -> tuple[Any, Any]: ...


def record_video(
    model: Predictor,
    env: gym.Env,
    path: str | os.PathLike[str],
    *,
    n_episodes: int = 1,
    max_steps: int = 1000,
    fps: float | None = None,
    deterministic: bool = True,
    seed: int | None = None,
) -> Path:
    """Roll ``model`` out in ``env`` and write the rendered frames to an H.264 mp4.

    Args:
        model: an object with SB3's ``predict(observation, state=None, episode_start=None,
            deterministic=False) -> (action, state)``; called with single (unbatched)
            observations. A recurrent ``state`` is carried between steps.
        env: a single ``gymnasium.Env`` made with ``render_mode="rgb_array"``. Vectorised envs
            (SB3 ``VecEnv``, ``gymnasium.vector.VectorEnv``) are rejected with a ``TypeError``:
            pass one of their sub-envs instead (e.g. ``vec_env.envs[0]`` for a ``DummyVecEnv``).
            The env is not closed.
        path: where to write the video; must end in ``.mp4``. Parent folders are created.
        n_episodes: episodes to record, back to back in one video.
        max_steps: total frame budget over all episodes; recording stops when it is reached,
            even mid-episode.
        fps: frames per second; defaults to ``env.metadata["render_fps"]``, else 30.
        deterministic: passed to ``model.predict``.
        seed: seeds the first ``env.reset``; later episodes continue the env's RNG, so the whole
            video is reproducible from one seed.

    Returns:
        The path of the written video.

    One frame is rendered per environment step, *before* the action is taken (the frame shows
    what the policy acted on), so a video of N steps has N frames. H.264 with ``yuv420p`` (the
    pixel format browsers and the Hub's player decode) needs even frame sizes: odd heights or
    widths are padded by one edge-replicated row/column rather than rescaled.
    """
    _check_env(env)
    render_headless()
    check_spaces = getattr(model, "check_env_spaces", None)
    if check_spaces is not None:  # dql_agent models say which space differs; others fail in predict
        check_spaces(env.observation_space, env.action_space)
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"path must end in '.mp4', got {str(path)!r}")
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if fps is None:
        fps = env.metadata.get("render_fps") or 30
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")

    import imageio.v2 as imageio  # the legacy FFMPEG writer streams frames to ffmpeg's stdin

    path.parent.mkdir(parents=True, exist_ok=True)
    # macro_block_size=1: we make sizes even ourselves instead of letting imageio rescale.
    writer = imageio.get_writer(
        path,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    try:
        _rollout(model, env, writer, n_episodes, max_steps, deterministic, seed)
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)  # never leave a truncated video behind
        raise
    writer.close()
    return path


def _check_env(env: Any) -> None:
    if isinstance(env, gym.vector.VectorEnv) or hasattr(env, "num_envs"):
        raise TypeError(
            f"record_video takes a single gymnasium.Env, got a vectorised env "
            f"({type(env).__name__}); pass one sub-env, e.g. vec_env.envs[0], or "
            f"gym.make(id, render_mode='rgb_array')"
        )
    if not isinstance(env, gym.Env):
        raise TypeError(f"env must be a gymnasium.Env, got {type(env).__name__}")
    if env.render_mode != "rgb_array":
        env_id = env.spec.id if env.spec is not None else "<env id>"
        raise ValueError(
            f"record_video needs frames from env.render(), but env.render_mode is "
            f"{env.render_mode!r}; create the env with "
            f"gym.make({env_id!r}, render_mode='rgb_array')"
        )


def _rollout(
    model: Predictor,
    env: gym.Env,
    writer: Any,
    n_episodes: int,
    max_steps: int,
    deterministic: bool,
    seed: int | None,
) -> None:
    frames = 0
    shape: tuple[int, ...] | None = None
    for episode in range(n_episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        state, episode_start = None, np.ones((1,), dtype=bool)
        done = False
        while not done and frames < max_steps:
            frame = _checked_frame(env.render(), shape)
            shape = frame.shape
            writer.append_data(_even(frame))
            frames += 1
            action, state = model.predict(obs, state=state, episode_start=episode_start, deterministic=deterministic)
            episode_start = np.zeros((1,), dtype=bool)
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
        if frames >= max_steps:
            break


def _checked_frame(frame: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    """An (H, W, 3) uint8 frame, or a ValueError saying what ``env.render()`` gave instead."""
    if frame is None:
        raise ValueError("env.render() returned None; the env must use render_mode='rgb_array'")
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4) or 0 in frame.shape:
        raise ValueError(f"env.render() must give an (H, W, 3) RGB array, got shape {frame.shape}")
    if frame.dtype != np.uint8:
        raise ValueError(f"env.render() must return uint8 pixels, got dtype {frame.dtype}")
    frame = frame[:, :, :3]  # drop alpha
    if shape is not None and frame.shape != shape:
        raise ValueError(f"frame size changed during recording: {shape} -> {frame.shape}")
    return frame


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad odd heights/widths by one replicated row/column: yuv420p subsamples 2x2."""
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if pad_h or pad_w:
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frame
