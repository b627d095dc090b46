"""The embedded default dataset of ``dql-agent demo``: Pendulum-v1 episodes, no downloads.

A hand-written swing-up controller plays Gymnasium's ``Pendulum-v1``. Half of the episodes are the
controller with a little Gaussian noise ("good"); the other half add large noise and replace 60% of
the actions with uniform random ones ("noisy"). An offline agent trained on the mixture should beat
the noisy half and random actions by a wide margin.

Measured with ``build_pendulum_dataset()`` (seed 0; mean undiscounted return of 200-step episodes):
clean controller -156 (20 episodes; -137 over another 20 with SB3's ``evaluate_policy``), good half
-152, noisy half -844, uniform random actions -1181.

Minari is imported inside the functions only, so importing this module is cheap. ``record_episode``
lives in :mod:`dql_agent.integrations.minari` with the rest of "your own data"; it is still
importable from here.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np

if TYPE_CHECKING:
    import minari

__all__ = [
    "PendulumDatasetInfo",
    "PendulumSwingUpController",
    "build_pendulum_dataset",
    "collect_pendulum_episodes",
]

ENV_ID = "Pendulum-v1"
MAX_TORQUE = 2.0
# Pendulum-v1 dynamics: thdot' = thdot + dt * (3g/(2l) sin(th) + 3/(m l^2) u), g=10, m=l=1.
_GRAVITY_TERM = 15.0  # 3 g / (2 l)
# Key under which build_pendulum_dataset stores the measured returns in the dataset metadata.
_RETURNS_KEY = "dql_agent_returns"


@dataclass(frozen=True)
class PendulumSwingUpController:
    """Energy-pumping swing-up with a linear stabiliser near upright, for ``Pendulum-v1``.

    With ``E = thdot**2 / 2 + 15 cos(th)`` the dynamics give ``dE/dt = 3 u thdot``, so pushing
    along the velocity raises the energy towards the upright-at-rest value ``E* = 15``. Within
    ``capture_angle`` of upright a state feedback ``u = -(kp th + kd thdot)`` takes over; its
    default gains are the discrete LQR gains for Pendulum's cost (Q = diag(1, 0.1), R = 0.01).
    Mean return over 20 seeded episodes: about -137 (random actions: about -1200).

    Works as a plain callable and as an SB3-style policy (``predict``) for ``evaluate_policy``.
    """

    kp: float = 13.0
    """Angle gain of the stabiliser (torque per radian)."""
    kd: float = 3.3
    """Angular-velocity gain of the stabiliser (torque per rad/s)."""
    energy_gain: float = 1.0
    """Torque per unit of energy deficit in the swing-up phase (saturates at the torque limit)."""
    capture_angle: float = 0.5
    """Angle from upright (radians) inside which the stabiliser acts."""

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """Torque for observations ``[cos th, sin th, thdot]``: (3,) -> (1,), (n, 3) -> (n, 1)."""
        obs = np.asarray(obs, dtype=np.float64)
        cos_th, sin_th, thdot = obs[..., 0], obs[..., 1], obs[..., 2]
        theta = np.arctan2(sin_th, cos_th)  # 0 is upright
        energy = 0.5 * thdot**2 + _GRAVITY_TERM * cos_th
        # At rest at the bottom thdot is 0: push forward anyway to start the swing.
        direction = np.where(thdot >= 0.0, 1.0, -1.0)
        swing = self.energy_gain * (_GRAVITY_TERM - energy) * direction
        stabilise = -(self.kp * theta + self.kd * thdot)
        torque = np.where(cos_th > np.cos(self.capture_angle), stabilise, swing)
        return np.clip(torque, -MAX_TORQUE, MAX_TORQUE)[..., None].astype(np.float32)

    def predict(
        self,
        observation: np.ndarray,
        state: Any = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = True,
    ) -> tuple[np.ndarray, None]:
        """SB3 ``predict`` protocol: return ``(actions, None)``; the controller is deterministic."""
        return self(observation), None


@dataclass(frozen=True)
class PendulumDatasetInfo:
    """A dataset written by :func:`build_pendulum_dataset` and the mean returns measured for it."""

    dataset: minari.MinariDataset
    """The Minari dataset (also stored locally under its id)."""
    good_return: float
    """Mean episode return of the good half of the dataset."""
    noisy_return: float
    """Mean episode return of the noisy half of the dataset."""
    random_return: float
    """Mean return of uniform random actions; the dataset's ``ref_min_score``."""
    controller_return: float
    """Mean return of the clean controller; the dataset's ``ref_max_score``."""

    @classmethod
    def from_dataset(cls, dataset: minari.MinariDataset) -> PendulumDatasetInfo:
        """Read the returns back from a dataset written by :func:`build_pendulum_dataset`."""
        returns = dataset.storage.metadata.get(_RETURNS_KEY)
        if returns is None:
            raise ValueError(
                f"dataset {dataset.spec.dataset_id!r} has no {_RETURNS_KEY!r} metadata; it was not "
                "written by build_pendulum_dataset"
            )
        return cls(dataset=dataset, **{key: float(value) for key, value in returns.items()})


