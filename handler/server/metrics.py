"""Prometheus metrics under TGI's names, so dashboards built for TGI keep working.

Histograms and gauges are plain `prometheus_client` metrics. TGI's counters are exposed under
their exact names (`tgi_request_count`, not `tgi_request_count_total`, which is what
`prometheus_client.Counter` would print): a small collector reports them as untyped samples.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric, UnknownMetricFamily
from prometheus_client.registry import Collector

from handler.generation.request import FinalEvent

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Counts(Collector):
    """Monotonic counts with optional labels, printed under their exact names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Tally[tuple[tuple[str, str], ...]]] = {}
        self._help: dict[str, str] = {}

    def declare(self, name: str, documentation: str) -> None:
        self._help[name] = documentation
        self._counts[name] = Tally()

    def inc(self, name: str, **labels: str) -> None:
        with self._lock:
            self._counts[name][tuple(sorted(labels.items()))] += 1

    def value(self, name: str, **labels: str) -> int:
        with self._lock:
            return self._counts[name][tuple(sorted(labels.items()))]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = {name: dict(tally) for name, tally in self._counts.items()}
        for name, tally in snapshot.items():
            label_names = sorted({key for labels in tally for key, _ in labels})
            family = UnknownMetricFamily(name, self._help[name], labels=label_names)
            if not tally and not label_names:
                family.add_metric([], 0)
            for labels, count in tally.items():
                values = dict(labels)
                family.add_metric([values.get(key, "") for key in label_names], count)
            yield family


class Metrics:
    """Everything `/metrics` reports, in its own registry (tests build several servers)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.counts = _Counts()
        self.counts.declare("tgi_request_count", "Generation requests received")
        self.counts.declare("tgi_request_success", "Generation requests answered")
        self.counts.declare("tgi_request_failure", "Generation requests failed, by error type")
        self.registry.register(self.counts)

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labelnames: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(
                name, doc, labelnames=labelnames, buckets=buckets, registry=self.registry
            )

        self.duration = histogram(
            "tgi_request_duration", "End-to-end request seconds", DURATION_BUCKETS
        )
        self.queue_duration = histogram(
            "tgi_request_queue_duration", "Seconds waiting for a slot", DURATION_BUCKETS
        )
        self.inference_duration = histogram(
            "tgi_request_inference_duration", "Seconds from prefill to the end", DURATION_BUCKETS
        )
        self.time_per_token = histogram(
            "tgi_request_mean_time_per_token_duration",
            "Mean seconds per generated token",
            DURATION_BUCKETS,
        )
        self.input_length = histogram("tgi_request_input_length", "Prompt tokens", TOKEN_BUCKETS)
        self.generated_tokens = histogram(
            "tgi_request_generated_tokens", "Generated tokens", TOKEN_BUCKETS
        )
        self.batch_duration = histogram(
            "tgi_batch_inference_duration",
            "Seconds per model step",
            DURATION_BUCKETS,
            labelnames=("method",),
        )
        self.batch_size = histogram(
            "tgi_batch_inference_size",
            "Requests per model step",
            TOKEN_BUCKETS,
            labelnames=("method",),
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=self.registry)
        self.batch_current_size = Gauge(
            "tgi_batch_current_size", "Requests in the batch", registry=self.registry
        )

    def track(self, queue_size: Callable[[], float], batch_size: Callable[[], float]) -> None:
        """Read the gauges from the generator at scrape time."""
        self.queue_size.set_function(queue_size)
        self.batch_current_size.set_function(batch_size)

    def step(self, method: str, batch_size: int, seconds: float) -> None:
        """Generator callback after each model step."""
        self.batch_duration.labels(method=method).observe(seconds)
        self.batch_size.labels(method=method).observe(batch_size)

    def received(self) -> None:
        self.counts.inc("tgi_request_count")

    def failed(self, error_type: str) -> None:
        self.counts.inc("tgi_request_failure", err=error_type)

    def succeeded(self, total: float, final: FinalEvent) -> None:
        self.counts.inc("tgi_request_success")
        self.duration.observe(total)
        self.queue_duration.observe(final.queue_time)
        self.inference_duration.observe(final.inference_time)
        self.time_per_token.observe(final.inference_time / max(final.generated_tokens, 1))
        self.input_length.observe(final.prompt_tokens)
        self.generated_tokens.observe(final.generated_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
