"""`tsnsrv status` (tsnsrv.status): rows from /health documents and the table layout.

The health documents are made by the real control.Health, so the two stay in step.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tsnsrv import status
from tsnsrv.control import Health

UTC = dt.timezone.utc


def health(**changes) -> Health:
    h = Health(name="books", mode="spawn", upstream="http://127.0.0.1:8083", listen_port=443, tls_mode="tailscale",
               funnel=False)
    for key, value in changes.items():
        setattr(h, key, value)
    return h


def serving(**changes) -> Health:
    return health(**{"tailscaled": "running", "backend_state": "Running", "serve_config": True, "accepting": True,
                     "dns_name": "books.tail1234.ts.net", "addresses": ("100.64.0.3", "fd7a:115c:a1e0::3"),
                     "certificate_not_after": dt.datetime.now(UTC) + dt.timedelta(days=40, hours=1), **changes})


def test_row_of_a_serving_service():
    doc = serving().as_json()
    doc["upstream"].update({"answers": True, "status": 200, "latencyMs": 3})
    name, state, address, url, expires, upstream, ok = status.row(doc)
    assert (name, state, address, url) == ("books", "serving", "100.64.0.3", "https://books.tail1234.ts.net/")
    expiry = dt.datetime.now(UTC) + dt.timedelta(days=40, hours=1)
    assert expires == f"{expiry:%Y-%m-%d} (40d)"
    assert upstream == "http://127.0.0.1:8083"
    assert ok == "yes (200, 3 ms)"


def test_row_of_a_plaintext_service_on_another_port():
    doc = serving(tls_mode="plaintext", listen_port=8080, certificate_not_after=None).as_json()
    row = status.row(doc)
    assert row[1] == "serving" and row[3] == "http://books.tail1234.ts.net:8080/" and row[4] == "plaintext"
    assert row[6] == "-"  # upstream not probed


def test_row_of_a_service_still_starting():
    row = status.row(health(tailscaled="starting", backend_state="NeedsLogin").as_json())
    assert row[1] == "NeedsLogin (tailscaled starting)"
    assert row[2:5] == ("-", "-", "-")


def test_row_of_a_running_node_without_serve_config():
    row = status.row(health(tailscaled="running", backend_state="Running").as_json())
    assert row[1] == "Running"


@pytest.mark.parametrize(("left", "shown"), [
    (dt.timedelta(days=5, hours=1), "5d"), (dt.timedelta(days=1, hours=23), "47h"),
    (dt.timedelta(minutes=40, seconds=10), "40m"), (dt.timedelta(seconds=70), "70s"),
    (-dt.timedelta(seconds=5), "expired"),
])
def test_the_time_left_of_a_short_lived_certificate_is_not_zero_days(left, shown):
    expiry = dt.datetime.now(UTC) + left
    assert status.row(serving(certificate_not_after=expiry).as_json())[4] == f"{expiry:%Y-%m-%d} ({shown})"


def test_row_of_a_running_node_still_without_a_certificate():
    doc = serving(certificate_not_after=None, certificate_error="tailscaled could not get a certificate").as_json()
    assert doc["tls"]["error"] == "tailscaled could not get a certificate"
    assert status.row(doc)[1] == "Running, no certificate" and status.row(doc)[4] == "-"


def test_a_failed_renewal_does_not_hide_a_serving_service():
    doc = serving(certificate_error="tailscaled could not get a certificate").as_json()
    assert status.row(doc)[1] == "serving"


def test_row_of_a_failing_upstream_is_truncated():
    doc = serving().as_json()
    doc["upstream"].update({"answers": False, "error": "connection refused " * 10})
    ok = status.row(doc)[6]
    assert ok.startswith("NO: connection refused") and len(ok) == 60


def test_row_of_an_unreachable_service():
    row = status.row({"name": "home", "ready": False, "status": "not answering: x", "unreachable": True})
    assert row == ("home", "not answering", "-", "-", "-", "-", "-")


def test_render_aligns_columns_and_strips_trailing_space():
    rows = [("books", "serving", "100.64.0.3", "-", "-", "-", "-"), ("a-much-longer-name", "x", "-", "-", "-", "-", "-")]
    lines = status.render(rows).splitlines()
    assert lines[0].split() [:2] == ["SERVICE", "STATE"]
    assert all(line == line.rstrip() for line in lines)
    column = lines[0].index("STATE")
    assert column == len("a-much-longer-name") + 2
    assert lines[1][column:].startswith("serving") and lines[2][column:].startswith("x")


def test_main_with_an_unreachable_socket_exits_1(tmp_path, capsys):
    code = status.main(["--socket", str(tmp_path / "books" / "control.sock")])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[1].split()[:3] == ["books", "not", "answering"]


def test_main_json_output(tmp_path, capsys):
    code = status.main(["--json", "--socket", str(tmp_path / "home" / "control.sock")])
    [doc] = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["name"] == "home" and doc["unreachable"] is True and doc["ready"] is False


def test_main_with_an_unknown_name_exits_2(tmp_path, capsys):
    code = status.main(["nosuch", "--socket", str(tmp_path / "books" / "control.sock")])
    assert code == 2
    assert "no running service named nosuch" in capsys.readouterr().err


@pytest.mark.parametrize(("changes", "ready", "summary"), [
    ({}, True, "serving https://books.tail1234.ts.net/ -> http://127.0.0.1:8083"),
    ({"stopping": True}, False, "stopping"),
    ({"accepting": False}, False, "not ready: tailscaled running, node Running"),
    ({"serve_config": False}, False, "not ready: tailscaled running, node Running"),
    ({"certificate_not_after": None}, False, "not ready: tailscaled running, node Running"),
    ({"certificate_not_after": None, "tls_mode": "plaintext", "listen_port": 80}, True,
     "serving http://books.tail1234.ts.net/ -> http://127.0.0.1:8083"),
    ({"backend_state": "Starting"}, False, "not ready: tailscaled running, node Starting"),
    ({"tailscaled": "restarting"}, False, "not ready: tailscaled restarting, node Running"),
])
def test_health_readiness_and_summary(changes, ready, summary):
    h = serving(**changes)
    assert h.ready is ready
    assert h.as_json()["ready"] is ready
    assert h.summary() == summary
