"""A real Redis server on loopback, started and stopped from Python (tests, notebook 06, the queue benchmark).

The job queue needs a Redis server; in production it is a service (``systemctl start redis-server``, a managed
Redis). Here :func:`start_redis` runs Debian's ``redis-server`` as a child process on 127.0.0.1 and a free
port, with its data folder in a temporary directory, so a test or a notebook never touches a Redis someone
else uses. With ``persistence=True`` (the default) every write goes to an append-only file with ``fsync``
before Redis answers (``appendfsync always``): a Redis killed with ``kill -9`` and started again on the same
folder still holds every waiting job — which is what the restart test shows.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import QueueUnavailable, RedisServerMissing

READY_TIMEOUT_S = 15.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningRedis:
    """A ``redis-server`` child process. ``url`` is what ``--broker`` takes; a context manager that stops it."""

    port: int
    dir: Path
    persistence: bool = True
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def command(self) -> list[str]:
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistence else ["--appendonly", "no"]
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", *persist, "--daemonize", "no", "--logfile", str(self.log_path),
                "--protected-mode", "yes"]

    def start(self, ready_timeout: float = READY_TIMEOUT_S) -> "RunningRedis":
        if shutil.which("redis-server") is None:
            raise RedisServerMissing()
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_timeout
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-2:]) \
                    if self.log_path.exists() else "no log"
                self.stop(kill=True)
                raise QueueUnavailable(self.url, f"redis-server did not start: {tail}",
                                       fix=f"read {self.log_path}; is port {self.port} taken?")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        """True when the server answers PING (a raw RESP exchange: no client library needed)."""
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes its append-only file and exits) or, with ``kill``, SIGKILL (a crash)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def restart(self) -> "RunningRedis":
        """Start again on the same port and folder (with persistence, the data comes back)."""
        self.stop()
        return self.start()

    def __enter__(self) -> "RunningRedis":
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


def start_redis(workdir: str | Path | None = None, *, port: int | None = None,
                persistence: bool = True) -> RunningRedis:
    """Start ``redis-server`` on 127.0.0.1 (a free port unless given) with its data in ``workdir`` (a new
    temporary folder unless given); returns once it answers PING. Stopped when the Python process ends.

    Example (skipped where ``redis-server`` is not installed)::

        with start_redis() as redis:
            print(redis.url)        # redis://127.0.0.1:40123/0
    """
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sd35fp8-redis-"))
    folder.mkdir(parents=True, exist_ok=True)
    server = RunningRedis(port or _free_port(), folder, persistence)
    server.start()
    atexit.register(server.stop)
    return server
