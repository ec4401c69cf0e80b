"""The gateway's own Prometheus series (its /metrics), on a private registry so that several gateways in one
process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stepaudio2_gateway_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("stepaudio2_gateway_errors", "Error responses by HTTP status", ["status"], registry=r)
        self.latency = Histogram("stepaudio2_gateway_request_seconds", "Request time (to the last byte)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttfa = Histogram("stepaudio2_gateway_time_to_first_audio_seconds",
                              "Request arrival to the first audio byte sent (streamed speech replies)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("stepaudio2_gateway_in_flight", "Requests being forwarded to Triton", registry=r)
        self.cancelled = Counter("stepaudio2_gateway_cancelled", "Triton streams cancelled, by reason",
                                 ["reason"], registry=r)

    def done(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(str(status)).inc()
