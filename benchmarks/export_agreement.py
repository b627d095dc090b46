"""How often the exported ONNX graph picks the candidate ``predict`` picks, and what decides when not.

``predict(obs, deterministic=True)`` and the deterministic ONNX graph run the same math on the same
fixed noise: N candidates through the reverse chain, scored by the critics, the argmax kept. Their
float rounding differs (PyTorch's kernels against ONNX Runtime's), so two candidates whose Q values
are within rounding of each other can be ordered differently: the graph then returns another
candidate, a different action. This script counts that, one observation per call as a control loop
runs it, over the states of a dataset:

- ``same_pick``: the fraction of observations for which the graph returns the candidate
  ``predict`` picks (the graph's action is matched to the nearest of predict's candidates);
- for those, the largest action difference (rounding through the chain);
- for the others, the Q gap between predict's pick and the graph's pick under predict's own
  scores (how close to a tie the decision was) and the action difference it makes.

Run on the demo's model and dataset (``make demo`` first, or pass --model/--dataset)::

    OMP_NUM_THREADS=1 python -m benchmarks.export_agreement --model dql_demo/model \\
        --dataset dql_agent/pendulum/mixed-v0 --minari-root dql_demo/datasets --n 1000

Needs the deploy extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine


def dataset_states(dataset: str, n: int, seed: int) -> np.ndarray:
    """``n`` observations drawn without replacement from a Minari dataset (or a D4RL-style file)."""
    from dql_agent.registry import load_buffer

    buffer = load_buffer(dataset)
    observations = np.asarray(buffer.observations)
    rows = np.random.default_rng(seed).choice(len(observations), size=min(n, len(observations)), replace=False)
    return observations[np.sort(rows)].astype(np.float32)


def candidates_and_q(model: Any, observation: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """predict's candidates for one observation (in the action Box), their Q and the argmax."""
    from dql_agent.spaces import unscale_actions

    policy = model.policy
    with torch.no_grad():
        x = policy.normalize_observations(torch.as_tensor(observation[None], device=policy.device))
        candidates, q = policy.score_candidates(x, policy.deterministic_noise_for(1))
    q = q[0].cpu().numpy().astype(np.float64)
    actions = unscale_actions(candidates.cpu().numpy(), policy.action_space)
    return actions.reshape(len(q), -1), q, int(np.argmax(q))


def measure(model: Any, onnx_path: str, observations: np.ndarray, threads: int) -> dict[str, Any]:
    """Compare the graph with predict, one observation per call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    same, same_diffs, gaps, flip_diffs, predict_diffs = 0, [], [], [], []
    for obs in observations:
        graph = session.run(["action"], {"observation": obs[None]})[0][0].reshape(-1)
        action = np.asarray(model.predict(obs, deterministic=True)[0], np.float64).reshape(-1)
        candidates, q, best = candidates_and_q(model, obs)
        predict_diffs.append(float(np.max(np.abs(action - candidates[best]))))  # predict is its own argmax
        picked = int(np.argmin(np.max(np.abs(candidates - graph), axis=1)))
        diff = float(np.max(np.abs(graph - action)))
        if picked == best:
            same += 1
            same_diffs.append(diff)
        else:
            gaps.append(float(q[best] - q[picked]))
            flip_diffs.append(diff)
    n = len(observations)
    return {
        "observations": n,
        "same_pick": same / n,
        "same_pick_count": same,
        "max_action_diff_same_pick": max(same_diffs, default=0.0),
        "other_pick_count": n - same,
        "q_gap_other_pick": {
            "max": max(gaps, default=None),
            "median": float(np.median(gaps)) if gaps else None,
            "all": sorted(gaps),
        },
        "action_diff_other_pick": {"max": max(flip_diffs, default=None), "all": sorted(flip_diffs)},
        "predict_vs_own_argmax_max_diff": max(predict_diffs),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a saved model (folder or .zip)")
    p.add_argument("--dataset", required=True, help="Minari id or .npz/.hdf5 whose states are compared")
    p.add_argument("--minari-root", help="MINARI_DATASETS_PATH for --dataset")
    p.add_argument("--n", type=int, default=1000, help="observations (drawn from the dataset without replacement)")
    p.add_argument("--seed", type=int, default=0, help="which observations")
    p.add_argument("--ort-threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.minari_root:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(args.minari_root).resolve())

    from dql_agent import load_from_hub

    model = load_from_hub(args.model, device="cpu")
    observations = dataset_states(args.dataset, args.n, args.seed)
    start = time.time()
    with tempfile.TemporaryDirectory() as folder:
        path = model.export(Path(folder) / "policy.onnx")
        result = {
            "machine": machine(threads=torch.get_num_threads()),
            "model": args.model,
            "dataset": args.dataset,
            "n_action_samples": int(model.config.n_action_samples),
            **measure(model, path, observations, args.ort_threads),
        }
    result["seconds"] = time.time() - start
    shown = {k: v for k, v in result.items() if k not in ("q_gap_other_pick", "action_diff_other_pick")}
    shown["q_gap_other_pick"] = {k: v for k, v in result["q_gap_other_pick"].items() if k != "all"}
    shown["action_diff_other_pick_max"] = result["action_diff_other_pick"]["max"]
    print(json.dumps(shown, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
