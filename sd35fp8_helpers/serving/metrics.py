"""Prometheus metrics of the images API (latency, queue depth, jobs, errors, memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import LATENCY_BUCKETS

if TYPE_CHECKING:  # pragma: no cover
    from .service import ImageService

# --- metrics -------------------------------------------------------------------------------------------------

class Metrics:
    """The Prometheus series, in a registry of their own (two apps in one process never collide)."""

    def __init__(self, service: "ImageService") -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            ProcessCollector,
        )

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        self.latency = Histogram("sd35fp8_request_duration_seconds", "Time to answer an images request",
                                 ["status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("sd35fp8_images_generated", "Images generated and returned",
                              registry=self.registry)
        self.errors = Counter("sd35fp8_errors", "Requests answered with an error, by kind", ["kind"],
                              registry=self.registry)
        queue_depth = Gauge("sd35fp8_queue_depth", "Jobs waiting for the worker (the running one excluded)",
                            registry=self.registry)
        queue_depth.set_function(service.queue.qsize)
        running = Gauge("sd35fp8_jobs_running", "Jobs the worker is generating now (0 or 1)", registry=self.registry)
        running.set_function(lambda: int(service.running is not None))
        import torch

        if torch.cuda.is_available():
            gpu = Gauge("sd35fp8_gpu_memory_allocated_bytes", "CUDA memory held by tensors",
                        registry=self.registry)
            gpu.set_function(torch.cuda.memory_allocated)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


