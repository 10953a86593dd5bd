"""Prometheus metrics of one service (prometheus-client, a registry of its own).

A registry per service rather than the library's global one, so that two services in one
process (the tests start several) never share counts, and /metrics shows only the service's
own series: requests by outcome, request latency, batch sizes before and after padding, the
frames waiting for a batch and the frames in progress.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The outcome label of each answer, by HTTP status.
OUTCOMES = {200: "ok", 400: "bad_request", 401: "unauthorized", 404: "not_found",
            413: "too_large", 415: "unsupported_type", 422: "undecodable",
            503: "unavailable", 504: "timeout", 500: "error"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, batch_sizes: tuple[int, ...], queued: Callable[[], int],
                 reserved: Callable[[], int]):
        disable_created_metrics()  # `_created` timestamps only double the series shown
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fmsd_serve_requests", "Scoring requests answered, by outcome",
                                ["outcome"], registry=r)
        for outcome in dict.fromkeys(OUTCOMES.values()):
            self.requests.labels(outcome)  # every series exists from the start, at 0
        self.latency = Histogram("fmsd_serve_request_seconds", "Time from the request's "
                                 "arrival to its answer (scoring requests)", ["outcome"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        for outcome in dict.fromkeys(OUTCOMES.values()):
            self.latency.labels(outcome)
        buckets = tuple(sorted(set(batch_sizes)))
        self.batch_frames = Histogram("fmsd_serve_batch_frames", "Frames of requests in each "
                                      "device batch", buckets=buckets, registry=r)
        self.batch_padded = Histogram("fmsd_serve_batch_padded_size", "Compiled batch size "
                                      "each device batch ran at", buckets=buckets, registry=r)
        queue = Gauge("fmsd_serve_queue_frames", "Frames waiting for a device batch",
                      registry=r)
        queue.set_function(queued)
        held = Gauge("fmsd_serve_reserved_frames", "Frames of admitted requests not yet "
                     "answered (bounded by serve.queue_frames)", registry=r)
        held.set_function(reserved)
        self.ready = Gauge("fmsd_serve_ready", "1 once the model is loaded and every batch "
                           "size compiled", registry=r)

    def observe_batch(self, frames: int, padded: int) -> None:
        self.batch_frames.observe(frames)
        self.batch_padded.observe(padded)

    def answered(self, status: int, seconds: float) -> None:
        outcome = OUTCOMES.get(status, "error")
        self.requests.labels(outcome).inc()
        self.latency.labels(outcome).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
