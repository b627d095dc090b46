"""Count the adversarial inputs the test suite tries, by category, and write docs/ROBUSTNESS.md.

Every test case marked ``@pytest.mark.bad_input(category, outcome)`` feeds one bad input; its
outcome is "clear error" (an error naming the field, expected and received value) or "correct
behaviour" (e.g. an empty batch returns an empty action array). This runs exactly those cases and
counts them; a case that fails lands in the "crash or wrong" column, which must stay empty.

    OMP_NUM_THREADS=1 python -m benchmarks.robustness_table [--output docs/ROBUSTNESS.md]
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTCOMES = ("clear error", "correct behaviour")


class Tally:
    """A pytest plugin recording (category, outcome, passed) for each bad_input case."""

    def __init__(self) -> None:
        self.marks: dict[str, tuple[str, str]] = {}
        self.results: list[tuple[str, str, bool]] = []

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            mark = item.get_closest_marker("bad_input")
            if mark is not None:
                category, outcome = mark.args
                if outcome not in OUTCOMES:
                    raise ValueError(f"{item.nodeid}: bad_input outcome must be one of {OUTCOMES}, got {outcome!r}")
                self.marks[item.nodeid] = (category, outcome)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self.marks:
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.results.append((*self.marks[report.nodeid], report.passed))


def table(results: list[tuple[str, str, bool]]) -> str:
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for category, outcome, passed in results:
        counts[category]["tried"] += 1
        counts[category][outcome if passed else "crash or wrong"] += 1
    rows = ["| category | tried | clear error | correct behaviour | crash or wrong |", "|---|---:|---:|---:|---:|"]
    total: collections.Counter[str] = collections.Counter()
    for category in sorted(counts):
        c = counts[category]
        total.update(c)
        cells = [c["tried"], c["clear error"], c["correct behaviour"], c["crash or wrong"]]
        rows.append(f"| {category} | " + " | ".join(map(str, cells)) + " |")
    rows.append(
        f"| **all** | **{total['tried']}** | **{total['clear error']}** | **{total['correct behaviour']}** | "
        f"**{total['crash or wrong']}** |"
    )
    return "\n".join(rows)


HEADER = """# Robustness: the bad inputs the tests try

Every row counts test cases marked `@pytest.mark.bad_input(category, outcome)`: each feeds one
adversarial input (a corrupted or hostile checkpoint, a config value of the wrong type or size, a
dataset array with NaN, 1e39, complex numbers or 0.3 as a terminal flag, a wrong observation shape,
a hostile env id in a model card, a CLI call that would overwrite its input, a failure injected at
every write of a save, a process killed mid-save, ...). "Clear error" cases assert the message
names the field (or file), what was expected and what was received; "correct behaviour" cases
assert the right result (an empty batch gives an empty action array, a step both terminated and
truncated loads as terminal, a failed save leaves the previous checkpoint loadable). A failing case
would be counted under "crash or wrong".

Seven cases are property-based fuzzers, each counted once although each tries many inputs.
Checkpoints: hypothesis writes random bytes (60 examples) and mutated bytes (60) into every
checkpoint file, mutates every field of config.json for all three algorithms (400 examples over
177 fields, in a subprocess capped at 2.5 GiB of address space, 5 s per example), and rewrites the
safetensors header of the weight and optimizer files (50 examples: dtypes, shapes, offsets, the
header's length, with the recorded SHA-256 updated so that the parser is reached): each load either
works and acts with finite actions, or raises `CheckpointError` naming the field or file (or, for
a valid value that changes the network's shapes, naming the tensors of model.safetensors it
disagrees with). Data: the `.npy` headers inside an `.npz` (50 examples: shapes of up to 10^12
elements, four dtypes, truncated or padded data) load or raise a `ValueError`, with at most 16 MiB
allocated. Sweeps: random YAML-ish text (300 examples) loads or is refused in one line naming the
file, and odd values of every spec field (150) are refused naming the field or kept with their type.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "ROBUSTNESS.md")
    args = parser.parse_args()
    tally = Tally()
    start = time.time()
    code = pytest.main(["-q", "-m", "bad_input", "-p", "no:cacheprovider", str(ROOT / "tests")], plugins=[tally])
    elapsed = time.time() - start
    text = table(tally.results)
    command = "OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.robustness_table"
    machine = f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}"
    args.output.write_text(
        f"{HEADER}\n{text}\n\nGenerated by `{command}` ({len(tally.results)} cases in {elapsed:.0f} s, {machine}).\n"
    )
    print(text)
    sys.exit(code)


if __name__ == "__main__":
    main()
