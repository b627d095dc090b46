"""Export a policy's acting to ONNX and torch.export, for runtimes without Python training stacks.

The exported graph is :meth:`PolicyBase.forward`: everything ``predict`` does after its Python-side
checks. Dict observations become one named input per key (flattened in the space's key order);
then observation normalisation, the whole reverse chain unrolled over the T steps (Diffusion-DICE's
guidance gradient in closed form), candidate scoring by the critic, the argmax (deterministic) or
the softmax pick, and unscaling to the action Box.

Inputs (the batch dimension is dynamic unless ``batch`` fixes it):

- ``observation`` (B, *obs_shape), or one input per Dict key (nested keys joined with '.'),
  float32; for a space with camera keys (:mod:`dql_agent.observations`) the image keys are uint8
  (B, *shape) in the space's own layout (HWC or CHW), fed as the camera gives them: the graph
  scales them and runs the CNN encoder;
- stochastic export only: ``noise`` (B, T, N, A) standard normal, and, where acting is not greedy,
  ``uniform`` (B,) in [0, 1): the graph has no random op, so a runtime seeds its own draws.

Output ``action`` (B, *action_shape), float32, in the action space's bounds. The deterministic
graph bakes in the fixed noise, so it returns what ``predict(obs, deterministic=True)`` returns.
A policy that acts in chunks (``action_horizon`` h > 1) returns the whole chunk, (B, h,
*action_shape), what ``policy.predict_chunk`` returns; with ``n_obs_steps`` k > 1 every
observation input is a history (B, k, *shape), oldest first. The runtime executes
``n_action_steps`` actions of a chunk before it asks for the next (the README shows the loop).

Metadata (ONNX ``metadata_props``, the .pt2's extra file ``dql_agent.json``): the algorithm, the
library version, input and output names, observation keys and shapes, action shape and bounds,
the acting settings and the SHA-256 of the weights (as config.json's ``model_sha256``). A space
with camera keys adds ``observation_specs``: per observation input its key, kind (image or
vector), dtype, shape without the batch, and for images the layout (HWC/CHW) and size [H, W, C].

The ONNX path needs ``pip install dql_agent[deploy]`` (onnx, onnxscript; onnxruntime to run it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from dql_agent.checkpoint import atomic_write, library_version, weights_bytes
from dql_agent.config import is_int
from dql_agent.limits import check_budget
from dql_agent.observations import describe_observation_space, has_images, is_image_space, leaves

if TYPE_CHECKING:
    from dql_agent.policy import PolicyBase

FORMATS = {".onnx": "ONNX (onnxruntime)", ".pt2": "torch.export ExportedProgram"}
METADATA_FILE = "dql_agent.json"  # the .pt2's extra file holding the metadata
DEFAULT_OPSET = 18
MAX_BATCH = 1 << 20
"""The most rows an exported graph takes: the dynamic batch dimension's upper bound, and the
largest fixed ``batch`` (whose example inputs are allocated to trace the graph)."""
RANDOM_INPUTS = ("noise", "uniform")  # the stochastic export's inputs after the observation's
OUTPUT = "action"


def observation_inputs(space: spaces.Space, prefix: str = "") -> list[tuple[str, tuple[int, ...]]]:
    """(input name, shape without batch) per Box of the observation space, in flattening order."""
    if isinstance(space, spaces.Dict):
        return [item for key, sub in space.spaces.items() for item in observation_inputs(sub, f"{prefix}{key}.")]
    assert space.shape is not None  # a Box: checked when the policy was built
    return [(prefix[:-1] or "observation", tuple(space.shape))]


def observation_dtypes(space: spaces.Space) -> list[torch.dtype]:
    """The exported dtype of each observation input, in :func:`observation_inputs`' order: uint8
    for the camera keys of a space with images, float32 for everything else."""
    images = has_images(space)
    return [torch.uint8 if images and is_image_space(box) else torch.float32 for _, box in leaves(space)]


class ExportablePolicy(nn.Module):
    """The policy's ``forward`` behind the exported inputs: one per observation key, then the noise.

    Flat spaces concatenate the keys into the flat observation; a space with camera keys passes
    them on as an observation tree (key -> (B, *shape), images uint8) to the policy's encoder."""

    def __init__(self, policy: PolicyBase, stochastic: bool):
        super().__init__()
        self.policy, self.stochastic = policy, stochastic
        self.n_observation_inputs = len(observation_inputs(policy.observation_space))
        self.tree_keys = [key for key, _ in leaves(policy.observation_space)] if policy.encoder.uses_images else None
        self.takes_uniform = stochastic and policy.temperature is not None
        self.history = policy.config.n_obs_steps

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        parts = inputs[: self.n_observation_inputs]
        observations: Any
        if self.tree_keys is not None:
            observations = dict(zip(self.tree_keys, parts, strict=True))
        elif self.history > 1:  # (B, k, *shape) per key -> (B, k, obs_dim)
            observations = torch.cat([p.reshape(p.shape[0], p.shape[1], -1) for p in parts], dim=2)
        else:
            observations = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
        if not self.stochastic:
            return self.policy(observations)
        uniform = inputs[self.n_observation_inputs + 1] if self.takes_uniform else None
        return self.policy(observations, inputs[self.n_observation_inputs], uniform)


