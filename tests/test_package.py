"""The package's shape: what importing it costs, what it exports."""

from __future__ import annotations

import subprocess
import sys

import dql_agent


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
