"""The package's shape: what importing it costs, what it exports, and imports that run one way.

``LAYERS`` is the map of docs/ARCHITECTURE.md, bottom to top. A module may import modules of its
own layer or of lower ones, never of a higher one, and the imports (module-level and inside
functions alike; ``if TYPE_CHECKING:`` blocks aside, they never run) form no circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dql_agent

ROOT = Path(__file__).resolve().parent.parent

LAYERS: list[tuple[str, set[str]]] = [
    (
        "foundation: values, spaces, networks, files",
        {
            "config",
            "spaces",
            "observations",
            "transitions",
            "rewards",
            "scaling",
            "networks",
            "diffusion",
            "encoders",
            "checkpoint",
            "report",
            "hub_access",
            "readers",
            "readers.d4rl",
            "readers.minari",
            "readers.sb3",
            "readers.lerobot",
            "readers.arrays",
            "files",
            "limits",
            "chunks",
            "wire",
            "remote",
        },
    ),
    ("data", {"buffer"}),
    ("policy", {"policy", "export"}),
    ("agent", {"sb3", "registry", "training", "evaluation", "metrics", "video", "hub", "base"}),
    ("algorithms", {"diffusion_ql", "qvpo", "diffusion_dice"}),
    ("algorithm tools", {"seeds", "model_selection"}),
    ("integrations", {"integrations", *(f"integrations.{p.stem}" for p in (ROOT / "integrations").glob("*.py"))}),
    ("applications", {"demo_data", "pixel_reach", "server", "cli", ""}),  # "" is the package facade
]
LAYER_OF = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}


def module_files() -> dict[str, Path]:
    """Every module of the package, by its name inside ``dql_agent`` ('' for the facade)."""
    files = {}
    for path in sorted((ROOT / "dql_agent").rglob("*.py")):
        parts = path.relative_to(ROOT / "dql_agent").with_suffix("").parts
        files[".".join(p for p in parts if p != "__init__")] = path
    for path in sorted((ROOT / "integrations").glob("*.py")):
        files["integrations" if path.stem == "__init__" else f"integrations.{path.stem}"] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports when it runs (not under ``if TYPE_CHECKING:``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from dql_agent import wire` imports the submodule; `from dql_agent import X` the facade
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            inner = [name.removeprefix("dql_agent").removeprefix(".") for name in submodules]
            names = submodules if all(i in known for i in inner) else [node.module, *submodules]
        for name in names:
            if name == "dql_agent" or name.startswith("dql_agent."):
                inner = name.removeprefix("dql_agent").removeprefix(".")
                while inner not in known and "." in inner:
                    inner = inner.rsplit(".", 1)[0]
                if inner in known:
                    found.add(inner)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def test_every_module_has_a_layer(graph):
    assert not sorted(set(graph) - set(LAYER_OF)), "add new modules to LAYERS and to docs/ARCHITECTURE.md"


def test_imports_run_down_the_layers(graph):
    upward = [
        f"{importer or 'dql_agent'} ({LAYERS[LAYER_OF[importer]][0]}) imports {imported} "
        f"({LAYERS[LAYER_OF[imported]][0]})"
        for importer, imports in sorted(graph.items())
        for imported in sorted(imports)
        if importer in LAYER_OF and imported in LAYER_OF and LAYER_OF[imported] > LAYER_OF[importer]
    ]
    assert not upward, upward


def test_the_imports_form_no_circle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for other in sorted(graph.get(module, ())):
            if state.get(other) == 1:
                return path[path.index(other) :] + [other]
            if other not in state and (circle := visit(other)):
                return circle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)):
            pytest.fail(f"import circle: {' -> '.join(m or 'dql_agent' for m in circle)}")


def test_the_check_sees_an_upward_import(tmp_path):
    """The guard can fail: a foundation module importing the agent layer is reported."""
    bad = tmp_path / "spaces.py"
    bad.write_text("def f():\n    from dql_agent.base import BaseAgent\n    return BaseAgent\n")
    found = imported_modules(bad, set(LAYER_OF))
    assert found == {"base"} and LAYER_OF["base"] > LAYER_OF["spaces"]
    hidden = tmp_path / "typing_only.py"
    hidden.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dql_agent.base import BaseAgent\n")
    assert imported_modules(hidden, set(LAYER_OF)) == set()


def test_importing_the_package_loads_no_torch_until_a_public_name_is_used():
    code = (
        "import sys, dql_agent; assert 'torch' not in sys.modules, 'torch at import'; "
        "dql_agent.DiffusionQL; assert 'torch' in sys.modules; "
        "assert sorted(dql_agent.ALGORITHMS) == ['DiffusionDICE', 'DiffusionQL', 'QVPO'], dql_agent.ALGORITHMS"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_exported_name_resolves():
    for name in dql_agent.__all__:
        assert getattr(dql_agent, name) is not None, name
