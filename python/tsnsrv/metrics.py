"""Prometheus metrics of one service, in the text exposition format (version 0.0.4).

Names follow Prometheus conventions (`_seconds`, `_total`). The three series the Go
tsnsrv exports are kept under their old names too, so existing dashboards work:
`tsnsrv_request_duration_ns` (a summary with sum and count; quantiles come from the
`tsnsrv_request_duration_seconds` histogram), `tsnsrv_response_status_classes` and
`tsnsrv_proxy_errors`.

Hand-written rather than prometheus-client: a counter here is a float in a dict, with no
lock (everything runs on one event loop), and the module costs a few hundred kilobytes
instead of several megabytes per service process. The tests parse the output with
prometheus-client's own parser.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

Labels = tuple[str, ...]


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    """Label pairs sorted by name, as prometheus-client writes them (scrapes stay comparable)."""
    if not names:
        return ""
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in sorted(zip(names, values))) + "}"


class _Family:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._children: dict[Labels, object] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()
            self._default = self._children[()]

    def _new_child(self) -> object:
        raise NotImplementedError

    def labels(self, *values: str):  # noqa: ANN201 - the child type depends on the family
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child

    def samples(self) -> Iterator[tuple[str, Labels, Labels, float]]:
        """(sample name, label names, label values, value)"""
        raise NotImplementedError

    def exposition(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.documentation}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{name}{_labels_text(names, values)} {_number(value)}"
                  for name, names, values, value in self.samples()]
        return lines


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Counter(_Family):
    kind = "counter"

    def _new_child(self) -> _Value:
        return _Value()

    def inc(self, amount: float = 1.0) -> None:
        self._default.value += amount  # type: ignore[attr-defined]

    def samples(self) -> Iterator[tuple[str, Labels, Labels, float]]:
        for values, child in sorted(self._children.items()):
            yield f"{self.name}_total", self.labelnames, values, child.value  # type: ignore[attr-defined]


class Gauge(Counter):
    kind = "gauge"

    def dec(self, amount: float = 1.0) -> None:
        self._default.value -= amount  # type: ignore[attr-defined]

    def set(self, value: float) -> None:
        self._default.value = value  # type: ignore[attr-defined]

    def samples(self) -> Iterator[tuple[str, Labels, Labels, float]]:
        for values, child in sorted(self._children.items()):
            yield self.name, self.labelnames, values, child.value  # type: ignore[attr-defined]


class _Buckets:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                return


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS):
        self._bounds = tuple(float(b) for b in buckets) + (math.inf,)
        super().__init__(name, documentation, labelnames)

    def _new_child(self) -> _Buckets:
        return _Buckets(self._bounds)

    def observe(self, value: float) -> None:
        self._default.observe(value)  # type: ignore[attr-defined]

    def samples(self) -> Iterator[tuple[str, Labels, Labels, float]]:
        names = self.labelnames + ("le",)
        for values, child in sorted(self._children.items()):
            cumulative = 0
            for bound, count in zip(child.bounds, child.counts):  # type: ignore[attr-defined]
                cumulative += count
                yield f"{self.name}_bucket", names, values + (_number(bound),), cumulative
            yield f"{self.name}_count", self.labelnames, values, child.count  # type: ignore[attr-defined]
            yield f"{self.name}_sum", self.labelnames, values, child.sum  # type: ignore[attr-defined]


class _Untyped(_Family):
    """A series with fixed samples (the Go tsnsrv's names)."""

    def __init__(self, name: str, documentation: str, kind: str, samples) -> None:  # noqa: ANN001
        self.kind = kind
        self._samples = samples
        super().__init__(name, documentation, ("-",))  # no default child

    def samples(self) -> Iterator[tuple[str, Labels, Labels, float]]:
        yield from self._samples()


class Registry:
    def __init__(self) -> None:
        self.families: list[_Family] = []

    def add(self, family: _Family) -> _Family:
        self.families.append(family)
        return family

    def exposition(self) -> bytes:
        return ("\n".join(line for family in self.families for line in family.exposition()) + "\n").encode()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        wanted = labels or {}
        for family in self.families:
            for sample, names, values, value in family.samples():
                if sample == name and dict(zip(names, values)) == wanted:
                    return value
        return None


class Metrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        self.duration_ns_sum = 0.0
        self.duration_count = 0
        self.status_classes: dict[str, int] = {}
        self.proxy_errors = 0
        r.add(_Untyped("tsnsrv_request_duration_ns", "Duration of requests served", "summary", lambda: iter((
            ("tsnsrv_request_duration_ns_sum", (), (), self.duration_ns_sum),
            ("tsnsrv_request_duration_ns_count", (), (), self.duration_count)))))
        # Untyped: a counter family would have to be named for its "<name>_total" samples,
        # which are not the Go tsnsrv's sample names that dashboards query.
        r.add(_Untyped("tsnsrv_response_status_classes", "Responses by status code class (1xx, etc)", "untyped",
                       lambda: iter(("tsnsrv_response_status_classes", ("status_code_class",), (status_class,), count)
                                    for status_class, count in sorted(self.status_classes.items()))))
        r.add(_Untyped("tsnsrv_proxy_errors", "Number of errors encountered proxying requests", "untyped",
                       lambda: iter((("tsnsrv_proxy_errors", (), (), self.proxy_errors),))))
        self.request_duration = r.add(Histogram("tsnsrv_request_duration_seconds",
                                                "Time from request headers to the end of the response", ["source"]))
        self.requests_in_flight = r.add(Gauge("tsnsrv_requests_in_flight", "Requests being proxied now"))
        self.responses = r.add(Counter("tsnsrv_responses", "Responses sent, by status class and client kind",
                                       ["status_class", "source"]))
        self.upstream_connect = r.add(Histogram("tsnsrv_upstream_connect_duration_seconds",
                                                "Time to open a new connection to the upstream"))
        self.upstream_response = r.add(Histogram("tsnsrv_upstream_response_header_duration_seconds",
                                                 "Time from sending a request upstream to its response headers"))
        self.upstream_errors = r.add(Counter("tsnsrv_upstream_errors", "Failed upstream exchanges, by kind", ["kind"]))
        self.bytes_from_clients = r.add(Counter("tsnsrv_request_bytes", "Body bytes received from clients"))
        self.bytes_to_clients = r.add(Counter("tsnsrv_response_bytes", "Body bytes sent to clients"))
        self.websockets_open = r.add(Gauge("tsnsrv_websocket_sessions_open", "Proxied websocket sessions now open"))
        self.websockets = r.add(Counter("tsnsrv_websocket_sessions", "Proxied websocket sessions"))
        self.denied = r.add(Counter("tsnsrv_denied_requests", "Requests refused by tsnsrv itself, by reason",
                                    ["reason"]))
        self.whois = r.add(Counter("tsnsrv_whois_lookups", "Client identity lookups, by result", ["result"]))
        self.refused_connections = r.add(Counter(
            "tsnsrv_refused_front_connections",
            "Front listener connections refused (not from tailscaled, bad PROXY header, wrong client kind)",
            ["reason"]))
        self.loopback_refusals = r.add(Gauge("tsnsrv_loopback_refusals",
                                             "Connects and binds of the spawned tailscaled to host loopback that "
                                             "were refused since start"))
        self.certificate_expiry = r.add(Gauge("tsnsrv_certificate_expiry_timestamp_seconds",
                                              "Expiry time of the TLS certificate being served"))
        self.node_running = r.add(Gauge("tsnsrv_node_running", "1 while the node is Running on the tailnet"))
        self.tailscaled_restarts = r.add(Counter("tsnsrv_tailscaled_restarts", "Restarts of the spawned tailscaled"))
        self._children: dict[tuple[int, str], tuple[_Value, _Buckets, str]] = {}

    def observe_response(self, status: int, source: str, seconds: float) -> None:
        key = (status // 100, source)
        children = self._children.get(key)
        if children is None:
            status_class = f"{status // 100}xx"
            children = self._children[key] = (self.responses.labels(status_class, source),
                                              self.request_duration.labels(source), status_class)
        children[0].value += 1
        children[1].observe(seconds)
        self.duration_ns_sum += seconds * 1e9
        self.duration_count += 1
        self.status_classes[children[2]] = self.status_classes.get(children[2], 0) + 1

    def upstream_failed(self, kind: str) -> None:
        self.upstream_errors.labels(kind).inc()
        self.proxy_errors += 1

    def exposition(self) -> bytes:
        return self.registry.exposition()