def __getattr__(name: str) -> Any:
    if name == "record_episode":  # moved to dql_agent.integrations.minari; imported when asked for
        from dql_agent.integrations.minari import record_episode

        return record_episode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _noisy_policy(
    controller: PendulumSwingUpController,
    rng: np.random.Generator,
    noise_std: float,
    random_prob: float,
) -> Callable[[np.ndarray], np.ndarray]:
    """The controller plus Gaussian noise, replaced by a uniform action with ``random_prob``."""

    def policy(obs: np.ndarray) -> np.ndarray:
        action = controller(obs) + rng.normal(0.0, noise_std, size=1)
        if random_prob > 0.0 and rng.random() < random_prob:
            action = rng.uniform(-MAX_TORQUE, MAX_TORQUE, size=1)
        return action

    return policy


def collect_pendulum_episodes(
    n_good: int,
    n_noisy: int,
    seed: int,
    noise_std: float = 1.5,
    random_prob: float = 0.6,
    good_noise_std: float = 0.1,
) -> list[dict[str, np.ndarray]]:
    """Roll out ``n_good`` good then ``n_noisy`` noisy 200-step ``Pendulum-v1`` episodes.

    Args:
        n_good: episodes of the controller plus ``N(0, good_noise_std)`` torque noise
            (mean return about -150).
        n_noisy: episodes of the controller plus ``N(0, noise_std)`` noise, with each action
            replaced by a uniform random torque with probability ``random_prob`` (about -800
            with the defaults).
        seed: seeds the numpy Generator for the noise and, through it, every env reset; the same
            seed gives the same episodes.
        noise_std: torque noise of the noisy episodes.
        random_prob: probability of a uniform random action in the noisy episodes.
        good_noise_std: torque noise of the good episodes.

    Returns:
        Episode dicts (``observations`` (201, 3), ``actions`` (200, 1), ``rewards``,
        ``terminations``, ``truncations`` (200,)), good ones first; episodes end by truncation.
    """
    if n_good < 0 or n_noisy < 0:
        raise ValueError(f"n_good and n_noisy must be >= 0, got n_good={n_good}, n_noisy={n_noisy}")
    if not 0.0 <= random_prob <= 1.0:
        raise ValueError(f"random_prob must be in [0, 1], got {random_prob}")
    from dql_agent.integrations.minari import record_episode

    rng = np.random.default_rng(seed)
    controller = PendulumSwingUpController()
    good = _noisy_policy(controller, rng, good_noise_std, 0.0)
    noisy = _noisy_policy(controller, rng, noise_std, random_prob)
    env = gym.make(ENV_ID)
    episodes = []
    for policy in [good] * n_good + [noisy] * n_noisy:
        episodes.append(record_episode(env, policy, reset_seed=int(rng.integers(2**31))))
    env.close()
    return episodes


