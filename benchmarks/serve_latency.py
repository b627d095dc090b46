"""The policy server's cost (issue 29): latency added over in-process ``predict``, and throughput.

- **Added latency**: one observation per call, one client, on loopback. Each round times
  ``model.predict(obs, deterministic=True)`` in this process and ``RemotePolicy.predict`` on the
  same observation against a server process (``python -m dql_agent.server``), interleaved, on the
  same model; the table gives both distributions' p50 and p99 and their difference.
- **Throughput**: 1, 4 and 16 concurrent clients (each a separate process, as robots would be), each
  sending one observation per call as fast as answers come, for ``--seconds``; total actions per
  second, and the mean rows per ``predict`` call the server's dynamic batching made; against a
  ``--batching merge`` and an ``exact`` server, interleaved, the median of ``--repeats`` runs.
- **Batch invariance**: how far merged batches' actions are from row-by-row ``predict`` (the
  answers ``batching="exact"`` gives), on ``--invariance-rows`` random observations.

    OMP_NUM_THREADS=1 python -m benchmarks.serve_latency              # an untrained default-size Pendulum model
    OMP_NUM_THREADS=1 python -m benchmarks.serve_latency --model dql_demo/model
    python -m benchmarks.serve_latency --model DIR --url ws://gpu-box:8765 --token-file token   # a running server

The server and the in-process model use one torch thread (``--threads``); the default model is
DiffusionQL with the library's default networks (3 x 256, T = 5, 50 candidates) for Pendulum's
spaces, untrained: acting costs the same with any weights.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CLIENT = """
import sys, time
import numpy as np
from dql_agent.remote import RemotePolicy

url, token, seconds = sys.argv[1], sys.argv[2] or None, float(sys.argv[3])
policy = RemotePolicy(url, token=token, timeout=60)
rng = np.random.default_rng(int(sys.argv[4]))
obs = rng.uniform([-1, -1, -8], [1, 1, 8], size=(64, 3)).astype(np.float32)
policy.predict(obs[0], deterministic=True)
print("ready", flush=True)
sys.stdin.readline()  # go
count, end = 0, time.perf_counter() + seconds
while time.perf_counter() < end:
    policy.predict(obs[count % 64], deterministic=True)
    count += 1
