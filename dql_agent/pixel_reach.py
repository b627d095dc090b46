"""PixelReach: a small, headless visual reaching task for camera-observation tests.

A point mass in the square ``[-1, 1]^2`` must reach a goal that it can only see in the
observation image: the goal position is never part of the state vector. Everything is drawn with
numpy masks (no pygame, no MuJoCo), so the env runs anywhere, fast: a 48x48 frame costs about
60 microseconds.

Importing this module registers two Gymnasium ids (``dql_agent`` does not import it by itself;
``gym.make("dql_agent.pixel_reach:dql_agent/PixelReach-v0")`` imports it on the fly):

* ``dql_agent/PixelReach-v0``: observations are ``(size, size, 3)`` uint8 images (HWC).
* ``dql_agent/PixelReachState-v0``: ``{"image": <that image>, "state": <agent position>}``.

:func:`write_pixel_reach_dataset` writes a mixed-quality Minari dataset (a noisy half and a clean
half of a scripted expert), with ``ref_min_score``/``ref_max_score`` from random actions and the
noiseless expert. Measured for ``size=48``, 200 episodes, seed 0 (mean undiscounted returns):
uniform random actions -30.75, noiseless expert -1.75, clean half -2.12, noisy half -14.14 (2,992
steps; writing takes about 2 s on two cores).

Minari is imported inside :func:`write_pixel_reach_dataset` and :func:`pixel_reach_returns` only.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

from dql_agent.demo_data import record_episode

if TYPE_CHECKING:
    import minari

__all__ = [
    "IMAGE_ENV_ID",
    "STATE_ENV_ID",
    "PixelReachEnv",
    "collect_episodes",
    "expert_action",
    "pixel_reach_returns",
    "write_pixel_reach_dataset",
]

IMAGE_ENV_ID = "dql_agent/PixelReach-v0"
STATE_ENV_ID = "dql_agent/PixelReachState-v0"
OBSERVATION_MODES = ("image", "image+state")

STEP_SIZE = 0.15
"""Displacement per step for a unit action: ``p <- clip(p + STEP_SIZE * a, -1, 1)``."""
GOAL_HALF_WIDTH = 0.8
"""Goals are drawn in ``[-0.8, 0.8]^2``, so the goal disc stays (almost) inside the frame."""
MIN_START_DISTANCE = 0.5
"""Goals are redrawn until the agent starts at least this far away (no trivial episodes)."""
SUCCESS_DISTANCE = 0.1
"""The episode terminates (with :data:`SUCCESS_REWARD`) once the agent is closer than this."""
SUCCESS_REWARD = 1.0
EXPERT_GAIN = 3.0

_BACKGROUND = 230
_GOAL_COLOUR = np.array([30, 170, 30], dtype=np.uint8)
_AGENT_COLOUR = np.array([210, 30, 30], dtype=np.uint8)
# Where the discs overlap both stay visible (red + green channels), so neither hides the other.
_OVERLAP_COLOUR = np.array([210, 170, 30], dtype=np.uint8)
_MIN_RENDER_SIZE = 192
# Reset seeds of the reference rollouts start here; collect_episodes draws its reset seeds below
# it, so reference episodes never repeat a dataset episode.
_REFERENCE_SEED_OFFSET = 2**31
# Key under which write_pixel_reach_dataset stores the measured returns in the dataset metadata.
_RETURNS_KEY = "dql_agent_returns"


class PixelReachEnv(gym.Env):
    """A 2-D point mass that must reach a goal it can only see in the image.

    At reset the agent position ``p`` is drawn uniformly in ``[-1, 1]^2`` and the goal ``g`` in
    ``[-0.8, 0.8]^2`` (redrawn while ``|p - g| < 0.5``), both from ``self.np_random``. An action
    ``a`` in ``[-1, 1]^2`` moves ``p <- clip(p + 0.15 a, -1, 1)``. The reward is ``-|p - g|``
    each step; once ``|p - g| < 0.1`` the episode terminates with reward ``+1`` instead (and
    ``info["is_success"]`` True). Episodes are truncated after ``max_steps`` steps.

    The image has a light grey background, the goal as a green disc (radius ``size / 10``
    pixels) and the agent as a red one (``size / 12``); overlapping pixels are yellow-orange. A
    position ``(x, y)`` maps to column ``(x + 1) / 2 * (size - 1)`` and row
    ``(y + 1) / 2 * (size - 1)`` (x to the right, y downward): see :meth:`position_to_pixel`.

    Args:
        size: image height and width in pixels (an int >= 16).
        observation: ``"image"`` for ``(size, size, 3)`` uint8 observations, or
            ``"image+state"`` for ``{"image": ..., "state": agent position (2,) float32}``.
        max_steps: steps before truncation (an int >= 1).
        render_mode: None or ``"rgb_array"`` (the observation image upscaled to >= 192 pixels).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        size: int = 48,
        observation: str = "image",
        max_steps: int = 30,
        render_mode: str | None = None,
    ) -> None:
        # bool is an int subclass: refuse it, True is no image size.
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 16:
            raise ValueError(f"size must be an int >= 16 (image height and width in pixels), got {size!r}")
        if observation not in OBSERVATION_MODES:
            raise ValueError(f"observation must be one of {list(OBSERVATION_MODES)}, got {observation!r}")
        if not isinstance(max_steps, (int, np.integer)) or isinstance(max_steps, bool) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.size = int(size)
        self.observation = observation
        self.max_steps = int(max_steps)
        self.render_mode = render_mode

        image_space = gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self.observation_space: gym.spaces.Space[Any]
        if observation == "image":
            self.observation_space = image_space
        else:
            state_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
            self.observation_space = gym.spaces.Dict({"image": image_space, "state": state_space})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

        # The pixel grid, computed once: every frame only compares squared distances against it.
        rows, cols = np.mgrid[0 : self.size, 0 : self.size]
        self._rows = rows.astype(np.float32)
        self._cols = cols.astype(np.float32)
        self._goal_radius = self.size / 10.0
        self._agent_radius = self.size / 12.0
        self._render_scale = math.ceil(_MIN_RENDER_SIZE / self.size)

        self._agent = np.zeros(2)
        self._goal = np.zeros(2)
        self._steps = 0

    @property
    def agent_position(self) -> np.ndarray:
        """The agent position ``p`` (a copy), shape (2,), in ``[-1, 1]^2``."""
        return self._agent.copy()

    @property
    def goal_position(self) -> np.ndarray:
        """The goal position ``g`` (a copy), shape (2,), in ``[-0.8, 0.8]^2``; not observed."""
        return self._goal.copy()

    def position_to_pixel(self, position: np.ndarray) -> tuple[float, float]:
        """The ``(row, column)`` pixel coordinates of a position ``(x, y)`` in ``[-1, 1]^2``."""
        x, y = (np.asarray(position, dtype=np.float64) + 1.0) / 2.0 * (self.size - 1)
        return float(y), float(x)

    def _disc(self, position: np.ndarray, radius: float) -> np.ndarray:
        row, col = self.position_to_pixel(position)
        return (self._rows - row) ** 2 + (self._cols - col) ** 2 <= radius**2

    def _image(self) -> np.ndarray:
        image = np.full((self.size, self.size, 3), _BACKGROUND, dtype=np.uint8)
        goal = self._disc(self._goal, self._goal_radius)
        agent = self._disc(self._agent, self._agent_radius)
        image[goal] = _GOAL_COLOUR
        image[agent] = _AGENT_COLOUR
        image[goal & agent] = _OVERLAP_COLOUR
        return image

    def _observation(self) -> np.ndarray | dict[str, np.ndarray]:
        image = self._image()
        if self.observation == "image":
            return image
        return {"image": image, "state": self._agent.astype(np.float32)}

    def _distance(self) -> float:
        return float(np.linalg.norm(self._agent - self._goal))

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray | dict[str, np.ndarray], dict[str, Any]]:
        """Draw a new agent and goal position (from ``self.np_random``, seeded by ``seed``)."""
        super().reset(seed=seed)
        self._agent = self.np_random.uniform(-1.0, 1.0, size=2)
        self._goal = self.np_random.uniform(-GOAL_HALF_WIDTH, GOAL_HALF_WIDTH, size=2)
        while self._distance() < MIN_START_DISTANCE:
            self._goal = self.np_random.uniform(-GOAL_HALF_WIDTH, GOAL_HALF_WIDTH, size=2)
        self._steps = 0
        return self._observation(), {"is_success": False, "distance": self._distance()}

    def step(self, action: np.ndarray) -> tuple[np.ndarray | dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Move by ``0.15 * clip(action, -1, 1)``; reward ``-distance``, or ``+1`` on success."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"action must have shape (2,), got {action.shape}")
        self._agent = np.clip(self._agent + STEP_SIZE * np.clip(action, -1.0, 1.0), -1.0, 1.0)
        self._steps += 1
        distance = self._distance()
        terminated = distance < SUCCESS_DISTANCE
        reward = SUCCESS_REWARD if terminated else -distance
        truncated = self._steps >= self.max_steps
        info = {"is_success": terminated, "distance": distance}
        return self._observation(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        """The observation image upscaled to at least 192 pixels (``render_mode="rgb_array"``)."""
        if self.render_mode != "rgb_array":
            return None
        image = self._image()
        return np.repeat(np.repeat(image, self._render_scale, axis=0), self._render_scale, axis=1)


def _register() -> None:
    """Register both ids once; a second import (or a reload) leaves the registry alone."""
    for env_id, observation in ((IMAGE_ENV_ID, "image"), (STATE_ENV_ID, "image+state")):
        if env_id not in gym.registry:
            gym.register(
                id=env_id,
                entry_point="dql_agent.pixel_reach:PixelReachEnv",
                kwargs={"size": 48, "observation": observation, "max_steps": 30},
            )


_register()


def expert_action(env: gym.Env) -> np.ndarray:
    """The scripted expert: ``clip(3 (g - p), -1, 1)`` from the env's true positions.

    Reads ``env.unwrapped``, so wrapped envs work. Over seeded resets it reaches the goal in every
    episode (about 8 steps on average).
    """
    base = env.unwrapped
    if not isinstance(base, PixelReachEnv):
        raise TypeError(f"expert_action needs a PixelReachEnv, got {type(base).__name__}")
    return np.clip(EXPERT_GAIN * (base._goal - base._agent), -1.0, 1.0).astype(np.float32)


def _rollout(env: PixelReachEnv, policy: Callable[[PixelReachEnv], np.ndarray], reset_seed: int) -> dict[str, Any]:
    """One episode in Minari's layout; the scripted policies read the env's state, not the pixels."""
    return record_episode(env, lambda _observation: policy(env), reset_seed)


def _behaviour_policy(
    rng: np.random.Generator, noise: float, random_prob: float
) -> Callable[[PixelReachEnv], np.ndarray]:
    """The expert plus ``N(0, noise)`` per dimension, replaced by a uniform action w.p. ``random_prob``."""

    def policy(env: PixelReachEnv) -> np.ndarray:
        action = expert_action(env) + (rng.normal(0.0, noise, size=2) if noise > 0.0 else 0.0)
        if random_prob > 0.0 and rng.random() < random_prob:
            action = rng.uniform(-1.0, 1.0, size=2)
        return np.clip(action, -1.0, 1.0)

    return policy


def collect_episodes(
    n_episodes: int,
    *,
    size: int = 48,
    observation: str = "image",
    noise: float = 0.0,
    random_prob: float = 0.0,
    seed: int = 0,
    max_steps: int = 30,
) -> list[dict[str, Any]]:
    """Roll out the (optionally noisy) scripted expert for ``n_episodes`` PixelReach episodes.

    Args:
        n_episodes: number of episodes (>= 1).
        size, observation, max_steps: passed to :class:`PixelReachEnv`.
        noise: standard deviation of the Gaussian noise added to each action dimension.
        random_prob: probability of replacing an action by a uniform random one in ``[-1, 1]^2``.
        seed: seeds the reset seeds and the action noise; the same arguments give the same
            episodes. Reset seeds lie in ``[0, 2**31)``.

    Returns:
        Episode dicts in Minari's layout: ``observations`` (T+1, size, size, 3) uint8 (for
        ``"image+state"`` a dict ``{"image": (T+1, size, size, 3) uint8, "state": (T+1, 2)
        float32}``), ``actions`` (T, 2) float32 (clipped to ``[-1, 1]``), ``rewards`` (T,)
        float64, ``terminations`` and ``truncations`` (T,) bool.
    """
    if not isinstance(n_episodes, (int, np.integer)) or isinstance(n_episodes, bool) or n_episodes < 1:
        raise ValueError(f"n_episodes must be an int >= 1, got {n_episodes!r}")
    if not noise >= 0.0:  # also refuses NaN
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    if not 0.0 <= random_prob <= 1.0:
        raise ValueError(f"random_prob must be in [0, 1], got {random_prob!r}")
    env = PixelReachEnv(size=size, observation=observation, max_steps=max_steps)
    # Separate streams: the reset seeds (so the start states) do not depend on noise/random_prob.
    seeds_seq, noise_seq = np.random.SeedSequence(seed).spawn(2)
    reset_seeds = np.random.default_rng(seeds_seq).integers(0, _REFERENCE_SEED_OFFSET, size=n_episodes)
    policy = _behaviour_policy(np.random.default_rng(noise_seq), noise, random_prob)
    episodes = [_rollout(env, policy, int(reset_seed)) for reset_seed in reset_seeds]
    env.close()
    return episodes


def _reference_return(
    policy: Callable[[PixelReachEnv], np.ndarray], n_episodes: int, seed: int, size: int, max_steps: int
) -> float:
    """Mean return over ``n_episodes`` with reset seeds from ``2**31 + ...``, off the dataset's."""
    env = PixelReachEnv(size=size, observation="image", max_steps=max_steps)
    first = _REFERENCE_SEED_OFFSET + seed * n_episodes
    returns = [_rollout(env, policy, first + i)["rewards"].sum() for i in range(n_episodes)]
    env.close()
    return float(np.mean(returns))


def write_pixel_reach_dataset(
    dataset_id: str,
    n_episodes: int = 200,
    *,
    size: int = 48,
    observation: str = "image",
    seed: int = 0,
    overwrite: bool = False,
    n_reference_episodes: int = 20,
) -> minari.MinariDataset:
    """Write a mixed-quality PixelReach dataset as a local Minari dataset.

    The first ``n_episodes // 2`` episodes are "noisy" (expert + ``N(0, 1)`` noise, half the
    actions uniform random), the rest "clean" (expert + ``N(0, 0.1)`` noise). ``ref_min_score``
    is the mean return of uniform random actions, ``ref_max_score`` that of the noiseless
    expert, each over ``n_reference_episodes`` episodes whose reset seeds the dataset never uses.
    The mean returns of both halves and both references are in the description and in the
    dataset metadata: read them back with :func:`pixel_reach_returns`.

    Args:
        dataset_id: Minari id to write, under ``$MINARI_DATASETS_PATH`` (or ``~/.minari/datasets``).
        n_episodes: total episodes (>= 2).
        size: image size in pixels.
        observation: ``"image"`` (env id ``dql_agent/PixelReach-v0``) or ``"image+state"``
            (``dql_agent/PixelReachState-v0``).
        seed: seed of the collection: the noisy half uses ``seed``, the clean half ``seed + 1``.
        overwrite: replace a local dataset with the same id; if False, an existing one is an error.
        n_reference_episodes: episodes for each reference score.

    Returns:
        The written ``MinariDataset``.

    Raises:
        FileExistsError: the dataset exists and ``overwrite`` is False.
        ValueError: ``n_episodes < 2`` or a bad ``size``/``observation``.
    """
    from minari.storage import get_dataset_path

    from dql_agent.integrations.minari import write_minari_dataset

    if not isinstance(n_episodes, (int, np.integer)) or isinstance(n_episodes, bool) or n_episodes < 2:
        raise ValueError(f"n_episodes must be an int >= 2 (a noisy and a clean half), got {n_episodes!r}")
    env_id = IMAGE_ENV_ID if observation == "image" else STATE_ENV_ID
    env = PixelReachEnv(size=size, observation=observation)  # validates size and observation
    path = get_dataset_path(dataset_id)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"Minari dataset {dataset_id!r} already exists at {path}")
        shutil.rmtree(path)  # minari.delete_dataset would also print to stdout

    n_noisy = n_episodes // 2
    n_clean = n_episodes - n_noisy
    common: dict[str, Any] = {"size": size, "observation": observation, "max_steps": env.max_steps}
    noisy = collect_episodes(n_noisy, noise=1.0, random_prob=0.5, seed=seed, **common)
    clean = collect_episodes(n_clean, noise=0.1, random_prob=0.0, seed=seed + 1, **common)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    random_return = _reference_return(
        lambda _: rng.uniform(-1.0, 1.0, size=2), n_reference_episodes, seed, size, env.max_steps
    )
    expert_return = _reference_return(expert_action, n_reference_episodes, seed, size, env.max_steps)
    returns = {
        "noisy_return": float(np.mean([episode["rewards"].sum() for episode in noisy])),
        "clean_return": float(np.mean([episode["rewards"].sum() for episode in clean])),
        "random_return": random_return,
        "expert_return": expert_return,
    }
    # The spec carries the size, so recover_environment() rebuilds the env the data came from.
    registered = gym.spec(env_id)
    env_spec = dataclasses.replace(registered, kwargs={**registered.kwargs, "size": size})
    dataset = write_minari_dataset(
        dataset_id,
        noisy + clean,
        observation_space=env.observation_space,
        action_space=env.action_space,
        env_id=env_spec,
        ref_min_score=random_return,
        ref_max_score=expert_return,
        description=(
            f"PixelReach ({size}x{size} images, observation={observation!r}): {n_noisy} noisy episodes "
            f"(scripted expert + N(0, 1) noise, half the actions uniform random; mean return "
            f"{returns['noisy_return']:.2f}) then {n_clean} clean episodes (expert + N(0, 0.1) noise; "
            f"mean return {returns['clean_return']:.2f}). Uniform random actions: {random_return:.2f}, "
            f"noiseless expert: {expert_return:.2f}."
        ),
        algorithm_name="scripted expert clip(3 (g - p), -1, 1) + noise (dql_agent.pixel_reach)",
    )
    env.close()
    dataset.storage.update_metadata({_RETURNS_KEY: {**returns, "n_noisy": n_noisy, "n_clean": n_clean}})
    return dataset


def pixel_reach_returns(dataset: minari.MinariDataset) -> dict[str, float | int]:
    """The mean returns stored by :func:`write_pixel_reach_dataset`.

    Returns:
        ``noisy_return``, ``clean_return`` (the dataset's two halves), ``random_return`` and
        ``expert_return`` (its ``ref_min_score`` and ``ref_max_score``), ``n_noisy`` and
        ``n_clean`` (episodes per half; the noisy ones come first).

    Raises:
        ValueError: the dataset was not written by :func:`write_pixel_reach_dataset`.
    """
    returns = dataset.storage.metadata.get(_RETURNS_KEY)
    if returns is None:
        raise ValueError(
            f"dataset {dataset.spec.dataset_id!r} has no {_RETURNS_KEY!r} metadata; it was not written by "
            "write_pixel_reach_dataset"
        )
    return {key: int(value) if key.startswith("n_") else float(value) for key, value in returns.items()}
