"""Every Prometheus metric of the service, in one place, on an injected `CollectorRegistry` (never the default
registry at import: that breeds "Duplicated timeseries" in tests). Names follow Prometheus conventions:
`conceptlens_` prefix, base units, `_total` for counters, bounded label values (methods and served model names
are finite; concept labels come from the manifests of served models and are capped).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
EPS_BUCKETS = (1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255, 1.0)
MAX_CONCEPTS = 512  # concept-hit label values kept per process; further concepts count as "other"


class Metrics:
    """The service's collectors. Build one per server with its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "conceptlens_requests", "RPCs finished, by method, model and status code",
            ("method", "model", "code"), registry=r)
        self.latency = Histogram(
            "conceptlens_request_duration_seconds", "RPC latency as seen by the server",
            ("method", "model"), buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "conceptlens_queue_depth", "Requests waiting in a batching queue", ("model", "method"), registry=r)
        self.batch_size = Histogram(
            "conceptlens_batch_size", "Images per executed batch", ("model", "method"),
            buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram(
            "conceptlens_inference_duration_seconds", "Backend time per executed batch",
            ("model", "backend"), buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter(
            "conceptlens_rejected_requests", "Requests refused by admission (reason inflight: the method's limit of "
            "calls in flight; would_miss_deadline: could not start before its deadline; queue_full) or dropped in "
            "the queue (deadline: it passed while queued; cancelled)", ("model", "method", "reason"), registry=r)
        self.inflight = Gauge(
            "conceptlens_requests_in_flight", "Admitted calls of a limited method not finished yet", ("method",),
            registry=r)
        self.model_loaded = Gauge(
            "conceptlens_model_loaded", "1 while some version of the model is serving", ("model",), registry=r)
        self.model_version = Gauge(
            "conceptlens_model_version", "Latest version serving", ("model",), registry=r)
        self.load_failures = Counter(
            "conceptlens_model_load_failures", "Bundles refused at load or reload", ("model",), registry=r)
        self.probe_flips = Counter(
            "conceptlens_probe_flips", "Probed images whose prediction flipped", ("model",), registry=r)
        self.flip_epsilon = Histogram(
            "conceptlens_probe_flip_epsilon", "Minimal flipping epsilon in [0,1] pixel units", ("model",),
            buckets=EPS_BUCKETS, registry=r)
        self.probes = Counter(
            "conceptlens_probes", "Probed images by attack kind and outcome (flipped, robust), and failed probe "
            "calls by their status (deadline_exceeded, resource_exhausted, invalid_argument, ...)",
            ("model", "kind", "outcome"), registry=r)
        self.probe_duration = Histogram(
            "conceptlens_probe_duration_seconds", "Attack and tracing time of one probe request", ("model", "kind"),
            buckets=LATENCY_BUCKETS, registry=r)
        self.adversarial_flags = Counter(
            "conceptlens_adversarial_flags", "Explanations flagged implausible", ("model",), registry=r)
        self.concept_hits = Counter(
            "conceptlens_concept_hits", "Concepts among the top units of explanations", ("model", "concept"),
            registry=r)
        self._concepts: set[str] = set()
        self._concept_children: dict[tuple[str, str], Counter] = {}

    def concept_hit(self, model: str, concept: str, count: int = 1) -> None:
        """Count a concept `count` times, keeping the label set bounded. The labelled child is cached: Explain
        counts several concepts per image, and `labels()` costs microseconds each time."""
        child = self._concept_children.get((model, concept))
        if child is None:
            if concept not in self._concepts and len(self._concepts) >= MAX_CONCEPTS:
                self.concept_hits.labels(model, "other").inc(count)  # not cached: the cache stays bounded too
                return
            self._concepts.add(concept)
            child = self._concept_children[(model, concept)] = self.concept_hits.labels(model, concept)
        child.inc(count)

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> object:
        """Expose this registry on http://addr:port/metrics; returns the server (call `.shutdown()`)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