print(count, flush=True)
"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def start_server(model_dir: Path, token: str, batching: str, threads: int, max_delay_ms: float) -> tuple[Any, str]:
    command = [sys.executable, "-m", "dql_agent.server", str(model_dir), "--port", "0", "--device", "cpu"]
    command += ["--threads", str(threads), "--batching", batching, "--max-delay-ms", str(max_delay_ms)]
    token_file = tempfile.NamedTemporaryFile("w", suffix=".token", delete=False)
    token_file.write(token)
    token_file.close()
    process = subprocess.Popen(command + ["--token-file", token_file.name], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        ready = selector.select(120)
    line = process.stdout.readline() if ready else ""
    os.unlink(token_file.name)
    found = re.search(r" at (wss?://[^\s;]+)", line)
    if found is None:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, found.group(1)


def latency(model: Any, url: str, token: str | None, requests: int) -> dict[str, float]:
    from dql_agent.remote import RemotePolicy

    rng = np.random.default_rng(0)
    obs = rng.uniform([-1, -1, -8], [1, 1, 8], size=(requests, 3)).astype(np.float32)
    local, remote = [], []
    with RemotePolicy(url, token=token) as policy:
        for i in range(min(50, requests)):  # warm-up both paths
            model.predict(obs[i], deterministic=True)
            policy.predict(obs[i], deterministic=True)
        before = policy.health()
        for i in range(requests):
            started = time.perf_counter()
            model.predict(obs[i], deterministic=True)
            middle = time.perf_counter()
            policy.predict(obs[i], deterministic=True)
            local.append(middle - started)
            remote.append(time.perf_counter() - middle)
        after = policy.health()
    ms = 1000.0
    server_predict = (after["predict_seconds"] - before["predict_seconds"]) / (
        after["predict_calls"] - before["predict_calls"]
    )
    return {
        "local_mean": ms * statistics.fmean(local),
        "server_predict_mean": ms * server_predict,  # model.predict inside the server: the rest is transport
        "local_p50": ms * percentile(local, 50),
        "local_p99": ms * percentile(local, 99),
        "remote_p50": ms * percentile(remote, 50),
        "remote_p99": ms * percentile(remote, 99),
        "added_p50": ms * (percentile(remote, 50) - percentile(local, 50)),
        "added_p99": ms * (percentile(remote, 99) - percentile(local, 99)),
    }


def throughput(url: str, token: str | None, clients: int, seconds: float) -> dict[str, float]:
    from dql_agent.remote import RemotePolicy

    with RemotePolicy(url, token=token) as probe:
        before = probe.health()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, url, token or "", str(seconds), str(i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(clients)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a client did not start")
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        counts = [int(process.communicate(timeout=seconds + 60)[0].strip()) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    with RemotePolicy(url, token=token) as probe:
        after = probe.health()
    calls = after["predict_calls"] - before["predict_calls"]
    return {
        "actions_per_s": sum(counts) / seconds,
        "rows_per_predict": (after["rows"] - before["rows"]) / max(calls, 1),
    }


def invariance(model: Any, rows: int) -> list[dict[str, float]]:
    """Actions of merged batches of B rows against each row's own predict."""
    rng = np.random.default_rng(1)
    obs = rng.uniform([-1, -1, -8], [1, 1, 8], size=(rows, 3)).astype(np.float32)
    alone = np.stack([model.predict(o[None], deterministic=True)[0][0] for o in obs])
    out = []
    for size in (2, 4, 16, 64):
        merged = np.concatenate([model.predict(obs[i : i + size], deterministic=True)[0] for i in range(0, rows, size)])
        differ = np.any(merged != alone, axis=1)
        out.append(
            {
                "batch": size,
                "rows_differing": int(differ.sum()),
                "max_abs_diff": float(np.max(np.abs(merged - alone))),
                "rows": rows,
            }
        )
    return out


def default_model(folder: Path) -> Path:
    import gymnasium as gym

    from dql_agent import DiffusionQL

    env = gym.make("Pendulum-v1")
    model = DiffusionQL(observation_space=env.observation_space, action_space=env.action_space, seed=0, device="cpu")
    model.save(folder / "model")
    return folder / "model"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved Pendulum model (default: an untrained default-size DiffusionQL)")
    parser.add_argument("--url", help="a running server of that model (default: start one per batching mode)")
    parser.add_argument("--token-file", help="its token (with --url)")
    parser.add_argument("--requests", type=int, default=2000, help="latency samples")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 4, 16], help="client counts (none: latency only)")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per setting (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of this process")
    parser.add_argument("--max-delay-ms", type=float, default=2.0, help="the server's batching window")
    parser.add_argument("--invariance-rows", type=int, default=256)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    import dql_agent
    from benchmarks.common import machine

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else default_model(Path(tmp))
        model = dql_agent.load_from_hub(model_dir, device="cpu")
        results: dict[str, Any] = {
            "machine": machine(torch.device("cpu"), args.threads),
            "load_average_before": os.getloadavg(),
            "model": str(args.model or "untrained default-size DiffusionQL, Pendulum-v1 spaces"),
            "throughput": {},
        }
        if args.url:
            token = Path(args.token_file).read_text().splitlines()[0].strip() if args.token_file else None
            modes = {"server": (None, args.url)}
        else:
            token = secrets.token_urlsafe(32)
            modes = {
                mode: start_server(model_dir, token, mode, args.threads, args.max_delay_ms)
                for mode in ("merge", "exact")
            }
        try:
            first_url = next(iter(modes.values()))[1]
            results["latency"] = latency(model, first_url, token, args.requests)
            # Modes interleaved and repeated (median): the load of a shared machine drifts.
            runs: dict[str, dict[int, list[dict[str, float]]]] = {m: {n: [] for n in args.clients} for m in modes}
            for _ in range(args.repeats):
                for n in args.clients:
                    for mode, (_, url) in modes.items():
                        runs[mode][n].append(throughput(url, token, n, args.seconds))
            for mode in modes:
                results["throughput"][mode] = {
                    n: {key: statistics.median(r[key] for r in runs[mode][n]) for key in runs[mode][n][0]}
                    for n in args.clients
                }
        finally:
            for process, _ in modes.values():
                if process is not None:
                    process.terminate()
                    process.wait(10)
        results["invariance"] = invariance(model, args.invariance_rows)
        results["load_average_after"] = os.getloadavg()

    lat = results["latency"]
    host = results["machine"]
    print(
        f"\n{results['model']}; {host['cpu']}, {host['cores_visible']} cores, torch {host['torch']}, "
        f"{host['torch_threads']} torch thread(s); loopback; load average {results['load_average_before'][0]:.2f} "
        f"before, {results['load_average_after'][0]:.2f} after\n"
    )
    print("| one observation, one client | p50 (ms) | p99 (ms) |")
    print("|---|---|---|")
    print(f"| in-process `model.predict` | {lat['local_p50']:.3f} | {lat['local_p99']:.3f} |")
    print(f"| `RemotePolicy.predict` | {lat['remote_p50']:.3f} | {lat['remote_p99']:.3f} |")
    print(f"| added latency | {lat['added_p50']:.3f} | {lat['added_p99']:.3f} |")
    print(
        f"\nmean `model.predict`: {lat['local_mean']:.3f} ms in this process, {lat['server_predict_mean']:.3f} ms "
        "in the server's worker thread (the rest of the added latency is transport, encoding and checks)"
    )
    modes_run = list(results["throughput"])
    print("\n| clients | " + " | ".join(f"{m}: actions/s (rows per predict)" for m in modes_run) + " |")
    print("|---" * (1 + len(modes_run)) + "|")
    for n in args.clients:
        measured = [results["throughput"][m][n] for m in modes_run]
        cells = [f"{run['actions_per_s']:.0f} ({run['rows_per_predict']:.1f})" for run in measured]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\n| merged batch of | rows whose action differs from row-by-row predict | max abs difference |")
    print("|---|---|---|")
    for row in results["invariance"]:
        print(f"| {row['batch']} | {row['rows_differing']} of {row['rows']} | {row['max_abs_diff']:.3g} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
