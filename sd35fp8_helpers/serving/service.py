"""The in-process job queue: one worker thread owns the pipeline behind a bounded queue.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import Sd35fp8Error
from ..pipeline.generation import GenerationSettings
from .config import ServeConfig
from .engine import ImageEngine, JobCancelled
from .logs import log_event, request_id_var
from .metrics import Metrics


@dataclass
class Job:
    """One accepted request: its settings, a future for the worker's answer, and a cancel flag."""

    settings: list[GenerationSettings]
    request_id: str
    key: str
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str = ""

    def cancel(self, reason: str) -> None:
        self.reason = reason
        self.cancelled.set()


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after


class KeyBusy(QueueFull):
    """The key already has ``cap`` jobs queued or running (the per-key in-flight cap)."""

    def __init__(self, retry_after: int, cap: int) -> None:
        super().__init__(retry_after)
        self.cap = cap


class ImageService:
    """One worker thread that owns the engine, fed by a bounded queue.

    ``queue_size`` jobs may wait while one runs; :meth:`submit` raises :class:`QueueFull` beyond that. The
    worker loads the pipeline first (``ready`` turns True), then takes jobs one at a time.
    """

    def __init__(self, engine: ImageEngine, config: ServeConfig, *,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.config = config
        self.metrics: Metrics | None = None  # set by create_app (the gauges read this service)
        self.on_fatal = on_fatal
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=config.queue_size)
        self.ready = False
        self.load_error: BaseException | None = None
        self.running: Job | None = None
        self._job_seconds = 1.0  # moving average, for Retry-After
        self._in_flight: collections.Counter[str] = collections.Counter()  # key -> jobs queued or running
        self._in_flight_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sd35fp8-gpu-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job and every waiting one; end the worker."""
        if self.running is not None:
            self.running.cancel("server_stopping")
        with contextlib.suppress(queue.Empty):
            while True:
                job = self.queue.get_nowait()
                if job is not None:
                    job.cancel("server_stopping")
                    job.future.set_exception(JobCancelled())
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``, or raise :class:`KeyBusy` (its key is at the in-flight cap) / :class:`QueueFull`."""
        cap = self.config.in_flight_cap
        with self._in_flight_lock:
            if self._in_flight[job.key] >= cap:
                raise KeyBusy(max(1, math.ceil(self._job_seconds)), cap)
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(max(1, math.ceil(self._job_seconds * (self.queue.qsize() + 1)))) from None
            self._in_flight[job.key] += 1
        job.future.add_done_callback(lambda _f: self._release(job.key))

    def _release(self, key: str) -> None:
        with self._in_flight_lock:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]  # bounded: only keys with work in flight are kept

    def _run(self) -> None:
        try:
            self.engine.pipeline()  # the one load, in this thread, while /healthz already answers
            self.ready = True
            log_event("model_loaded", model=self.engine.model, precision=self.engine.precision,
                 device=str(self.engine.device))
        except BaseException as exc:  # noqa: BLE001 - reported, then the server is told to exit
            self.load_error = exc
            log_event("model_load_failed", level=logging.ERROR, error_type=type(exc).__name__,
                 error=exc.one_line if isinstance(exc, Sd35fp8Error) else "see the server's stderr")
            if self.on_fatal:
                self.on_fatal(exc)
            return
        while (job := self.queue.get()) is not None:
            self._do(job)

    def _do(self, job: Job) -> None:
        token = request_id_var.set(job.request_id)
        self.running = job
        start = time.perf_counter()
        try:
            if job.cancelled.is_set():
                raise JobCancelled()
            results = self.engine.render(job.settings, should_stop=job.cancelled.is_set)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the request that caused it
            if is_oom(exc):
                from ..memory.strategies import free_memory

                free_memory()
            job.future.set_exception(exc)
            log_event("job_failed", error_type=type(exc).__name__, reason=job.reason or None,
                 seconds=round(time.perf_counter() - start, 3))
        else:
            seconds = time.perf_counter() - start
            self._job_seconds = 0.7 * self._job_seconds + 0.3 * seconds
            if self.metrics:
                self.metrics.images.inc(len(results))
            job.future.set_result(results)
            s = job.settings[0]
            log_event("generated", key=job.key, n=len(results), size=f"{s.width}x{s.height}", steps=s.steps,
                 seconds=round(seconds, 3), **({"prompt": s.prompt} if self.config.log_prompts else {}))
        finally:
            self.running = None
            request_id_var.reset(token)


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


