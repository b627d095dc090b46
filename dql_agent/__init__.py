"""dql_agent: diffusion policies trained with Q-learning, with an SB3-style surface.

>>> from dql_agent import DiffusionQL, OfflineBuffer
>>> model = DiffusionQL(buffer=OfflineBuffer.from_minari("mujoco/hopper/medium-v0"), env="Hopper-v5")
>>> model.learn(total_timesteps=1_000_000, progress_bar=True)
>>> action, _ = model.predict(obs, deterministic=True)

Importing the package defines the three algorithms, and so registers them for ``load_from_hub``,
and registers the PixelReach camera task (``dql_agent/PixelReach-v0``, see :mod:`dql_agent.pixel_reach`).
"""

from dql_agent.base import ALGORITHMS, BaseAgent, Paper
from dql_agent.buffer import Batch, OfflineBuffer, ReplayBuffer
from dql_agent.checkpoint import CheckpointError, library_version
from dql_agent.diffusion_dice import DiffusionDICE, DiffusionDICEConfig, DiffusionDICEPolicy
from dql_agent.diffusion_ql import PRESETS, DiffusionQL, DiffusionQLConfig, DiffusionQLPolicy, get_preset
from dql_agent.integrations.hub import load_from_hub
from dql_agent.pixel_reach import IMAGE_ENV_ID as _PIXEL_REACH  # noqa: F401  # registers dql_agent/PixelReach-v0
from dql_agent.qvpo import QVPO, QVPOConfig, QVPOPolicy
from dql_agent.seeds import SeedStack, train_seeds

__version__ = library_version()

__all__ = [
    "ALGORITHMS",
    "Batch",
    "BaseAgent",
    "CheckpointError",
    "DiffusionDICE",
    "DiffusionDICEConfig",
    "DiffusionDICEPolicy",
    "DiffusionQL",
    "DiffusionQLConfig",
    "DiffusionQLPolicy",
    "OfflineBuffer",
    "PRESETS",
    "Paper",
    "QVPO",
    "QVPOConfig",
    "QVPOPolicy",
    "ReplayBuffer",
    "SeedStack",
    "get_preset",
    "load_from_hub",
    "train_seeds",
    "__version__",
]