def _mean_return(policy: Callable[[np.ndarray], np.ndarray], n_episodes: int, seed: int) -> float:
    """Mean return of ``policy`` over ``n_episodes`` with env resets seeded ``seed + i``."""
    from dql_agent.integrations.minari import record_episode

    env = gym.make(ENV_ID)
    returns = [record_episode(env, policy, seed + i)["rewards"].sum() for i in range(n_episodes)]
    env.close()
    return float(np.mean(returns))


def build_pendulum_dataset(
    dataset_id: str = "dql_agent/pendulum/mixed-v0",
    n_good: int = 25,
    n_noisy: int = 25,
    seed: int = 0,
    overwrite: bool = True,
    n_reference_episodes: int = 20,
) -> PendulumDatasetInfo:
    """Collect the mixed Pendulum-v1 dataset and write it as a local Minari dataset.

    The defaults give 50 episodes, 10,000 transitions, in a few seconds on two cores: enough for
    Diffusion-QL to learn a swing-up in the demo, small enough to build on every run.

    ``ref_min_score`` is the mean return of uniform random actions and ``ref_max_score`` that of
    the clean controller, each over ``n_reference_episodes`` seeded episodes, so
    ``minari.get_normalized_score`` works. The measured returns are also stored in the dataset's
    metadata (read them back with :meth:`PendulumDatasetInfo.from_dataset`).

    Args:
        dataset_id: Minari id to write, under ``$MINARI_DATASETS_PATH`` (or ``~/.minari/datasets``).
        n_good: episodes of the lightly-noised controller.
        n_noisy: episodes of the heavily-noised, partly random controller.
        seed: seed of the episode collection; reference rollouts use seeds from ``seed + 10**6``.
        overwrite: replace a local dataset with the same id; if False, an existing one is an error.
        n_reference_episodes: episodes for each reference score.

    Returns:
        The dataset and the mean returns of its halves, of random actions and of the controller.
    """
    from minari.storage import get_dataset_path

    from dql_agent.integrations.minari import write_minari_dataset

    if n_good < 1 or n_noisy < 1:
        raise ValueError(f"n_good and n_noisy must be >= 1, got n_good={n_good}, n_noisy={n_noisy}")
    path = get_dataset_path(dataset_id)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"Minari dataset {dataset_id!r} already exists at {path}")
        shutil.rmtree(path)  # minari.delete_dataset would also print to stdout

    episodes = collect_pendulum_episodes(n_good, n_noisy, seed)
    returns = np.array([episode["rewards"].sum() for episode in episodes])
    env = gym.make(ENV_ID)
    action_space = env.action_space
    ref_seed = seed + 10**6  # keep reference rollouts off the dataset's reset seeds
    rng = np.random.default_rng(ref_seed)
    random_return = _mean_return(
        lambda obs: rng.uniform(-MAX_TORQUE, MAX_TORQUE, size=1), n_reference_episodes, ref_seed
    )
    controller_return = _mean_return(PendulumSwingUpController(), n_reference_episodes, ref_seed)
    info = {
        "good_return": float(returns[:n_good].mean()),
        "noisy_return": float(returns[n_good:].mean()),
        "random_return": random_return,
        "controller_return": controller_return,
    }
    dataset = write_minari_dataset(
        dataset_id,
        episodes,
        observation_space=env.observation_space,
        action_space=action_space,
        env_id=ENV_ID,
        ref_min_score=random_return,
        ref_max_score=controller_return,
        description=(
            f"Pendulum-v1: {n_good} episodes of a swing-up controller with small noise "
            f"(mean return {info['good_return']:.1f}) and {n_noisy} noisy, partly random episodes "
            f"(mean return {info['noisy_return']:.1f}). Random actions: {random_return:.1f}, "
            f"clean controller: {controller_return:.1f}."
        ),
        algorithm_name="PendulumSwingUpController + noise (dql_agent.demo_data)",
    )
    env.close()
    dataset.storage.update_metadata({_RETURNS_KEY: info})
    return PendulumDatasetInfo(dataset=dataset, **info)
