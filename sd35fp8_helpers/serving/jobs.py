"""The API side of the Redis job queue (``sd35fp8 serve --broker``): create and enqueue, read, cancel.

Used by both kinds of request :mod:`.app` answers with a broker:

* ``POST /v1/images/generations`` (OpenAI's, synchronous): enqueue, then wait for the job's record to reach a
  final state — cancelled when the client disconnects or ``--timeout`` passes;
* ``POST /v1/images/jobs`` → 202 and an id; ``GET /v1/images/jobs/{id}`` (queued / running with its step /
  done with the images / failed with the error / cancelled); ``DELETE`` cancels it.

Order of checks before anything is enqueued: identity → rate limit (shared through Redis) → the body (size,
JSON, every number in range, against the model the workers registered) → per-identity in-flight cap and queue
size (atomically, with the record's creation). A job is visible only to the identity that created it (another
key gets 404, not a hint that the id exists).
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict
from typing import Any

from ..errors import QueueUnavailable
from ..pipeline.generation import GenerationSettings
from .config import ServeConfig
from .jobstore import JobRecord, JobStore, ServedModel, new_job_id
from .service import KeyBusy, QueueFull

RETRY_AFTER_S = 5


class QueueBackend:
    """What ``serve --broker`` does with Redis and Celery; no HTTP here (the routes are in :mod:`.app`)."""

    def __init__(self, config: ServeConfig) -> None:
        assert config.broker, "QueueBackend needs config.broker"
        self.config = config
        self.broker = config.broker
        self.store = JobStore(config.broker)

    def warm(self) -> None:
        """Build the Celery app and open its broker connection now, so the first request does not pay ~0.3 s
        for it. Best effort: a Redis that is away at start-up is reported per request (503), not here."""
        from .queue import celery_app

        try:
            with celery_app(self.broker).connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
        except Exception:  # noqa: BLE001 - kombu/redis errors differ by version; see the docstring
            pass

    @property
    def safe_url(self) -> str:
        return self.store.safe_url

    def served(self) -> ServedModel | None:
        """The model the workers registered (None: no worker has started on this queue yet)."""
        return self.store.served_model()

    def ready(self) -> dict[str, Any]:
        """For ``/readyz``: Redis reachable, model registered, live workers. Never raises."""
        try:
            served, workers, counts = self.served(), self.store.workers(), self.store.counts()
        except QueueUnavailable as exc:
            return {"ready": False, "broker": self.safe_url, "error": exc.one_line}
        return {"ready": served is not None and bool(workers), "broker": self.safe_url,
                "model": served.model if served else None, "precision": served.precision if served else None,
                "workers": len(workers), "queued": counts["queued"], "running": counts["running"]}

    def rate_wait(self, identity: str) -> int:
        """0, or whole seconds until ``identity`` may send again (token bucket in Redis, shared by every API)."""
        if self.config.rate_per_min <= 0:
            return 0
        burst = self.config.burst or max(1, math.ceil(self.config.rate_per_min))
        wait = self.store.rate_wait(identity, self.config.rate_per_min, burst)
        return 0 if wait == 0 else max(1, math.ceil(wait))

    def submit(self, settings: list[GenerationSettings], *, identity: str, request_id: str) -> str:
        """Create the job's record (caps checked atomically), then publish its message. Returns the job id.

        Raises :class:`~.service.KeyBusy`, :class:`~.service.QueueFull` or
        :class:`~sd35fp8_helpers.errors.QueueUnavailable`.
        """
        job_id = new_job_id()
        outcome = self.store.create(job_id, [asdict(s) for s in settings], identity=identity, request_id=request_id,
                                    max_in_flight=self.config.in_flight_cap, max_queued=self.config.queue_size,
                                    result_ttl=self.config.result_ttl_s)
        if outcome == "key_busy":
            raise KeyBusy(RETRY_AFTER_S, self.config.in_flight_cap)
        if outcome == "queue_full":
            raise QueueFull(RETRY_AFTER_S)
        try:
            from .queue import enqueue

            enqueue(self.broker, job_id)
        except Exception as exc:  # noqa: BLE001 - kombu/redis connection errors differ by version
            try:  # best effort: the record must not wait for a message that was never sent
                self.store.finish(job_id, "failed", "", error="could not be enqueued", error_code="queue_unavailable")
            except QueueUnavailable:
                pass
            raise QueueUnavailable(self.safe_url, f"publishing the job failed: {type(exc).__name__}") from None
        return job_id

    def record(self, job_id: str, identity: str) -> JobRecord | None:
        """The job, if it exists and belongs to ``identity`` (else None: the caller answers 404)."""
        record = self.store.get(job_id)
        return record if record is not None and record.identity == identity else None

    def cancel(self, job_id: str, reason: str) -> str:
        return self.store.cancel(job_id, reason)

    def images(self, record: JobRecord) -> list[dict[str, Any]]:
        """``[{"b64_json", "seed"}]`` of a done job (OpenAI's ``data`` items), in order."""
        pngs = self.store.results(record.id)
        return [{"b64_json": base64.b64encode(png).decode(), "seed": s.get("seed")}
                for png, s in zip(pngs, record.settings)]

    def job_json(self, record: JobRecord) -> dict[str, Any]:
        """The body of ``GET /v1/images/jobs/{id}``."""
        body = record.public()
        if record.state == "done":
            body["data"] = self.images(record)
        elif record.state in ("failed", "cancelled"):
            body["error"] = {"message": record.error or record.state, "code": record.error_code or record.state}
        return body
