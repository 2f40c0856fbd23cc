"""Every Prometheus metric of puller, defined once, named `puller_*`."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

RUN_DURATION_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
_SCOPE = ("tenant", "scope")


@dataclass
class Metrics:
    """The worker's metrics on their own registry (one per worker, so tests stay apart)."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self.pages = Counter("puller_pages_fetched", "Pages fetched and applied.", _SCOPE,
                             registry=r)
        self.records = Counter("puller_records", "Records by outcome: accepted, rejected, stale.",
                               (*_SCOPE, "outcome"), registry=r)
        self.http_errors = Counter("puller_http_errors",
                                   "Failed callback requests by HTTP status or transport error.",
                                   (*_SCOPE, "status"), registry=r)
        self.retries = Counter("puller_retries", "Callback requests retried.", _SCOPE, registry=r)
        self.runs = Counter("puller_runs", "Finished runs by status.", (*_SCOPE, "status"),
                            registry=r)
        self.run_duration = Histogram("puller_run_duration_seconds", "Run duration.",
                                      (*_SCOPE, "status"), buckets=RUN_DURATION_BUCKETS_S,
                                      registry=r)
        self.last_success = Gauge("puller_last_success_timestamp_seconds",
                                  "Unix time of the last successful run.", _SCOPE, registry=r)
        self.consecutive_failures = Gauge("puller_consecutive_failures",
                                          "Failed runs in a row (0 after a success).", _SCOPE,
                                          registry=r)
        self.in_flight = Gauge("puller_runs_in_flight", "Runs in progress.", registry=r)
        self.acks_failed = Counter("puller_acks_failed", "Delivery acknowledgements that failed.",
                                   _SCOPE, registry=r)
        self.fetch_process_up = Gauge(
            "puller_fetch_process_up",
            "1 while `run --fetch-process`'s fetch process serves the worker; 0 without it, "
            "or until a new one replaces one that died (the worker fetches in its own "
            "process meanwhile).", registry=r)

    def render(self) -> bytes:
        """The text exposition format for /metrics."""
        return generate_latest(self.registry)
