"""The client side of ``sd35fp8 serve``: start it in the background, read its answers, metrics and logs.

Notebook 06 and the tests talk to a *real* server — a ``sd35fp8 serve`` subprocess on 127.0.0.1 — because
the things that go wrong with model servers (a key in a log, a queue that never says no, a client that
leaves work behind) only show up over real HTTP. :func:`start_server` starts one on a free port, writes the
API keys *hashed* to a temporary keys file (as in production), and returns once ``/readyz`` says the model
is loaded; :meth:`RunningServer.stop` (or leaving a ``with`` block, or the interpreter exiting) ends it.

Example:
    >>> import httpx
    >>> from sd35fp8_helpers.serving.auth import new_api_key
    >>> key = new_api_key()
    >>> with start_server("tiny", api_keys={"me": key}) as server:
    ...     r = httpx.post(f"{server.url}/v1/images/generations", headers={"Authorization": f"Bearer {key}"},
    ...                    json={"prompt": "a fox", "size": "64x64", "steps": 2})
    ...     decode_images(r.json())[0].size
    (64, 64)
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import DEFAULT_MODEL
from ..errors import ServerStartFailed

READY_TIMEOUT_S = 180.0
"""How long :func:`start_server` waits for ``/readyz``: a real SD3.5 model takes 30–90 s to load."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class _ChildProcess:
    """A ``sd35fp8`` subprocess writing JSON log lines to a file; a context manager that stops it."""

    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines, parsed (other lines, e.g. library warnings, skipped)."""
        events = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                if isinstance(obj := json.loads(line), dict):
                    events.append(obj)
        return events

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for the graceful shutdown, SIGKILL if it does not come. Returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


@dataclass
class RunningServer(_ChildProcess):
    """A ``sd35fp8 serve`` subprocess started by :func:`start_server` (``stop()`` returns -15 after a graceful
    shutdown: uvicorn re-raises the signal it caught)."""

    url: str = ""


def start_server(model: str = DEFAULT_MODEL, *, api_keys: dict[str, str] | None = None, args: Sequence[str] = (),
                 port: int | None = None, ready_timeout: float = READY_TIMEOUT_S,
                 env: dict[str, str] | None = None) -> RunningServer:
    """Start ``sd35fp8 serve`` on 127.0.0.1 (a free port) and wait until ``/readyz`` answers 200.

    ``api_keys`` (label → key) are written hashed to a temporary keys file; ``args`` are more
    ``sd35fp8 serve`` options (``["--queue-size", "1"]``). Output goes to a log file (:meth:`RunningServer.logs`),
    so a chatty server never blocks on a full pipe. A server that exits or is not ready in time is stopped and
    :class:`~sd35fp8_helpers.errors.ServerStartFailed` quotes its last log lines.
    """
    import httpx

    from .auth import hash_api_key

    workdir = Path(tempfile.mkdtemp(prefix="sd35fp8-serve-"))
    port = port or free_port()
    command = [sys.executable, "-m", "sd35fp8_helpers.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), *args]
    if api_keys:
        keys_file = workdir / "keys.txt"
        keys_file.write_text("".join(hash_api_key(k, label).line() + "\n" for label, k in api_keys.items()))
        command += ["--keys-file", str(keys_file)]
    log_path = workdir / "server.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = RunningServer(process, log_path, url=f"http://127.0.0.1:{port}")
    atexit.register(server.stop)  # a notebook kernel that ends early still leaves no server behind
    deadline = time.monotonic() + ready_timeout
    try:
        while True:
            if process.poll() is not None:
                tail = " | ".join(server.logs().strip().splitlines()[-3:])
                raise ServerStartFailed(f"sd35fp8 serve exited with code {process.returncode} before it was "
                                        f"ready: {tail}", fix=f"read the whole log: {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    return server
            if time.monotonic() > deadline:
                raise ServerStartFailed(f"sd35fp8 serve was not ready after {ready_timeout:.0f} s",
                                        fix=f"read its log: {log_path}")
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise


@dataclass
class RunningWorker(_ChildProcess):
    """A ``sd35fp8 worker`` subprocess started by :func:`start_worker`; a context manager that stops it."""

    name: str = ""

    def kill(self) -> None:
        """``kill -9``: no warm shutdown, no goodbye to Redis — what a crash looks like to the queue."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (Celery's warm shutdown: the running job finishes first), SIGKILL if it does not end."""
        return super().stop(timeout)


