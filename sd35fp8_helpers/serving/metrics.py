"""Prometheus metrics of the images API: latency, queue depth, jobs, errors, memory — and, with ``--broker``,
the whole cluster as Redis knows it (jobs by state, every worker's busy time and images, queue-wait and
run-time histograms), so one scrape of any API process shows every GPU.

Every series name is listed in :data:`EXPORTED` (the Grafana dashboard in
``deploy/grafana/sd35fp8-dashboard.json`` may only query those; a test checks it against a live ``/metrics``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..errors import QueueUnavailable
from .config import LATENCY_BUCKETS

if TYPE_CHECKING:  # pragma: no cover
    from .jobstore import JobStore
    from .service import ImageService

API_SERIES = ("sd35fp8_request_duration_seconds", "sd35fp8_images_generated_total", "sd35fp8_errors_total",
              "sd35fp8_queue_depth")
LOCAL_SERIES = ("sd35fp8_jobs_running",)
CLUSTER_SERIES = ("sd35fp8_queue_up", "sd35fp8_queue_jobs", "sd35fp8_queue_jobs_finished_total",
                  "sd35fp8_workers_alive", "sd35fp8_worker_busy_seconds_total", "sd35fp8_worker_images_total",
                  "sd35fp8_worker_jobs_total", "sd35fp8_job_queue_wait_seconds", "sd35fp8_job_run_seconds")
WORKER_SERIES = ("sd35fp8_worker_busy", "sd35fp8_worker_jobs_handled_total", "sd35fp8_worker_job_seconds")
GPU_ONLY_SERIES = ("sd35fp8_gpu_memory_allocated_bytes",)
"""Exported only where CUDA is available (in-process server, GPU workers)."""
EXPORTED = API_SERIES + LOCAL_SERIES + CLUSTER_SERIES + WORKER_SERIES + GPU_ONLY_SERIES
"""Every sd35fp8 series some process exports (histograms by their base name)."""


class Metrics:
    """The Prometheus series, in a registry of their own (two apps in one process never collide).

    ``service`` (the in-process worker) gives queue depth and the running job; ``store`` (with ``--broker``)
    adds :class:`ClusterCollector` instead.
    """

    def __init__(self, service: "ImageService | None" = None, store: "JobStore | None" = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        self.latency = Histogram("sd35fp8_request_duration_seconds", "Time to answer an images request",
                                 ["status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("sd35fp8_images_generated", "Images generated and returned in a synchronous answer",
                              registry=self.registry)
        self.errors = Counter("sd35fp8_errors", "Requests answered with an error, by kind", ["kind"],
                              registry=self.registry)
        if service is not None:
            queue_depth = Gauge("sd35fp8_queue_depth", "Jobs waiting for the worker (the running one excluded)",
                                registry=self.registry)
            queue_depth.set_function(service.queue.qsize)
            running = Gauge("sd35fp8_jobs_running", "Jobs the worker is generating now (0 or 1)",
                            registry=self.registry)
            running.set_function(lambda: int(service.running is not None))
            import torch

            if torch.cuda.is_available():
                gpu = Gauge("sd35fp8_gpu_memory_allocated_bytes", "CUDA memory held by tensors",
                            registry=self.registry)
                gpu.set_function(torch.cuda.memory_allocated)
        if store is not None:
            self.registry.register(ClusterCollector(store))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class ClusterCollector:
    """Reads the queue's numbers from Redis at scrape time. Redis away: ``sd35fp8_queue_up 0`` and nothing
    else (a scrape never hangs and never fails: the outage itself is the metric to alert on)."""

    def __init__(self, store: "JobStore") -> None:
        self.store = store

    def describe(self) -> list:
        return []  # collected at scrape time only (the registry must not call Redis when registering)

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        up = GaugeMetricFamily("sd35fp8_queue_up", "1 when this API process can reach the Redis job queue")
        try:
            counts = self.store.counts()
            workers = self.store.workers()
            stats = self.store.worker_stats()
            histograms = {name: self.store.histogram(name) for name in ("queue_wait", "run")}
        except QueueUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("sd35fp8_queue_depth", "Jobs waiting in the Redis queue for a worker")
        depth.add_metric([], counts["queued"])
        yield depth
        jobs = GaugeMetricFamily("sd35fp8_queue_jobs", "Jobs queued or running now, by state", labels=["state"])
        for state in ("queued", "running"):
            jobs.add_metric([state], counts[state])
        yield jobs
        ended = CounterMetricFamily("sd35fp8_queue_jobs_finished", "Jobs that ended, by final state",
                                    labels=["state"])
        for state in ("done", "failed", "cancelled"):
            ended.add_metric([state], counts[state])
        yield ended
        alive = GaugeMetricFamily("sd35fp8_workers_alive", "Workers heartbeating on this queue")
        alive.add_metric([], len(workers))
        yield alive
        for field, name, doc in (("busy_seconds", "sd35fp8_worker_busy_seconds", "Seconds each worker spent on jobs"),
                                 ("images", "sd35fp8_worker_images", "Images each worker generated"),
                                 ("jobs", "sd35fp8_worker_jobs", "Jobs each worker ended")):
            family = CounterMetricFamily(name, doc, labels=["worker"])
            for worker, values in sorted(stats.items()):
                family.add_metric([worker], values.get(field, 0.0))
            yield family
        for key, name, doc in (("queue_wait", "sd35fp8_job_queue_wait_seconds", "Time from enqueue to a worker starting"),
                               ("run", "sd35fp8_job_run_seconds", "Time a worker spent generating a job")):
            buckets, count, total = histograms[key]
            family = HistogramMetricFamily(name, doc)
            family.add_metric([], [(repr(float(le)), n) for le, n in buckets] + [("+Inf", count)], sum_value=total)
            yield family

