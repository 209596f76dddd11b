"""nixos/render.nix, evaluated by Nix on example services, and accepted by the runtime.

Each fixture (tests/nix/fixtures.nix: the blog post's calibre-web with Funnel,
home-assistant and alertmanager, and more) is rendered exactly as the module renders
it, written to a file and handed to `tsnsrv check --config`, which must accept it and
print back the values the declaration asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from harness.nixtools import NIXOS, TESTS, nix_eval, nix_string, tsnsrv_check

FIXTURES = ["books", "home", "alertmanager", "docs", "grafana", "everything"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, Any]]:
    return nix_eval(f"import {nix_string(TESTS / 'render-fixtures.nix')} {{ }}")


@pytest.fixture(scope="module")
def effective(rendered: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """What the runtime makes of each rendered file (`tsnsrv check` prints it)."""
    tmp = tmp_path_factory.mktemp("rendered")
    out = {}
    for name, config in rendered.items():
        result = tsnsrv_check(config, tmp, name)
        assert result.returncode == 0, f"tsnsrv check rejected the rendered {name}:\n{result.stderr}\n{config}"
        out[name] = json.loads(result.stdout)
    return out


def test_every_fixture_is_rendered(rendered: dict[str, dict[str, Any]]) -> None:
    assert sorted(rendered) == sorted(FIXTURES)


@pytest.mark.parametrize("name", FIXTURES)
def test_the_runtime_accepts_the_rendered_config(name: str, effective: dict[str, dict]) -> None:
    assert effective[name]["name"] == ("every-thing" if name == "everything" else name)


def test_calibre_web_behind_funnel(effective: dict[str, dict]) -> None:
    books = effective["books"]
    assert books["funnel"] is True
    assert books["toURL"] == "http://127.0.0.1:8083"
    assert books["prefixes"] == ["tailnet:/", "funnel:/kobo/"]
    assert books["stripPrefix"] is False
    assert books["plaintext"] is False


def test_home_assistant_from_url_parts(effective: dict[str, dict]) -> None:
    home = effective["home"]
    assert home["toURL"] == "http://127.0.0.1:8123"
    assert home["identityHeaders"] == ["tsnsrv", "serve"]
    assert home["upstreamIdleTimeout"] == 600.0
    assert home["funnel"] is False


def test_alertmanager_access_rules(effective: dict[str, dict]) -> None:
    rules = effective["alertmanager"]["accessRules"]
    assert [(r["action"], r["prefix"], r["users"], r["tags"]) for r in rules] == [
        ("allow", "/", ["me@example.com"], []),
        ("allow", "/api/v2/alerts", [], ["tag:monitoring"]),
        ("deny", "/", [], []),
    ]
    assert effective["alertmanager"]["metricsAddr"] == "tailnet:9100"


def test_suppress_whois_passes_through(effective: dict[str, dict]) -> None:
    # The Go module declares suppressWhois but never passes it to the process.
    assert effective["docs"]["suppressWhois"] is True
    assert effective["books"]["suppressWhois"] is False


def test_unix_socket_upstream(effective: dict[str, dict]) -> None:
    assert effective["docs"]["upstreamUnixAddr"] == "/run/docspell/http.sock"
    assert effective["docs"]["shutdownTimeout"] == 60.0
    assert effective["docs"]["loginServerUrl"] == "https://headscale.example.com"


def test_acme_host_becomes_certificate_files(effective: dict[str, dict]) -> None:
    grafana = effective["grafana"]
    assert grafana["certificateFile"] == "/var/lib/acme/grafana.example.com/fullchain.pem"
    assert grafana["certificateKey"] == "/var/lib/acme/grafana.example.com/key.pem"


def test_unit_layout_paths(effective: dict[str, dict]) -> None:
    """The proxy attaches to its own unit's tailscaled; the key comes from LoadCredential."""
    home = effective["home"]
    assert home["tailscaledSocket"] == "/run/tsnsrv-home/tailscaled.sock"
    assert home["controlSocket"] == "/run/tsnsrv-home/control.sock"
    assert home["stateDir"] == "/var/lib/tsnsrv-home"
    assert home["authKeyPath"] == "/run/credentials/tsnsrv-home.service/authKey"
    assert home["tailscaledUser"] is None
    assert home["tailscaledPath"].endswith("-tailscale-1.98.1/bin/tailscaled")
    # No key configured: nothing to hand over, the runtime's own fallbacks apply.
    assert effective["docs"]["authKeyPath"] is None


def test_everything_reaches_the_runtime(effective: dict[str, dict]) -> None:
    every = effective["everything"]
    expected = {
        "loginServerUrl": "https://headscale.example.com",
        "tags": ["tag:web", "tag:prod"],
        "ephemeral": True,
        "timeout": 300.0,
        "tailscaledVerbose": True,
        "tailscaledLogUpload": True,
        "listenPort": 8443,
        "certificateFile": "/etc/ssl/every/fullchain.pem",
        "certificateKey": "/etc/ssl/every/key.pem",
        "funnel": True,
        "funnelOnly": True,
        "readHeaderTimeout": 10.0,
        "funnelReadHeaderTimeout": 2.0,
        "frontAddress": "127.0.0.3",
        "prefixes": ["/app/"],
        "denyPrefixes": ["/app/admin"],
        "stripPrefix": False,
        "suppressWhois": True,
        "whoisTimeout": 0.5,
        "identityHeaders": ["serve"],
        "appCapabilities": ["example.com/cap/web"],
        "recommendedProxyHeaders": False,
        "upstreamHeaders": {"X-Forwarded-Prefix": "/base"},
        "upstreamTCPAddr": "10.0.0.6:8443",
        "upstreamCaFile": "/etc/ssl/internal-ca.pem",
        "upstreamAllowInsecureCiphers": True,
        "upstreamConnectTimeout": 3.0,
        "upstreamResponseHeaderTimeout": 120.0,
        "upstreamIdleTimeout": 600.0,
        "metricsAddr": "127.0.0.1:9101",
        "logLevel": "debug",
        "accessLog": False,
        "shutdownTimeout": 45.0,
    }
    assert {key: every[key] for key in expected} == expected


def render(unit: str, service: str) -> dict[str, Any]:
    return nix_eval(f"(import {nix_string(NIXOS / 'render.nix')}).serviceConfig "
                    f"{{ unit = {json.dumps(unit)}; service = {service}; }}")


def test_to_url_wins_over_url_parts() -> None:
    config = render("x", '{ toURL = "http://a:1"; urlParts = { protocol = "https"; host = "b"; port = 2; }; }')
    assert config["toURL"] == "http://a:1"
    config = render("x", '{ toURL = null; urlParts = { protocol = "https"; host = "b"; port = 2; }; }')
    assert config["toURL"] == "https://b:2"


def test_nulls_are_left_to_the_runtime() -> None:
    config = render("x", '{ toURL = "http://a:1"; listenPort = null; metricsAddr = null; }')
    assert "listenPort" not in config and "metricsAddr" not in config
    assert "toURL" in config


def test_the_runtime_rejects_what_the_module_must_assert(tmp_path: Path) -> None:
    """The check can fail: funnel with plaintext is refused, naming the option."""
    config = render("x", '{ toURL = "http://a:1"; funnel = true; plaintext = true; }')
    result = tsnsrv_check(config, tmp_path)
    assert result.returncode == 2
    assert "plaintext" in result.stderr
