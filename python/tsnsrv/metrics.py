"""Prometheus metrics of one service (prometheus-client, in a registry of its own).

Names follow Prometheus conventions (`_seconds`, `_total`). The three series the Go
tsnsrv exports are kept under their old names too, so existing dashboards work:
`tsnsrv_request_duration_ns` (a summary with sum and count; quantiles come from the
`tsnsrv_request_duration_seconds` histogram), `tsnsrv_response_status_classes` and
`tsnsrv_proxy_errors`. The process collector adds `process_resident_memory_bytes` and
`process_open_fds`, which the soak run watches for growth.
"""

from __future__ import annotations

from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import Metric, SummaryMetricFamily, UntypedMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# `_created` samples would double every counter's series for a timestamp nobody graphs.
prometheus_client.disable_created_metrics()


class _GoTsnsrvSeries(Collector):
    """The Go tsnsrv's series, under the sample names its users' dashboards query."""

    def __init__(self) -> None:
        self.duration_ns_sum = 0.0
        self.duration_count = 0
        self.status_classes: dict[str, int] = {}
        self.proxy_errors = 0

    def collect(self) -> Iterator[Metric]:
        yield SummaryMetricFamily("tsnsrv_request_duration_ns", "Duration of requests served",
                                  count_value=self.duration_count, sum_value=self.duration_ns_sum)
        classes = UntypedMetricFamily("tsnsrv_response_status_classes", "Responses by status code class (1xx, etc)",
                                      labels=["status_code_class"])
        for status_class, count in sorted(self.status_classes.items()):
            classes.add_metric([status_class], count)
        yield classes
        yield UntypedMetricFamily("tsnsrv_proxy_errors", "Number of errors encountered proxying requests",
                                  value=self.proxy_errors)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self._go = _GoTsnsrvSeries()
        r.register(self._go)
        self.request_duration = Histogram("tsnsrv_request_duration_seconds",
                                          "Time from request headers to the end of the response", ["source"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.requests_in_flight = Gauge("tsnsrv_requests_in_flight", "Requests being proxied now", registry=r)
        self.responses = Counter("tsnsrv_responses", "Responses sent, by status class and client kind",
                                 ["status_class", "source"], registry=r)
        self.upstream_connect = Histogram("tsnsrv_upstream_connect_duration_seconds",
                                          "Time to open a new connection to the upstream", buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.upstream_response = Histogram("tsnsrv_upstream_response_header_duration_seconds",
                                           "Time from sending a request upstream to its response headers",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_errors = Counter("tsnsrv_upstream_errors", "Failed upstream exchanges, by kind", ["kind"],
                                       registry=r)
        self.bytes_from_clients = Counter("tsnsrv_request_bytes", "Body bytes received from clients", registry=r)
        self.bytes_to_clients = Counter("tsnsrv_response_bytes", "Body bytes sent to clients", registry=r)
        self.websockets_open = Gauge("tsnsrv_websocket_sessions_open", "Proxied websocket sessions now open",
                                     registry=r)
        self.websockets = Counter("tsnsrv_websocket_sessions", "Proxied websocket sessions", registry=r)
        self.denied = Counter("tsnsrv_denied_requests", "Requests refused by tsnsrv itself, by reason", ["reason"],
                              registry=r)
        self.whois = Counter("tsnsrv_whois_lookups", "Client identity lookups, by result", ["result"], registry=r)
        self.refused_connections = Counter(
            "tsnsrv_refused_front_connections",
            "Front listener connections refused (not from tailscaled, bad PROXY header, wrong client kind)",
            ["reason"], registry=r)
        self.loopback_refusals = Gauge("tsnsrv_loopback_refusals",
                                       "Connects and binds of the spawned tailscaled to host loopback that were "
                                       "refused since start", registry=r)
        self.certificate_expiry = Gauge("tsnsrv_certificate_expiry_timestamp_seconds",
                                        "Expiry time of the TLS certificate being served", registry=r)
        self.node_running = Gauge("tsnsrv_node_running", "1 while the node is Running on the tailnet", registry=r)
        self.tailscaled_restarts = Counter("tsnsrv_tailscaled_restarts", "Restarts of the spawned tailscaled",
                                           registry=r)
        self._per_response: dict[tuple[int, str], tuple[Counter, Histogram, str]] = {}

    def observe_response(self, status: int, source: str, seconds: float) -> None:
        key = (status // 100, source)
        children = self._per_response.get(key)
        if children is None:  # label lookups once per status class and source, not per request
            status_class = f"{status // 100}xx"
            children = self._per_response[key] = (self.responses.labels(status_class, source),
                                                  self.request_duration.labels(source), status_class)
        children[0].inc()
        children[1].observe(seconds)
        go = self._go
        go.duration_ns_sum += seconds * 1e9
        go.duration_count += 1
        go.status_classes[children[2]] = go.status_classes.get(children[2], 0) + 1

    def upstream_failed(self, kind: str) -> None:
        self.upstream_errors.labels(kind).inc()
        self._go.proxy_errors += 1

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
