"""`chiptag serve`'s Prometheus metrics (GET /metrics, text format 0.0.4), every name prefixed `chiptag_`.

    chiptag_requests_total{endpoint,status}         HTTP requests answered
    chiptag_request_duration_seconds{endpoint}      latency histogram (first byte in -> last byte out)
    chiptag_images_total{outcome}                   images in /v1/predict: tagged | error
    chiptag_batch_size                              images per forward (histogram)
    chiptag_queue_depth                             images waiting for a forward
    chiptag_requests_in_flight                      requests being served
    chiptag_model_load_seconds                      checkpoint load + engine build + warm-up forward

With --workers N every process writes its samples to the folder in PROMETHEUS_MULTIPROC_DIR (serve sets it
before prometheus_client is first imported: the library picks its value store at import) and /metrics, in
whichever worker answers, sums them all (prometheus_client.multiprocess). Otherwise each Service keeps its own
registry, so several servers in one process (the tests) never share counters.
"""

from __future__ import annotations

import os

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ENDPOINTS = {"/", "/healthz", "/readyz", "/metrics", "/v1/model", "/v1/predict"}


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chiptag_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("chiptag_request_duration_seconds", "request latency, by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("chiptag_images", "images received by /v1/predict, by outcome (tagged, error)",
                              ["outcome"], registry=r)
        self.batch_size = Histogram("chiptag_batch_size", "images per forward (concurrent requests merged)",
                                    buckets=BATCH_BUCKETS, registry=r)
        # livesum: the sum over the processes alive now (a dead worker's last value does not linger)
        self.queue_depth = Gauge("chiptag_queue_depth", "images waiting for a forward", registry=r,
                                 multiprocess_mode="livesum")
        self.in_flight = Gauge("chiptag_requests_in_flight", "requests being served", registry=r,
                               multiprocess_mode="livesum")
        self.model_load = Gauge("chiptag_model_load_seconds", "seconds to load the checkpoint, build the engine and "
                                "run the warm-up forward", registry=r, multiprocess_mode="max")

    @staticmethod
    def endpoint(path: str) -> str:
        """The label for a path: the app's routes by name, anything else as `other` (a label per probed URL
        would grow the series without bound)."""
        return path if path in ENDPOINTS else "other"

    def answered(self, path: str, status: int, seconds: float) -> None:
        endpoint = self.endpoint(path)
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    # the batcher's Monitor
    def queued(self, delta: int) -> None:
        self.queue_depth.inc(delta)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def exposition(self) -> tuple[bytes, str]:
        """-> (body, content type) of every metric, all processes summed in multiprocess mode."""
        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            CollectorRegistry,
            generate_latest,
        )
        from prometheus_client.multiprocess import MultiProcessCollector

        if not multiprocess():
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
