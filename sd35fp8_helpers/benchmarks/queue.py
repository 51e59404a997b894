"""Benchmark: the Redis job queue vs the in-process server — throughput, overhead per job, latency split.

Starts everything for real on 127.0.0.1: ``redis-server`` (append-only file, ``fsync always``: the setting
the restart test relies on), ``sd35fp8 worker`` processes (1 torch thread each) and ``sd35fp8 serve`` with
and without ``--broker``, all on the same model. Measures:

* **overhead per job**: ``--sequential`` requests one after another on ``POST /v1/images/generations``
  (OpenAI's synchronous endpoint), in-process server vs queue + 1 worker; the difference of the median
  latencies is what the queue costs a job (Redis round trips, Celery delivery, polling);
* **throughput**: ``--burst`` jobs submitted at once on the jobs API, with 1 and then 2 workers; jobs/min
  from the first submit to the last result;
* **latency split** of those jobs, from their records: queue wait (enqueue → a worker starts) and run time
  (the worker's generation), p50 and p95.

On a CPU the absolute numbers are the tiny model's, and more workers than cores cannot scale; the overhead in
ms is the transferable figure. Run::

    python -m sd35fp8_helpers.benchmarks.queue --runs 3 --json docs/benchmarks/queue-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from typing import Any

from ..versions import library_versions


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _sequential(url: str, body: dict[str, Any], n: int) -> list[float]:
    import httpx

    out = []
    with httpx.Client(timeout=120) as http:
        http.post(f"{url}/v1/images/generations", json=body).raise_for_status()  # warm: connections, caches
        for i in range(n):
            start = time.perf_counter()
            r = http.post(f"{url}/v1/images/generations", json={**body, "seed": i})
            r.raise_for_status()
            out.append(time.perf_counter() - start)
    return out


def _burst(url: str, store, body: dict[str, Any], n: int) -> dict[str, Any]:
    import httpx

    start = time.perf_counter()
    with httpx.Client(timeout=60) as http:
        ids = [http.post(f"{url}/v1/images/jobs", json={**body, "seed": i}).json()["id"] for i in range(n)]
    while True:
        records = store.get_many(ids)
        if all(r is not None and r.final for r in records.values()):
            break
        time.sleep(0.02)
    wall = max(r.finished for r in records.values()) - min(r.created for r in records.values())
    waits = [r.queue_wait_s for r in records.values()]
    runs = [r.run_s for r in records.values()]
    return {"jobs": n, "done": sum(r.state == "done" for r in records.values()), "wall_s": round(wall, 3),
            "client_wall_s": round(time.perf_counter() - start, 3), "jobs_per_min": round(60 * n / wall, 1),
            "queue_wait_p50_s": round(_pct(waits, 0.5), 4), "queue_wait_p95_s": round(_pct(waits, 0.95), 4),
            "run_p50_s": round(_pct(runs, 0.5), 4), "run_p95_s": round(_pct(runs, 0.95), 4),
            "per_worker": {w: sum(r.worker == w for r in records.values()) for w in sorted({r.worker for r in records.values()})}}


def run(model: str = "tiny", size: int = 64, steps: int = 4, sequential: int = 20, burst: int = 40) -> dict[str, Any]:
    from ..serving.client import start_server, start_worker
    from ..serving.jobstore import JobStore
    from ..serving.redis_server import start_redis

    body = {"prompt": "a lighthouse at dusk", "size": f"{size}x{size}", "steps": steps}
    env = {"OMP_NUM_THREADS": "1"}
    common = ["--no-auth", "--rate", "0"]
    results: dict[str, Any] = {}
    with start_server(model, args=[*common, "--queue-size", "64"], env=env) as local:
        inproc = _sequential(local.url, body, sequential)
    with start_redis() as redis:
        store = JobStore(redis.url)
        workers = [start_worker(redis.url, model, name="w1", args=["--threads", "1"], env=env)]
        try:
            with start_server(model, args=[*common, "--broker", redis.url], env=env) as api:
                queued = _sequential(api.url, body, sequential)
                results["one_worker"] = _burst(api.url, store, body, burst)
                workers.append(start_worker(redis.url, model, name="w2", args=["--threads", "1"], env=env))
                results["two_workers"] = _burst(api.url, store, body, burst)
        finally:
            for w in workers:
                w.stop()
    results["sequential"] = {
        "requests": sequential,
        "in_process_p50_ms": round(1000 * statistics.median(inproc), 1),
        "in_process_p95_ms": round(1000 * _pct(inproc, 0.95), 1),
        "queue_p50_ms": round(1000 * statistics.median(queued), 1),
        "queue_p95_ms": round(1000 * _pct(queued, 0.95), 1),
        "overhead_p50_ms": round(1000 * (statistics.median(queued) - statistics.median(inproc)), 1),
    }
    return results


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-number medians over runs (non-numbers, e.g. jobs per worker, from the last run)."""
    out: dict[str, Any] = {}
    for key, value in runs[-1].items():
        if isinstance(value, dict):
            out[key] = _median([r[key] for r in runs])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = round(statistics.median(r[key] for r in runs), 4)
        else:
            out[key] = value
    return out


def table(results: dict[str, Any]) -> str:
    s, one, two = results["sequential"], results["one_worker"], results["two_workers"]
    rows = [
        "| measurement | 1 worker | 2 workers |",
        "|---|---|---|",
        f"| jobs/min ({one['jobs']} jobs submitted at once) | {one['jobs_per_min']} | {two['jobs_per_min']} |",
        f"| queue wait p50 / p95 (s) | {one['queue_wait_p50_s']} / {one['queue_wait_p95_s']} | "
        f"{two['queue_wait_p50_s']} / {two['queue_wait_p95_s']} |",
        f"| run time p50 / p95 (s) | {one['run_p50_s']} / {one['run_p95_s']} | {two['run_p50_s']} / {two['run_p95_s']} |",
        f"| jobs per worker | {one['per_worker']} | {two['per_worker']} |",
        "",
        "| one request at a time (synchronous endpoint) | p50 ms | p95 ms |",
        "|---|---|---|",
        f"| in-process server | {s['in_process_p50_ms']} | {s['in_process_p95_ms']} |",
        f"| queue (Redis + Celery) + 1 worker | {s['queue_p50_ms']} | {s['queue_p95_ms']} |",
        f"| **queue overhead per job** | **{s['overhead_p50_ms']}** | |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sequential", type=int, default=20)
    parser.add_argument("--burst", type=int, default=40)
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole measurement; the table shows medians")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    runs = []
    for _ in range(args.runs):
        runs.append(run(args.model, args.size, args.steps, args.sequential, args.burst))
        runs[-1]["load_average_1min"] = round(os.getloadavg()[0], 2)
    results = _median(runs)
    results["runs"] = runs
    results["setup"] = {
        "machine": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), no GPU; "
                   "the cores are shared with other work, so throughput is noisy",
        "model": args.model, "size": f"{args.size}x{args.size}", "steps": args.steps,
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "torch_threads_per_process": 1, "redis": "append-only file, appendfsync always",
        "date": date.today().isoformat(), "python": platform.python_version(),
        "versions": {**library_versions(), **{n: _version(n) for n in ("celery", "kombu", "redis")},
                     "redis-server": _redis_server_version()},
        "command": "python -m sd35fp8_helpers.benchmarks.queue " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        print(f"written to {args.json}")
    return 0


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _redis_server_version() -> str:
    import subprocess

    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    return next((w.removeprefix("v=") for w in out.split() if w.startswith("v=")), out.strip())


if __name__ == "__main__":
    sys.exit(main())
