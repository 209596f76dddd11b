"""Prometheus metrics of one service (prometheus-client, in a registry of its own).

Names follow Prometheus conventions (`_seconds`, `_total`). The three series the Go
tsnsrv exports are kept under their old names too, so existing dashboards work:
`tsnsrv_request_duration_ns` (a summary with sum and count; quantiles come from the
`tsnsrv_request_duration_seconds` histogram), `tsnsrv_response_status_classes` and
`tsnsrv_proxy_errors`. The process collector adds `process_resident_memory_bytes` and
`process_open_fds`, which the soak run watches for growth.

What every request updates is counted in plain attributes of one custom collector
(`RequestSeries`, prometheus-client's pattern for values kept elsewhere) and turned into
families when Prometheus scrapes: a library metric takes a lock and a few calls per
update, several times per request. Everything else is prometheus-client's own metrics.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                    SummaryMetricFamily, UntypedMetricFamily)
from prometheus_client.registry import Collector

STATUS_CLASSES = {n: f"{n}xx" for n in range(1, 10)}  # statuses run from 100 to 999
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# `_created` samples would double every counter's series for a timestamp nobody graphs.
prometheus_client.disable_created_metrics()


class _Buckets:
    """One histogram's counts: per bucket (not yet cumulative), sum and count."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def add_to(self, family: HistogramMetricFamily, labels: Sequence[str]) -> None:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, map(float, LATENCY_BUCKETS)), "+Inf"), self.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(list(labels), buckets, self.sum)


class RequestSeries(Collector):
    """The series every request updates, with the Go tsnsrv's under their old names."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.responses: dict[tuple[str, str], int] = {}  # (status class, source) -> count
        self.durations: dict[str, _Buckets] = {}  # source -> seconds
        self.upstream_heads = _Buckets()
        self.bytes_in = 0
        self.bytes_out = 0
        self.proxy_errors = 0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("tsnsrv_requests_in_flight", "Requests being proxied now", value=self.in_flight)
        responses = CounterMetricFamily("tsnsrv_responses", "Responses sent, by status class and client kind",
                                        labels=["status_class", "source"])
        classes: dict[str, int] = {}
        for (status_class, source), count in sorted(self.responses.items()):
            responses.add_metric([status_class, source], count)
            classes[status_class] = classes.get(status_class, 0) + count
        yield responses
        durations = HistogramMetricFamily("tsnsrv_request_duration_seconds",
                                          "Time from request headers to the end of the response", labels=["source"])
        for source, buckets in sorted(self.durations.items()):
            buckets.add_to(durations, [source])
        yield durations
        heads = HistogramMetricFamily("tsnsrv_upstream_response_header_duration_seconds",
                                      "Time from sending a request upstream to its response headers")
        self.upstream_heads.add_to(heads, [])
        yield heads
        yield CounterMetricFamily("tsnsrv_request_bytes", "Body bytes received from clients", value=self.bytes_in)
        yield CounterMetricFamily("tsnsrv_response_bytes", "Body bytes sent to clients", value=self.bytes_out)
        # The Go tsnsrv's series: a summary without quantiles, and two untyped ones.
        count = sum(classes.values())
        total = sum(buckets.sum for buckets in self.durations.values())
        yield SummaryMetricFamily("tsnsrv_request_duration_ns", "Duration of requests served",
                                  count_value=count, sum_value=total * 1e9)
        go_classes = UntypedMetricFamily("tsnsrv_response_status_classes", "Responses by status code class (1xx, etc)",
                                         labels=["status_code_class"])
        for status_class, class_count in sorted(classes.items()):
            go_classes.add_metric([status_class], class_count)
        yield go_classes
        yield UntypedMetricFamily("tsnsrv_proxy_errors", "Number of errors encountered proxying requests",
                                  value=self.proxy_errors)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.requests = RequestSeries()
        r.register(self.requests)
        self.upstream_connect = Histogram("tsnsrv_upstream_connect_duration_seconds",
                                          "Time to open a new connection to the upstream", buckets=LATENCY_BUCKETS,
                                          registry=r)
        self.upstream_errors = Counter("tsnsrv_upstream_errors", "Failed upstream exchanges, by kind", ["kind"],
                                       registry=r)
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

    def request_finished(self, status: int, source: str, seconds: float, bytes_in: int, bytes_out: int) -> None:
        series = self.requests
        series.in_flight -= 1
        key = (STATUS_CLASSES[status // 100], source)
        series.responses[key] = series.responses.get(key, 0) + 1
        durations = series.durations.get(source)
        if durations is None:
            durations = series.durations[source] = _Buckets()
        durations.observe(seconds)
        series.bytes_in += bytes_in
        series.bytes_out += bytes_out

    def upstream_failed(self, kind: str) -> None:
        self.upstream_errors.labels(kind).inc()
        self.requests.proxy_errors += 1

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
