"""The Celery app of the job queue, configured once: Redis as broker, one task, settings chosen for a GPU.

Why Celery + Redis instead of our own loop: delivery, acknowledgement, re-delivery after a crash, reconnects
and worker processes are what Celery does for a living; a home-made scheduler would re-learn every one of its
bugs. Our part is small: the job *records* (:mod:`.jobstore`) and one task, :func:`render`, a plain function.

The settings, and why (``celery_app``):

* ``worker_concurrency=1``, ``worker_prefetch_multiplier=1``, solo pool: a GPU runs one generation well and two
  badly, and a worker must not hoard jobs another GPU could start now.
* ``task_acks_late=True``, ``task_reject_on_worker_lost=True``: a message is acknowledged only after its job
  ended, so a worker that dies mid-job (OOM killer, ``kill -9``, a reboot) leaves it unacknowledged. The Redis
  transport puts it back on the queue ``visibility_timeout`` seconds after it was delivered (swept every
  second here), and another worker takes it: re-delivered, never lost. Re-delivery may happen to a job that
  is still running (a job longer than the visibility timeout) — the lease in :mod:`.jobstore` makes that a
  no-op, so the timeout is a latency/duplicate-work trade-off, never a correctness one.
* ``task_acks_on_failure_or_timeout=False``: when storing a result fails (Redis away longer than the worker
  waits), the message stays unacknowledged and the job is re-delivered rather than dropped.
* ``task_ignore_result=True``: results live in our job records (with their TTL and progress), not in a second
  result backend.
* JSON only (``accept_content``): a pickled message from a stranger on the broker would be code execution.

Messages carry nothing but the job id: the settings are in ``job:{id}``, so a message is never the only copy.
"""

from __future__ import annotations

import functools
from typing import Any

QUEUE_NAME = "sd35fp8"
TASK_NAME = "sd35fp8.render"
DEFAULT_VISIBILITY_TIMEOUT_S = 60.0
"""Seconds after delivery an unacknowledged message goes back on the queue: the longest a crashed worker's
job waits before another worker starts it again (plus the lease, :data:`~.jobstore.DEFAULT_LEASE_S`)."""


def celery_config(broker_url: str, *, visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S) -> dict[str, Any]:
    """Every Celery setting of the queue, in one place (see the module docstring for the reasons).

    Example:
        >>> cfg = celery_config("redis://127.0.0.1:6379/0", visibility_timeout_s=30)
        >>> cfg["task_acks_late"], cfg["worker_prefetch_multiplier"], cfg["broker_transport_options"]["visibility_timeout"]
        (True, 1, 30)
    """
    return {
        "broker_url": broker_url,
        "task_default_queue": QUEUE_NAME,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": False,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "worker_enable_remote_control": False,
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker waits for Redis to come back, however long
        "broker_connection_timeout": 2,
        # Redis lost mid-job: let the job finish (its worker waits for Redis to store the result) instead of
        # cancelling it; the lease makes a re-delivery of the same job a no-op.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_publish_retry": False,  # the API answers 503 at once instead of retrying a publish for seconds
        "broker_transport_options": {
            "visibility_timeout": visibility_timeout_s,
            "unacked_restore_interval": 1,  # look for abandoned messages every second …
            "unacked_restore_throttle": 1,  # … really every second
            "socket_timeout": 5,
            "socket_connect_timeout": 2,
            "health_check_interval": 5,
        },
    }


@functools.lru_cache(maxsize=8)
def celery_app(broker_url: str, visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S):
    """The Celery app for ``broker_url`` (one per process and URL), with :func:`render` registered."""
    from celery import Celery

    app = Celery("sd35fp8", set_as_current=False)
    app.conf.update(celery_config(broker_url, visibility_timeout_s=visibility_timeout_s))
    app.task(name=TASK_NAME, bind=True, acks_late=True, max_retries=None)(render)
    return app


_WORKER: list[Any] = []  # the QueueWorker of this process (``sd35fp8 worker`` sets it once warm)


def set_current_worker(worker: Any) -> None:
    """Make ``worker`` (a :class:`~.worker.QueueWorker`) the one :func:`render` runs jobs on."""
    _WORKER[:] = [worker]


def render(task, job_id: str) -> str:
    """The one task: run job ``job_id`` on this process's worker (see :meth:`.worker.QueueWorker.run_job`).

    A plain function; Celery passes itself as ``task`` (``bind=True``) so a job whose lease another live
    worker holds can be retried later instead of dropped.
    """
    if not _WORKER:
        raise RuntimeError("no sd35fp8 worker in this process: start one with `sd35fp8 worker --broker URL`")
    outcome, retry_in = _WORKER[0].run_job(job_id)
    if retry_in is not None:
        raise task.retry(countdown=retry_in)
    return outcome


def enqueue(broker_url: str, job_id: str) -> None:
    """Publish the message for ``job_id`` (its record must exist). The Celery task id is the job id."""
    celery_app(broker_url).send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=QUEUE_NAME, retry=False)
