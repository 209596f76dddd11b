"""Prometheus metrics (tsnsrv.metrics): our series, and the Go tsnsrv's under their old names."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tsnsrv.metrics import Metrics


def families(metrics: Metrics) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        out.setdefault(family.name, []).append(family)
    return out


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def test_finished_requests_feed_both_series_sets():
    m = Metrics()
    m.request_finished(200, "tailnet", 0.25, 0, 0)
    m.request_finished(204, "tailnet", 0.5, 0, 0)
    m.request_finished(404, "funnel", 0.001, 0, 0)
    assert sample(m, "tsnsrv_responses_total", {"status_class": "2xx", "source": "tailnet"}) == 2
    assert sample(m, "tsnsrv_responses_total", {"status_class": "4xx", "source": "funnel"}) == 1
    assert sample(m, "tsnsrv_request_duration_seconds_count", {"source": "tailnet"}) == 2
    assert sample(m, "tsnsrv_request_duration_seconds_sum", {"source": "tailnet"}) == pytest.approx(0.75)
    assert sample(m, "tsnsrv_request_duration_seconds_bucket", {"source": "funnel", "le": "0.001"}) == 1
    assert sample(m, "tsnsrv_request_duration_ns_sum") == pytest.approx(0.751e9)
    assert sample(m, "tsnsrv_request_duration_ns_count") == 3
    assert sample(m, "tsnsrv_response_status_classes", {"status_code_class": "2xx"}) == 2
    assert sample(m, "tsnsrv_response_status_classes", {"status_code_class": "4xx"}) == 1


def test_client_gone_499_and_5xx_classes():
    m = Metrics()
    m.request_finished(499, "tailnet", 1.0, 0, 0)
    m.request_finished(502, "tailnet", 1.0, 0, 0)
    assert sample(m, "tsnsrv_response_status_classes", {"status_code_class": "4xx"}) == 1
    assert sample(m, "tsnsrv_response_status_classes", {"status_code_class": "5xx"}) == 1


def test_upstream_failures_count_in_both_sets():
    m = Metrics()
    m.upstream_failed("refused")
    m.upstream_failed("timeout")
    m.upstream_failed("refused")
    assert sample(m, "tsnsrv_upstream_errors_total", {"kind": "refused"}) == 2
    assert sample(m, "tsnsrv_upstream_errors_total", {"kind": "timeout"}) == 1
    assert sample(m, "tsnsrv_proxy_errors") == 3


def test_exposition_uses_the_go_tsnsrv_sample_names():
    m = Metrics()
    m.request_finished(200, "tailnet", 0.1, 0, 0)
    m.upstream_failed("reset")
    text = m.exposition().decode()
    lines = text.splitlines()
    assert 'tsnsrv_response_status_classes{status_code_class="2xx"} 1.0' in lines
    assert "tsnsrv_proxy_errors 1.0" in lines
    assert "tsnsrv_request_duration_ns_count 1.0" in lines
    assert "# TYPE tsnsrv_request_duration_ns summary" in lines


def test_each_service_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.request_finished(200, "tailnet", 0.1, 0, 0)
    assert sample(a, "tsnsrv_request_duration_ns_count") == 1
    assert sample(b, "tsnsrv_request_duration_ns_count") == 0


def test_exposition_parses_and_names_every_series_once():
    names = families(Metrics())
    for name in ("tsnsrv_requests_in_flight", "tsnsrv_responses", "tsnsrv_whois_lookups", "tsnsrv_denied_requests",
                 "tsnsrv_refused_front_connections", "tsnsrv_certificate_expiry_timestamp_seconds",
                 "tsnsrv_node_running", "tsnsrv_tailscaled_restarts", "tsnsrv_loopback_refusals",
                 "tsnsrv_websocket_sessions_open", "tsnsrv_upstream_connect_duration_seconds"):
        assert name in names, name


def test_go_compatible_series_are_declared_under_their_sample_names():
    """Prometheus ignores TYPE/HELP lines that name no sample; the Go names must keep theirs."""
    m = Metrics()
    m.request_finished(200, "tailnet", 0.1, 0, 0)
    m.upstream_failed("reset")
    text = m.exposition().decode()
    for name in ("tsnsrv_response_status_classes", "tsnsrv_proxy_errors"):
        assert f"# TYPE {name} untyped" in text, name
        assert f"# HELP {name} " in text, name
        assert f"# TYPE {name}_total" not in text, name
    assert 'tsnsrv_response_status_classes{status_code_class="2xx"} 1.0' in text
    assert "tsnsrv_proxy_errors 1.0" in text.splitlines()


def test_requests_in_flight_and_body_bytes():
    m = Metrics()
    m.requests.in_flight += 2  # two requests started (the proxy counts them in)
    m.request_finished(200, "tailnet", 0.01, 10, 2048)
    assert sample(m, "tsnsrv_requests_in_flight") == 1
    assert sample(m, "tsnsrv_request_bytes_total") == 10
    assert sample(m, "tsnsrv_response_bytes_total") == 2048


def test_request_duration_buckets_are_cumulative_with_bounds_inclusive():
    m = Metrics()
    for seconds in (0.001, 0.002, 0.3, 400):
        m.request_finished(200, "tailnet", seconds, 0, 0)
    bucket = {le: sample(m, "tsnsrv_request_duration_seconds_bucket", {"source": "tailnet", "le": le})
              for le in ("0.001", "0.0025", "0.25", "0.5", "300.0", "+Inf")}
    assert bucket == {"0.001": 1, "0.0025": 2, "0.25": 2, "0.5": 3, "300.0": 3, "+Inf": 4}
