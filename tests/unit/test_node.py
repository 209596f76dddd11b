"""The node's pure parts (tsnsrv.node): what the LocalAPI status says about the node,
the prefs a service wants, and the minimal edit that brings existing prefs in line."""

from __future__ import annotations

import pytest

from tsnsrv import node
from tsnsrv.config import load
from tsnsrv.node import DEFAULT_CONTROL_URL, NodeError, NodeInfo, desired_prefs, prefs_drift

STATUS = {
    "BackendState": "Running",
    "TailscaleIPs": ["100.64.0.3", "fd7a:115c:a1e0::3"],
    "CertDomains": ["books.tail1234.ts.net"],
    "Self": {"ID": "nXYZ", "DNSName": "books.tail1234.ts.net.", "Capabilities": ["https"],
             "CapMap": {"funnel": None, "https://tailscale.com/cap/funnel-ports?ports=443,8443": None}},
}


def cfg(**extra):
    return load({"name": "books", "toURL": "http://127.0.0.1:8083", **extra})


def test_node_info_from_status():
    info = NodeInfo.from_status(STATUS)
    assert info.dns_name == "books.tail1234.ts.net"
    assert info.addresses == ("100.64.0.3", "fd7a:115c:a1e0::3")
    assert info.cert_domains == ("books.tail1234.ts.net",)
    assert info.node_id == "nXYZ"
    assert {"https", "funnel"} <= info.capabilities


def test_node_info_from_an_empty_status():
    info = NodeInfo.from_status({})
    assert info == NodeInfo("", (), (), frozenset(), "")
    assert info.funnel_ports() is None


def test_funnel_ports_from_the_capability():
    assert NodeInfo.from_status(STATUS).funnel_ports() == {443, 8443}


def test_funnel_without_a_ports_capability_allows_no_port():
    status = {"Self": {"CapMap": {"funnel": None, "https": None}}}
    assert NodeInfo.from_status(status).funnel_ports() == set()


@pytest.mark.parametrize("caps", [{"https": None}, {"funnel": None}, {}])
def test_funnel_needs_both_https_and_funnel(caps):
    assert NodeInfo.from_status({"Self": {"CapMap": caps}}).funnel_ports() is None


def test_desired_prefs_with_an_auth_key_request_no_tags():
    prefs = desired_prefs(cfg(tags=["tag:web"], loginServerUrl="http://127.0.0.1:8080"), with_auth_key=True)
    assert prefs["ControlURL"] == "http://127.0.0.1:8080"
    assert prefs["Hostname"] == "books"
    assert prefs["AdvertiseTags"] is None
    assert prefs["WantRunning"] is True
    assert (prefs["CorpDNS"], prefs["RouteAll"], prefs["ShieldsUp"], prefs["RunSSH"]) == (False, False, False, False)


def test_desired_prefs_for_interactive_login_request_the_tags():
    assert desired_prefs(cfg(tags=["tag:web"]), with_auth_key=False)["AdvertiseTags"] == ["tag:web"]
    assert desired_prefs(cfg(), with_auth_key=False)["AdvertiseTags"] is None
    assert desired_prefs(cfg(), with_auth_key=False)["ControlURL"] == DEFAULT_CONTROL_URL


def test_prefs_drift_edits_only_what_differs():
    wanted = desired_prefs(cfg(), with_auth_key=True)
    current = {**wanted, "Hostname": "old-name", "CorpDNS": True, "ControlURL": "https://elsewhere",
               "AdvertiseTags": ["tag:x"]}
    assert prefs_drift(current, wanted) == {"Hostname": "books", "HostnameSet": True, "CorpDNS": False,
                                            "CorpDNSSet": True}


def test_prefs_drift_treats_missing_and_false_alike():
    wanted = desired_prefs(cfg(), with_auth_key=True)
    current = {"Hostname": "books", "WantRunning": True}
    assert prefs_drift(current, wanted) == {}
    assert prefs_drift({}, wanted) == {"Hostname": "books", "HostnameSet": True, "WantRunning": True,
                                       "WantRunningSet": True}


@pytest.mark.parametrize(("state", "name"), [(0, "NoState"), (2, "NeedsLogin"), (6, "Running"), (7, "7"),
                                             (-1, "-1"), ("Running", "Running")])
def test_state_names(state, name):
    assert node._state_name(state) == name


async def bus(*notes):
    for note in notes:
        yield note


@pytest.mark.asyncio
async def test_login_bus_passes_notes_and_raises_on_errors():
    seen = []
    with pytest.raises(NodeError, match="tailscaled: invalid key"):
        async for note in node._running_or_error(bus({"State": 2}, {"ErrMessage": "invalid key"}, {"State": 6})):
            seen.append(note)
    assert seen == [{"State": 2}]


@pytest.mark.asyncio
async def test_login_bus_that_ends_is_a_connection_error():
    with pytest.raises(ConnectionError, match="closed the IPN bus"):
        async for _ in node._running_or_error(bus({"State": 5})):
            pass