def start_worker(broker: str, model: str = DEFAULT_MODEL, *, name: str | None = None, args: Sequence[str] = (),
                 ready_timeout: float = READY_TIMEOUT_S, env: dict[str, str] | None = None,
                 wait: bool = True) -> RunningWorker:
    """Start ``sd35fp8 worker --broker BROKER --model MODEL`` and (with ``wait``) return once it has loaded,
    warmed up and registered with the queue. ``args`` are more ``sd35fp8 worker`` options (``["--threads",
    "1"]``). :class:`~sd35fp8_helpers.errors.ServerStartFailed` quotes its last log lines if it exits first.

    Example (with :func:`~sd35fp8_helpers.serving.redis_server.start_redis`)::

        with start_redis() as redis, start_worker(redis.url, name="gpu0") as worker:
            ...   # jobs sent to redis.url now run on this worker
    """
    workdir = Path(tempfile.mkdtemp(prefix="sd35fp8-worker-"))
    name = name or f"worker-{workdir.name.rsplit('-', 1)[-1]}"
    command = [sys.executable, "-m", "sd35fp8_helpers.cli", "worker", "--broker", broker, "--model", model,
               "--name", name, *args]
    log_path = workdir / "worker.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    worker = RunningWorker(process, log_path, name=name)
    atexit.register(worker.stop)
    if wait:
        try:
            wait_for_workers(broker, [worker], ready_timeout)
        except BaseException:
            worker.stop()
            raise
    return worker


def wait_for_workers(broker: str, workers: Sequence[RunningWorker],
                     timeout: float = READY_TIMEOUT_S) -> dict[str, dict[str, str]]:
    """Wait until every worker has loaded, warmed up and connected to the queue (they start in parallel: start
    them with ``wait=False``, then call this). Returns what each registered (pid, device, model, state …);
    :class:`~sd35fp8_helpers.errors.ServerStartFailed` with its last log lines if one exits first."""
    from .jobstore import JobStore

    store = JobStore(broker)
    deadline = time.monotonic() + timeout
    while True:
        for w in workers:
            if w.process.poll() is not None:
                tail = " | ".join(w.logs().strip().splitlines()[-3:])
                raise ServerStartFailed(f"sd35fp8 worker {w.name} exited with code {w.process.returncode} before "
                                        f"it was ready: {tail}", fix=f"read the whole log: {w.log_path}")
        with contextlib.suppress(Exception):
            live = store.workers()
            if all(live.get(w.name, {}).get("state") in ("ready", "busy") for w in workers):
                return {w.name: live[w.name] for w in workers}
        if time.monotonic() > deadline:
            raise ServerStartFailed(f"sd35fp8 worker(s) not ready after {timeout:.0f} s",
                                    fix="read their logs: " + ", ".join(str(w.log_path) for w in workers))
        time.sleep(0.2)


@contextlib.contextmanager
def serve_in_background(model: str = DEFAULT_MODEL, **options: Any) -> Iterator[RunningServer]:
    """:func:`start_server` as a ``with`` block: the server is stopped however the block ends."""
    server = start_server(model, **options)
    try:
        yield server
    finally:
        server.stop()


def decode_images(body: dict[str, Any]) -> list:
    """The PIL images of an images-API answer (``data[].b64_json``), in order."""
    from PIL import Image

    images = []
    for item in body["data"]:
        with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as img:
            img.load()
            images.append(img.copy())
    return images


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?P<labels>\{[^}]*\})? (?P<value>\S+)$")


def read_metrics(url: str, prefix: str = "sd35fp8_") -> dict[str, float]:
    """``/metrics`` as ``{"name{labels}": value}`` for series starting with ``prefix`` (histogram buckets and
    ``_created`` timestamps left out: they are for Prometheus, not for reading)."""
    import httpx

    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = _SAMPLE.match(line)
        if m and m["name"].startswith(prefix) and not m["name"].endswith(("_bucket", "_created")):
            found[m["name"] + (m["labels"] or "")] = float(m["value"])
    return found


def describe(response) -> dict[str, Any]:
    """One row for a table: status, the error code and message (if any), Retry-After and the request id."""
    try:
        error = response.json().get("error") or {}
    except ValueError:
        error = {}
    return {"status": response.status_code, "code": error.get("code", ""), "message": error.get("message", ""),
            "Retry-After": response.headers.get("retry-after", ""),
            "X-Request-ID": response.headers.get("x-request-id", "")}
