"""The algorithm registry, and the lookups every front end shares (CLI, sweeps, the Hub).

An algorithm registers itself with its class statement (``class MyAlgo(BaseAgent,
algorithm="MyAlgo", short_name="myalgo", paper=Paper(...))``, see :mod:`dql_agent.base`);
config.json records the ``algorithm`` name, and the command line uses the ``short_name``.

The built-in algorithms are plugins to this module: their modules are listed in
``BUILTIN_ALGORITHMS`` and imported on the first lookup (nothing here names a class). Adding
an algorithm is its file plus one line in that list.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dql_agent.base import BaseAgent
    from dql_agent.buffer import OfflineBuffer


@dataclass(frozen=True)
class Paper:
    """What the model card says about an algorithm's method and how to cite it."""

    method_name: str
    """Short name used in the card's first sentence, e.g. 'Diffusion-QL'."""
    title: str
    """Paper title."""
    short_citation: str
    """Authors and venue in one line, e.g. 'Wang, Hunt and Zhou, ICLR 2023'."""
    url: str
    """Link to the paper (arXiv abstract page)."""
    method: str
    """One paragraph of markdown describing the method."""
    bibtex: str
    """BibTeX entry, without surrounding fences."""


ALGORITHMS: dict[str, type[BaseAgent]] = {}
"""Algorithm name (config.json's "algorithm") -> its class; filled by the class statements."""

BUILTIN_ALGORITHMS = ("dql_agent.diffusion_ql", "dql_agent.qvpo", "dql_agent.diffusion_dice")
"""The modules whose class statements register the built-in algorithms."""


def load_builtin_algorithms() -> dict[str, type[BaseAgent]]:
    """Import the built-in algorithm modules (once; later calls cost a dict lookup each), which
    registers them; returns the registry."""
    for module in BUILTIN_ALGORITHMS:
        importlib.import_module(module)
    return ALGORITHMS


def register(cls: type[BaseAgent]) -> None:
    """Record ``cls`` under its ``algorithm`` name; a second class of the same name or short name
    (other than a reload of the same module) is an error naming both."""
    for other in ALGORITHMS.values():
        same = other.algorithm == cls.algorithm or other.short_name == cls.short_name
        if same and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"{cls.__module__}.{cls.__qualname__} registers as algorithm={cls.algorithm!r}, "
                f"short_name={cls.short_name!r}, which {other.__module__}.{other.__qualname__} already uses"
            )
    ALGORITHMS[cls.algorithm] = cls


def algorithm_class(name: str) -> type[BaseAgent]:
    """The agent class registered as ``name``; ValueError listing the known ones. (Importing
    ``dql_agent``'s public names imports, and so registers, the built-in algorithms.)"""
    load_builtin_algorithms()
    if name not in ALGORITHMS:
        raise ValueError(
            f"unknown algorithm {name!r}; this dql_agent knows {sorted(ALGORITHMS)} (a newer dql_agent may "
            "know it, or import the module that defines it)"
        )
    return ALGORITHMS[name]


def algorithms_by_short_name() -> dict[str, type[BaseAgent]]:
    """The registered algorithms (the built-in ones loaded) by their command-line name."""
    return {cls.short_name: cls for cls in load_builtin_algorithms().values()}


def load_buffer(
    dataset: str,
    download: bool = False,
    env_id: str | None = None,
    *,
    observation_space: Any = None,
    action_space: Any = None,
) -> OfflineBuffer:
    """A Minari id or a D4RL-style .npz/.hdf5 file as an OfflineBuffer. A file takes the spaces
    given, else those of the env ``env_id`` names, else they are inferred from the data; a Minari
    dataset stores its own."""
    from dql_agent.buffer import OfflineBuffer

    if not dataset.endswith((".npz", ".hdf5", ".h5")):
        return OfflineBuffer.from_minari(dataset, download=download)
    if env_id is not None and (observation_space is None or action_space is None):
        import gymnasium as gym

        try:
            env = gym.make(env_id)
        except (gym.error.NameNotFound, gym.error.NamespaceNotFound, gym.error.VersionNotFound) as error:
            raise ValueError(
                f"{error} If a package registers it (e.g. gymnasium_robotics for PointMaze), import it "
                f"first, or name it as PACKAGE:{env_id.split(':')[-1]}"
            ) from error
        observation_space = observation_space or env.observation_space
        action_space = action_space or env.action_space
        env.close()
    spaces = {"observation_space": observation_space, "action_space": action_space}
    return OfflineBuffer.from_d4rl(dataset, **{key: value for key, value in spaces.items() if value is not None})
