"""dql_agent: diffusion policies trained with Q-learning, with an SB3-style surface.

>>> from dql_agent import DiffusionQL, OfflineBuffer
>>> model = DiffusionQL(buffer=OfflineBuffer.from_minari("mujoco/hopper/medium-v0"), env="Hopper-v5")
>>> model.learn(total_timesteps=1_000_000, progress_bar=True)
>>> action, _ = model.predict(obs, deterministic=True)

The public names below load on first use, and the first use imports the three algorithms, which
registers them for ``load_from_hub``. Until then ``import dql_agent`` costs no torch, so a
torch-free module such as :mod:`dql_agent.remote` (the robot side of a policy server) imports
alone. Importing the package registers the PixelReach camera task (``dql_agent/PixelReach-v0``,
see :mod:`dql_agent.pixel_reach`) where gymnasium is installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dql_agent.base import ALGORITHMS, BaseAgent, Paper
    from dql_agent.buffer import Batch, OfflineBuffer, ReplayBuffer
    from dql_agent.checkpoint import CheckpointError
    from dql_agent.diffusion_dice import DiffusionDICE, DiffusionDICEConfig, DiffusionDICEPolicy
    from dql_agent.diffusion_ql import PRESETS, DiffusionQL, DiffusionQLConfig, DiffusionQLPolicy, get_preset
    from dql_agent.integrations.hub import load_from_hub
    from dql_agent.qvpo import QVPO, QVPOConfig, QVPOPolicy
    from dql_agent.seeds import SeedStack, train_seeds
    from dql_agent.server import serve

    __version__: str

# public name -> the module that defines it
_EXPORTS = {
    "ALGORITHMS": "dql_agent.base",
    "BaseAgent": "dql_agent.base",
    "Paper": "dql_agent.base",
    "Batch": "dql_agent.buffer",
    "OfflineBuffer": "dql_agent.buffer",
    "ReplayBuffer": "dql_agent.buffer",
    "CheckpointError": "dql_agent.checkpoint",
    "DiffusionDICE": "dql_agent.diffusion_dice",
    "DiffusionDICEConfig": "dql_agent.diffusion_dice",
    "DiffusionDICEPolicy": "dql_agent.diffusion_dice",
    "PRESETS": "dql_agent.diffusion_ql",
    "DiffusionQL": "dql_agent.diffusion_ql",
    "DiffusionQLConfig": "dql_agent.diffusion_ql",
    "DiffusionQLPolicy": "dql_agent.diffusion_ql",
    "get_preset": "dql_agent.diffusion_ql",
    "load_from_hub": "dql_agent.integrations.hub",
    "QVPO": "dql_agent.qvpo",
    "QVPOConfig": "dql_agent.qvpo",
    "QVPOPolicy": "dql_agent.qvpo",
    "SeedStack": "dql_agent.seeds",
    "serve": "dql_agent.server",
    "train_seeds": "dql_agent.seeds",
}

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
    "serve",
    "train_seeds",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562), with every built-in algorithm registered."""
    if name == "__version__":
        from dql_agent.checkpoint import library_version

        value: Any = library_version()
    elif name in _EXPORTS:
        from dql_agent.registry import load_builtin_algorithms

        load_builtin_algorithms()
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'dql_agent' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, "__version__"])


def _register_envs() -> None:
    try:
        import gymnasium  # noqa: F401  # absent on a robot computer that only runs the remote client
    except ImportError:
        return
    importlib.import_module("dql_agent.pixel_reach")  # registers dql_agent/PixelReach-v0 (numpy only)


_register_envs()