def export_policy(
    policy: PolicyBase,
    path: str | os.PathLike[str],
    *,
    algorithm: str,
    deterministic: bool = True,
    n_action_samples: int | None = None,
    batch: int | str = "dynamic",
    opset: int | None = None,
) -> Path:
    """Write ``policy``'s acting to ``path``: ``.onnx`` (ONNX) or ``.pt2`` (torch.export); returns it.

    Args:
        policy: a trained (or loaded) agent's policy (``model.policy``).
        algorithm: the name the metadata records (``model.algorithm``).
        path: the file to write; its suffix picks the format. Written atomically.
        deterministic: bake in the fixed noise and take the argmax (``predict(deterministic=True)``);
            False takes ``noise`` (and ``uniform``) as inputs.
        n_action_samples: candidates per observation (default: the model's); a deterministic
            export with another N has other fixed noise than ``predict``.
        batch: "dynamic", or a fixed batch size.
        opset: ONNX opset (default 18).
    """
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(
            f"export path must end in one of {sorted(FORMATS)}, got {str(path)!r} (suffix {path.suffix!r})"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot export to {str(path)!r}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot export to {str(path)!r}: it is not writable")
    if not (batch == "dynamic" or (is_int(batch) and int(batch) >= 1)):
        raise ValueError(f"batch must be 'dynamic' or an int >= 1, got {batch!r}")
    if batch != "dynamic" and int(batch) > MAX_BATCH:
        raise ValueError(
            f"batch must be 'dynamic' or an int from 1 to {MAX_BATCH:,} (the most rows an exported graph "
            f"takes), got {int(batch):,}"
        )
    if n_action_samples is not None and not (is_int(n_action_samples) and n_action_samples >= 1):
        raise ValueError(f"n_action_samples must be an int >= 1 or None, got {n_action_samples!r}")
    if opset is not None and not (is_int(opset) and opset >= DEFAULT_OPSET):
        raise ValueError(
            f"opset must be an int >= {DEFAULT_OPSET} (Mish and the reductions used) or None, got {opset!r}"
        )
    _check_input_names(policy.observation_space, deterministic)
    if path.suffix == ".onnx":
        _require_onnx()

    exported = _policy_for_export(policy, n_action_samples)
    module = ExportablePolicy(exported, stochastic=not deterministic).eval()
    if batch != "dynamic":  # tracing allocates the example inputs of a fixed batch
        check_budget(
            f"export with batch={int(batch):,} (its example inputs)",
            int(batch) * _input_bytes_per_row(exported, module),
            hint="export with batch='dynamic' (traced with 2 rows) or a smaller fixed batch",
        )
    example, names, dynamic = _example_inputs(exported, module, batch)
    metadata = _metadata(algorithm, policy, exported, names, deterministic, batch)
    with torch.no_grad(), _quiet_exporter():
        program = torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
    if path.suffix == ".pt2":
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(metadata)})
        atomic_write(path, buffer.getvalue())
        return path
    with _quiet_exporter():
        onnx_program = torch.onnx.export(
            program,
            example,
            input_names=names,
            output_names=[OUTPUT],
            opset_version=opset or DEFAULT_OPSET,
            dynamo=True,
            verbose=False,
        )
    assert onnx_program is not None
    proto = onnx_program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    atomic_write(path, proto.SerializeToString())
    return path


# What torch's exporters say about themselves, on every export, whatever the policy: the ONNX
# registry logs that torchvision's operators are skipped (this package exports none), and pytree
# warns of its own deprecated LeafSpec check. Dropped by logger and message, during the export only.
_EXPORTER_LOGGER = "torch.onnx._internal.exporter._registration"
_EXPORTER_LOG_MESSAGES = ("torchvision is not installed",)
_EXPORTER_WARNINGS = ((FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),)


