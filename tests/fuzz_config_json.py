"""Property test run by tests/test_robust_checkpoints.py in a subprocess under a memory limit.

For every field of config.json (top-level keys, every hyperparameter of all three algorithms,
every key of the spaces, metadata) hypothesis writes a mutated value, and loading must either
work (and then act with finite actions) or raise CheckpointError naming the field, within
``DEADLINE_MS`` and without exceeding the address-space limit the caller set (an allocation past
it would surface as a RuntimeError/MemoryError and fail the property).

    python tests/fuzz_config_json.py MEMORY_LIMIT_BYTES MAX_EXAMPLES
"""

from __future__ import annotations

import copy
import json
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

DEADLINE_MS = 5000


def main(memory_limit: int, max_examples: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    import gymnasium as gym
    import numpy as np
    from hypothesis import given, settings
    from hypothesis import strategies as st

    import dql_agent
    from dql_agent import CheckpointError, DiffusionDICE, DiffusionQL, OfflineBuffer
    from dql_agent.qvpo import QVPO

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(40, 3)).astype(np.float32)
    buffer = OfflineBuffer(obs, rng.uniform(-1, 1, (40, 2)), rng.normal(size=40), obs, np.zeros(40, bool))
    small = {"hidden_dim": 16, "n_hidden": 1, "diffusion_steps": 3, "n_action_samples": 4, "batch_size": 8}
    root = Path(tempfile.mkdtemp())
    saved: dict[str, tuple[type, Path, dict[str, Any]]] = {}
    for name, model in {
        "dql": DiffusionQL(buffer, seed=0, device="cpu", **small).learn(2),
        "dice": DiffusionDICE(buffer, seed=0, device="cpu", q_ensemble_size=2, reward_transform="none", **small).learn(
            2
        ),
        "qvpo": QVPO(
            observation_space=gym.spaces.Box(-1, 1, (3,)),
            action_space=gym.spaces.Box(-1, 1, (2,)),
            seed=0,
            device="cpu",
            **{k: v for k, v in small.items() if k != "n_action_samples"},
        ),
    }.items():
        path = root / name
        model.save(path, include_optimizer=name != "qvpo")
        saved[name] = (type(model), path, json.loads((path / "config.json").read_text()))

    def leaf_paths(value: Any, prefix: tuple) -> list[tuple]:
        if isinstance(value, dict) and value:
            return [prefix] + [p for k, v in value.items() for p in leaf_paths(v, (*prefix, k))]
        if isinstance(value, list) and value:
            return [prefix] + [p for i, v in enumerate(value) for p in leaf_paths(v, (*prefix, i))]
        return [prefix]

    cases = [(name, path) for name, (_, _, config) in saved.items() for path in leaf_paths(config, ()) if path]
    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.sampled_from([0, 1, -1, 2**31, 2**63, 10**9, 40_000, 100_000])
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.sampled_from([0.5, 1e8, 1e300, -0.0, 16.0])
        | st.text(max_size=8)
        | st.sampled_from(["inf", "-inf", "False", "no", "0", "Box", "Dict", "float32", "int8", "this:Pendulum-v1"]),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=8,
    )

    @settings(max_examples=max_examples, deadline=DEADLINE_MS, database=None, derandomize=True)
    @given(case=st.sampled_from(cases), value=json_values, delete=st.booleans())
    def mutated_config_loads_or_names_the_field(case: tuple, value: Any, delete: bool) -> None:
        name, field_path = case
        cls, source, config = saved[name]
        config = copy.deepcopy(config)
        parent = config
        for key in field_path[:-1]:
            parent = parent[key]
        if delete and isinstance(parent, dict):
            del parent[field_path[-1]]
        else:
            parent[field_path[-1]] = value
        target = root / "mutated"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for file in source.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        (target / "config.json").write_text(json.dumps(config))
        for load in (cls.load, dql_agent.load_from_hub):
            try:
                model = load(target, device="cpu")
            except CheckpointError as error:
                message = str(error)
                named = [str(k) for k in field_path if isinstance(k, str)]
                assert any(k in message for k in named) or "model.safetensors" in message, (field_path, message)
                continue
            action, _ = model.predict(np.zeros(3, np.float32), deterministic=True)
            assert np.all(np.isfinite(action)), (field_path, value)

    mutated_config_loads_or_names_the_field()
    print(f"ok: {max_examples} examples over {len(cases)} config.json fields")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
