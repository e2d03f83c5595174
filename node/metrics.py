"""Prometheus metrics of one node (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tee_node_requests", "Requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "tee_node_request_duration_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "tee_node_time_to_first_token_seconds",
            "Time from request arrival to the first sealed stream event",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("tee_node_tokens", "Tokens processed", ["kind"], registry=r)
        # Children made once per label value: labels() costs more than the count it leads to.
        self.prompt_tokens = self.tokens.labels("prompt")
        self.completion_tokens = self.tokens.labels("completion")
        self._answered: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.refusals = Counter("tee_node_refusals", "Refused requests by reason", ["reason"], registry=r)
        self.key_epoch = Gauge("tee_node_key_epoch", "Current X25519 key epoch", registry=r)
        self.key_rotations = Counter("tee_node_key_rotations", "Key rotations", registry=r)
        self.in_flight = Gauge("tee_node_in_flight", "Requests holding an engine slot", registry=r)
        self.queued = Gauge("tee_node_queued", "Requests waiting for a slot", registry=r)
        self.tokens_issued = Counter("tee_node_privacy_pass_issued", "Privacy Pass tokens issued", registry=r)
        self.tokens_redeemed = Counter("tee_node_privacy_pass_redeemed", "Privacy Pass tokens redeemed", registry=r)
        self.stream_events = Counter("tee_node_stream_events", "Sealed stream events sent", registry=r)
        self.engine_ready = Gauge("tee_node_engine_ready", "1 when the engine can serve", registry=r)
        self.images = Counter("tee_node_images", "Images generated", registry=r)
        self.image_seconds = Histogram(
            "tee_node_image_request_seconds",
            "Time the engine took for one image request (all its images)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_running = Gauge("tee_node_engine_running", "Requests the engine still holds", registry=r)

    def answered(self, route: str, status: int, seconds: float) -> None:
        """One answered request: its count by route and status, its latency by route."""
        children = self._answered.get((route, status))
        if children is None:  # routes and statuses are few: the cache stays small
            children = self._answered[(route, status)] = (self.requests.labels(route, str(status)), self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