class _DropExporterNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _EXPORTER_LOG_MESSAGES)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.export / torch.onnx.export without the exporters' notes about themselves; any other
    warning or log line (about the model, the user's inputs) passes."""
    logger, drop = logging.getLogger(_EXPORTER_LOGGER), _DropExporterNotes()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for category, message in _EXPORTER_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        logger.removeFilter(drop)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of an exported file (JSON values decoded)."""
    path = Path(path)
    if path.suffix == ".pt2":
        extra = {METADATA_FILE: ""}
        torch.export.load(path, extra_files=extra)
        return dict(json.loads(extra[METADATA_FILE]))
    _require_onnx()
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for entry in proto.metadata_props:
        try:
            out[entry.key] = json.loads(entry.value)
        except ValueError:
            out[entry.key] = entry.value
    return out


def _check_input_names(space: spaces.Space, deterministic: bool) -> None:
    """Refuse an observation key that would share its name with another input or the output."""
    taken = {OUTPUT} if deterministic else {OUTPUT, *RANDOM_INPUTS}
    clashes = [name for name, _ in observation_inputs(space) if name in taken]
    if clashes:
        raise ValueError(
            f"cannot export: the observation key {clashes[0]!r} would share its name with the graph's "
            f"{'output' if clashes[0] == OUTPUT else 'input'} {clashes[0]!r} (the exported inputs are named by the "
            f"observation keys, then {', '.join(RANDOM_INPUTS)} for a stochastic export); rename the key"
        )


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs the deploy extra ({error.name} is missing): pip install dql_agent[deploy]"
        ) from None


def _policy_for_export(policy: PolicyBase, n_action_samples: int | None) -> PolicyBase:
    """The policy itself, or a copy acting with ``n_action_samples`` candidates (its own fixed noise)."""
    if n_action_samples is None or n_action_samples == policy.config.n_action_samples:
        return policy
    config = replace(policy.config, n_action_samples=int(n_action_samples))
    copy = type(policy)(policy.observation_space, policy.action_space, config).to(policy.device)
    copy.load_state_dict(policy.state_dict())
    return copy.eval()


def _input_bytes_per_row(policy: PolicyBase, module: ExportablePolicy) -> int:
    """The bytes of one row of the graph's inputs (observations, and the noise and uniform of a
    stochastic export)."""
    history = policy.config.n_obs_steps if policy.config.n_obs_steps > 1 else 1
    inputs = observation_inputs(policy.observation_space)
    dtypes = observation_dtypes(policy.observation_space)
    total = sum(
        history * int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        for (_, shape), dtype in zip(inputs, dtypes, strict=True)
    )
    if module.stochastic:
        total += 4 * policy.config.diffusion_steps * policy.n_candidates(False) * policy.action_dim + 4
    return int(total)


def _example_inputs(
    policy: PolicyBase, module: ExportablePolicy, batch: int | str
) -> tuple[tuple[torch.Tensor, ...], list[str], Any]:
    size = 2 if batch == "dynamic" else int(batch)  # 2, not 1: a size-1 example would be specialised
    inputs = observation_inputs(policy.observation_space)
    dtypes = observation_dtypes(policy.observation_space)
    history = (policy.config.n_obs_steps,) if policy.config.n_obs_steps > 1 else ()
    example = [
        torch.zeros((size, *history, *shape), dtype=dtype, device=policy.device)
        for (_, shape), dtype in zip(inputs, dtypes, strict=True)
    ]
    names = [name for name, _ in inputs]
    if module.stochastic:
        n = policy.n_candidates(False)
        example.append(torch.zeros((size, policy.config.diffusion_steps, n, policy.action_dim), device=policy.device))
        names.append("noise")
        if module.takes_uniform:
            example.append(torch.full((size,), 0.5, device=policy.device))
            names.append("uniform")
    dynamic = None
    if batch == "dynamic":
        dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        dynamic = (tuple({0: dim} for _ in example),)  # forward(*inputs): one entry, the varargs
    return tuple(example), names, dynamic


def _metadata(
    algorithm: str, trained: PolicyBase, policy: PolicyBase, names: list[str], deterministic: bool, batch: int | str
) -> dict[str, Any]:
    """``policy`` is ``trained`` as exported (its own n_action_samples); the digest is of the weights."""
    space = policy.action_space
    metadata: dict[str, Any] = {
        "library": "dql_agent",
        "library_version": library_version(),
        "algorithm": algorithm,
        "weights_sha256": hashlib.sha256(weights_bytes(dict(trained.state_dict()))).hexdigest(),
        "inputs": names,
        "outputs": [OUTPUT],
        "observation_inputs": {name: list(shape) for name, shape in observation_inputs(policy.observation_space)},
        "action_shape": list(space.shape),
        "action_low": np.asarray(space.low, np.float64).ravel().tolist(),
        "action_high": np.asarray(space.high, np.float64).ravel().tolist(),
        "deterministic": deterministic,
        "n_action_samples": policy.n_candidates(deterministic),
        "diffusion_steps": int(policy.config.diffusion_steps),
        # Chunks: the output is (batch, action_horizon, *action_shape) when action_horizon > 1, and
        # every observation input (batch, n_obs_steps, *shape) when n_obs_steps > 1, oldest first.
        "action_horizon": int(policy.config.action_horizon),
        "n_action_steps": int(policy.config.n_action_steps),
        "n_obs_steps": int(policy.config.n_obs_steps),
        "noise_layout": None if deterministic else "(batch, diffusion_steps, n_action_samples, action_dim)",
        "batch": batch,
    }
    if policy.encoder.uses_images:  # per input: key, kind, dtype, shape (and an image's layout and size)
        obs_space = policy.observation_space
        names = [name for name, _ in observation_inputs(obs_space)]
        dtypes = [str(dtype).removeprefix("torch.") for dtype in observation_dtypes(obs_space)]
        metadata["observation_specs"] = [
            # dtype: the input's (a float64 vector Box is fed as float32, like every vector key)
            {"input": name, **spec, "dtype": dtype}
            for name, spec, dtype in zip(names, describe_observation_space(obs_space), dtypes, strict=True)
        ]
    return metadata


__all__ = ["FORMATS", "ExportablePolicy", "export_policy", "observation_dtypes", "observation_inputs", "read_metadata"]
