"""Prometheus metrics of the proxy, in a registry of their own (one per proxy instance)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Added latency is sub-millisecond when healthy; request latency spans up to minutes.
_ADDED_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RATIO_BUCKETS = (1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16, 32, 64)


@dataclass(slots=True)
class RouteMetrics:
    """Label children of one route, resolved once (``labels()`` is costly per request)."""

    metrics: ProxyMetrics
    route: str
    request_seconds: Histogram
    upstream_seconds: Histogram
    added_seconds: Histogram
    _by_status: dict[int, Counter] = field(default_factory=dict)

    def answered(self, status: int) -> None:
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = self.metrics.requests.labels(
                self.route, str(status)
            )
        counter.inc()


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "trieflow_proxy_requests_total",
            "Agent requests answered, by route and HTTP status",
            ["route", "status"],
            registry=r,
        )
        self.errors = Counter(
            "trieflow_proxy_errors_total",
            "Failed or unrecorded agent requests, by route and kind",
            ["route", "kind"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "trieflow_proxy_request_duration_seconds",
            "Time from request received to response finished",
            ["route"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "trieflow_proxy_upstream_duration_seconds",
            "Time from forwarding to the last upstream byte",
            ["route"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.added_seconds = Histogram(
            "trieflow_proxy_added_latency_seconds",
            "Latency the proxy adds: total minus upstream time minus time held for updates",
            ["route"],
            buckets=_ADDED_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "trieflow_proxy_tokens_captured_total",
            "Tokens recorded, by kind (prompt or completion)",
            ["kind"],
            registry=r,
        )
        self.trajectories = Gauge(
            "trieflow_proxy_trajectories",
            "Trajectories by state (active, ready, delivered)",
            ["state"],
            registry=r,
        )
        self.trajectories_finished = Counter(
            "trieflow_proxy_trajectories_finished_total",
            "Finished trajectories, by outcome",
            ["outcome"],
            registry=r,
        )
        self.trajectories_acked = Counter(
            "trieflow_proxy_trajectories_acked_total",
            "Trajectories the trainer acknowledged",
            registry=r,
        )
        self.dedup_ratio = Histogram(
            "trieflow_proxy_tree_dedup_ratio",
            "Flat tokens / unique tokens of finished trees",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.paused = Gauge("trieflow_proxy_paused", "1 while agent requests are held", registry=r)
        self.paused_seconds = Counter(
            "trieflow_proxy_paused_seconds_total", "Time spent paused", registry=r
        )
        self.held_requests = Gauge(
            "trieflow_proxy_held_requests", "Agent requests waiting for resume", registry=r
        )
        self.in_flight = Gauge(
            "trieflow_proxy_in_flight_requests", "Agent requests forwarded upstream", registry=r
        )
        self.weight_version = Gauge(
            "trieflow_proxy_weight_version", "Weight version the replicas serve", registry=r
        )
        self.weight_updates = Counter(
            "trieflow_proxy_weight_updates_total",
            "Weight updates, by result",
            ["result"],
            registry=r,
        )
        self.stale_episodes = Counter(
            "trieflow_proxy_stale_episodes_total",
            "Finished episodes older than the staleness bound (served, never dropped)",
            registry=r,
        )
        self.admission_rejected = Counter(
            "trieflow_proxy_admission_rejected_total",
            "Episodes refused at admission, by reason",
            ["reason"],
            registry=r,
        )
        self.wal_bytes = Gauge(
            "trieflow_proxy_wal_bytes", "Bytes in the write-ahead log", registry=r
        )
        self.replica_healthy = Gauge(
            "trieflow_proxy_replica_healthy",
            "1 when the replica takes traffic",
            ["replica"],
            registry=r,
        )
        self.failovers = Counter(
            "trieflow_proxy_failovers_total",
            "Requests retried on another replica after a connection failure",
            registry=r,
        )

        self.prompt_tokens = self.tokens.labels("prompt")
        self.completion_tokens = self.tokens.labels("completion")
        self._routes: dict[str, RouteMetrics] = {}

    def route(self, route: str) -> RouteMetrics:
        found = self._routes.get(route)
        if found is None:
            found = self._routes[route] = RouteMetrics(
                self,
                route,
                self.request_seconds.labels(route),
                self.upstream_seconds.labels(route),
                self.added_seconds.labels(route),
            )
        return found
