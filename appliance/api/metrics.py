"""Prometheus metrics of one app, in their own registry (no process-global state)."""

from __future__ import annotations

from collections import Counter as TagCounter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "appliance_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "appliance_errors_total", "Error responses by code", ["code"], registry=r
        )
        self.images = Counter(
            "appliance_images_total", "Images processed by outcome", ["status"], registry=r
        )
        self.faces = Counter("appliance_faces_detected_total", "Faces detected", registry=r)
        self.batch_size = Histogram(
            "appliance_batch_size",
            "Items per backend call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "appliance_batch_duration_seconds",
            "Backend time per batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_calls = Counter(
            "appliance_backend_calls_total", "Backend calls", ["model"], registry=r
        )
        self.batch_items = Counter(
            "appliance_batch_items_total",
            "Items run, by where they came from",
            ["model", "source"],
            registry=r,
        )
        self.submissions = Counter(
            "appliance_batch_submissions_total",
            "Submissions to a batcher: items queued together (one request's crops are one)",
            ["model", "source"],
            registry=r,
        )
        self.mixed_batches = Counter(
            "appliance_mixed_batches_total",
            "Batches that mixed work from several sources (REST and streams)",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "appliance_queue_depth", "Items waiting in a batcher", ["model"], registry=r
        )
        # The adaptive sessions' inputs (`backends.cores`, `pipeline.batcher.Demand`).
        self.analyses = Gauge(
            "appliance_analyses_in_progress",
            "Requests and stream frames being analysed now",
            registry=r,
        )
        self.cores_in_use = Gauge(
            "appliance_model_cores_in_use",
            "CPU cores held by model runs now (ONNX Runtime's adaptive sessions)",
            registry=r,
        )
        self.queue_rejections = Counter(
            "appliance_queue_rejections_total",
            "Work refused because a queue was full",
            ["model"],
            registry=r,
        )

        # Decoded pixels held now (MAX_PIXELS_IN_FLIGHT); refusals are counted in
        # appliance_queue_rejections_total{model="decode"}.
        self.pixels_in_flight = Gauge(
            "appliance_pixels_in_flight",
            "Decoded image pixels held by requests and streams",
            registry=r,
        )
        self.pixels_capacity = Gauge(
            "appliance_pixels_in_flight_limit", "MAX_PIXELS_IN_FLIGHT", registry=r
        )

    def observe_batch(self, model: str, tags: list[str], seconds: float) -> None:
        self.batch_size.labels(model).observe(len(tags))
        self.batch_seconds.labels(model).observe(seconds)
        self.backend_calls.labels(model).inc()
        counts = TagCounter(tags)
        for source, n in counts.items():
            self.batch_items.labels(model, source or "unknown").inc(n)
        if len(counts) > 1:
            self.mixed_batches.labels(model).inc()

    def observe_submission(self, model: str, tag: str) -> None:
        self.submissions.labels(model, tag or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StreamMetrics:
    """Stream counters, registered in the app's own Prometheus registry."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.active = Gauge("appliance_streams_active", "Open live streams", registry=r)
        self.frames = Counter(
            "appliance_stream_frames_total",
            "Stream frames by outcome (processed, replaced, over_fps, busy, bad)",
            ["outcome"],
            registry=r,
        )
        self.results_dropped = Counter(
            "appliance_stream_results_dropped_total",
            "Results discarded because the client did not read them",
            registry=r,
        )
        self.closed = Counter(
            "appliance_streams_closed_total", "Streams closed, by close code", ["code"], registry=r
        )
        self.in_analysis = Gauge(
            "appliance_stream_frames_in_analysis",
            "Stream frames between taking a slot and their result, all streams",
            registry=r,
        )
        self.slots = Gauge(
            "appliance_stream_frame_slots", "Stream frames allowed in analysis at once", registry=r
        )
        self.latency = Histogram(
            "appliance_stream_latency_seconds",
            "Frame received to result queued",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
