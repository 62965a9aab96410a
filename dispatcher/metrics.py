"""Prometheus metrics, one registry per app so tests and embedded uses never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events_accepted = Counter(
            "snaphook_events_accepted_total",
            "Hook events accepted into the journal.",
            ["type"],
            registry=self.registry,
        )
        self.events_duplicate = Counter(
            "snaphook_events_duplicate_total",
            "Events whose (source, id) was already journaled; answered from the existing run.",
            registry=self.registry,
        )
        self.events_rejected = Counter(
            "snaphook_events_rejected_total",
            "Requests or events rejected, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.runs = Counter(
            "snaphook_runs_total",
            "Runs that reached a final state, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.step_duration = Histogram(
            "snaphook_step_duration_seconds",
            "Duration of step attempts, by function and result.",
            ["function", "result"],
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 1800),
            registry=self.registry,
        )
        self.open_leases = Gauge(
            "snaphook_open_leases",
            "Freeze leases not yet released.",
            registry=self.registry,
        )
        self.lease_release_failures = Counter(
            "snaphook_lease_release_failures_total",
            "Lease releases that failed after retries (a database may still be frozen).",
            registry=self.registry,
        )
        self.replies = Counter(
            "snaphook_replies_total",
            "Reply events sent to the sink, by result.",
            ["result"],
            registry=self.registry,
        )
