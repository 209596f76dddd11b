"""Prometheus metrics of one service.

Names follow Prometheus conventions (`_seconds`, `_total`). The three series the Go
tsnsrv exports are kept under their old names too, so existing dashboards work:
`tsnsrv_request_duration_ns` (a summary with sum and count; quantiles come from the
`tsnsrv_request_duration_seconds` histogram), `tsnsrv_response_status_classes` and
`tsnsrv_proxy_errors`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class GoCompatibleCollector:
    """Exposes the Go tsnsrv's series under their exact names."""

    def __init__(self) -> None:
        self.duration_ns_sum = 0.0
        self.duration_count = 0
        self.status_classes: dict[str, int] = {}
        self.proxy_errors = 0

    def collect(self):
        summary = Metric("tsnsrv_request_duration_ns", "Duration of requests served", "summary")
        summary.add_sample("tsnsrv_request_duration_ns_sum", {}, self.duration_ns_sum)
        summary.add_sample("tsnsrv_request_duration_ns_count", {}, self.duration_count)
        # Declared untyped: prometheus_client would name a counter family "<name>_total",
        # which no longer matches the Go tsnsrv's sample names that dashboards query.
        classes = Metric("tsnsrv_response_status_classes", "Responses by status code class (1xx, etc)", "unknown")
        for status_class, count in sorted(self.status_classes.items()):
            classes.add_sample("tsnsrv_response_status_classes", {"status_code_class": status_class}, count)
        errors = Metric("tsnsrv_proxy_errors", "Number of errors encountered proxying requests", "unknown")
        errors.add_sample("tsnsrv_proxy_errors", {}, self.proxy_errors)
        return [summary, classes, errors]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.go = GoCompatibleCollector()
        r.register(self.go)
        self.request_duration = Histogram("tsnsrv_request_duration_seconds",
                                          "Time from request headers to the end of the response",
                                          ["source"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests_in_flight = Gauge("tsnsrv_requests_in_flight", "Requests being proxied now", registry=r)
        self.responses = Counter("tsnsrv_responses", "Responses sent, by status class and client kind",
                                 ["status_class", "source"], registry=r)
        self.upstream_connect = Histogram("tsnsrv_upstream_connect_duration_seconds",
                                          "Time to open a new connection to the upstream",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_response = Histogram("tsnsrv_upstream_response_header_duration_seconds",
                                           "Time from sending a request upstream to its response headers",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("tsnsrv_upstream_errors", "Failed upstream exchanges, by kind",
                                       ["kind"], registry=r)
        self.bytes_from_clients = Counter("tsnsrv_request_bytes", "Body bytes received from clients", registry=r)
        self.bytes_to_clients = Counter("tsnsrv_response_bytes", "Body bytes sent to clients", registry=r)
        self.websockets_open = Gauge("tsnsrv_websocket_sessions_open", "Proxied websocket sessions now open",
                                     registry=r)
        self.websockets = Counter("tsnsrv_websocket_sessions", "Proxied websocket sessions", registry=r)
        self.denied = Counter("tsnsrv_denied_requests", "Requests refused by tsnsrv itself, by reason",
                              ["reason"], registry=r)
        self.whois = Counter("tsnsrv_whois_lookups", "Client identity lookups, by result", ["result"], registry=r)
        self.refused_connections = Counter("tsnsrv_refused_front_connections",
                                           "Front listener connections refused (not from tailscaled, bad PROXY "
                                           "header, wrong client kind)", ["reason"], registry=r)
        self.loopback_refusals = Gauge("tsnsrv_loopback_refusals",
                                       "Connects and binds of the spawned tailscaled to host loopback that were "
                                       "refused since start", registry=r)
        self.certificate_expiry = Gauge("tsnsrv_certificate_expiry_timestamp_seconds",
                                        "Expiry time of the TLS certificate being served", registry=r)
        self.node_running = Gauge("tsnsrv_node_running", "1 while the node is Running on the tailnet", registry=r)
        self.tailscaled_restarts = Counter("tsnsrv_tailscaled_restarts", "Restarts of the spawned tailscaled",
                                           registry=r)
        # (responses, request_duration) children per label set, for observe_response
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe_response(self, status: int, source: str, seconds: float) -> None:
        status_class = f"{status // 100}xx"
        children = self._children.get((status_class, source))
        if children is None:  # labels() takes a lock and builds a key on every call: once per label set
            children = self._children[(status_class, source)] = (self.responses.labels(status_class, source),
                                                                 self.request_duration.labels(source))
        children[0].inc()
        children[1].observe(seconds)
        go = self.go
        go.duration_ns_sum += seconds * 1e9
        go.duration_count += 1
        go.status_classes[status_class] = go.status_classes.get(status_class, 0) + 1

    def upstream_failed(self, kind: str) -> None:
        self.upstream_errors.labels(kind).inc()
        self.go.proxy_errors += 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
