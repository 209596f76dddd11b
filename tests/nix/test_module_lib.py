"""nixos/module.nix evaluated with the real nixpkgs `lib.evalModules`.

Uses nixpkgs' `lib` from ../shared/vendor/nixpkgs.lib beside the checkout, or the `lib`
directory that TSNSRV_NIXPKGS_LIB names (e.g. a checkout of
https://github.com/nix-community/nixpkgs.lib, which Nix 2.8 evaluates).

The NixOS options the module sets (systemd.services, assertions, security.acme.certs,
...) are declared minimally by tests/nix/eval-module.nix and `pkgs` is a stub, so the
units are checked as the module generates them, without building anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from harness.nixtools import (NIXPKGS_LIB, NO_LIB_REASON, TESTS, evaluate_module, nix_eval, nix_string, run_nix,
                              tsnsrv_check)
from tsnsrv import config

LIB = NIXPKGS_LIB

pytestmark = pytest.mark.skipif(LIB is None, reason=NO_LIB_REASON)

# The blog post's setup, as in docs/nixos.md.
BLOG = """{
  services.tsnsrv = {
    enable = true;
    defaults = {
      authKeyPath = "/run/secrets/tailscale-authkey";
      loginServerUrl = "https://headscale.example.com";
    };
    services = {
      books = {
        toURL = "http://127.0.0.1:8083";
        funnel = true;
        prefixes = [ "tailnet:/" "funnel:/kobo/" ];
        stripPrefix = false;
      };
      home = {
        urlParts.port = 8123;
        identityHeaders = [ "tsnsrv" "serve" ];
        supplementalGroups = [ "hass" ];
      };
      alertmanager = {
        toURL = "http://127.0.0.1:9093";
        accessRules = [ "allow user:me@example.com" "deny" ];
        loginServerUrl = null;
      };
      docs = {
        toURL = "http://docspell";
        upstreamUnixAddr = "/run/docspell/http.sock";
        suppressWhois = true;
        extraArgs = [ "--log-level=debug" ];
        tailscaledVerbose = true;
      };
      grafana = {
        toURL = "http://127.0.0.1:3000";
        acmeHost = "grafana.example.com";
      };
    };
  };
  services.resolved.enable = true;
  security.acme.certs."grafana.example.com".group = "certs";
}"""


def evaluation_error(configuration: str) -> str:
    expr = (f"(import {nix_string(TESTS / 'eval-module.nix')} {{ lib = import {nix_string(Path(LIB or ''))}; "
            f"configuration = {configuration}; }}).units")
    result = run_nix(["--readonly-mode", "--eval", "--strict", "--json", "-E", expr])
    assert result.returncode != 0, f"expected an evaluation error, got {result.stdout[:500]}"
    return result.stderr


@pytest.fixture(scope="module")
def blog() -> dict[str, Any]:
    return evaluate_module(BLOG)


def test_the_blog_setup_evaluates_without_failed_assertions(blog: dict) -> None:
    assert blog["failedAssertions"] == []
    names = {"books", "home", "alertmanager", "docs", "grafana"}
    assert set(blog["units"]) == {f"tsnsrv-{n}" for n in names} | {f"tsnsrv-{n}-tailscaled" for n in names}


@pytest.mark.parametrize("name", ["books", "home", "alertmanager", "docs", "grafana"])
def test_proxy_runs_the_rendered_config(blog: dict, name: str) -> None:
    unit = blog["units"][f"tsnsrv-{name}"]
    exec_start = unit["serviceConfig"]["ExecStart"]
    assert exec_start.startswith('"/nix/store/00000000000000000000000000000000-tsnsrv-0.1.0/bin/tsnsrv" "--config" ')
    # The stub names the file after a hash of its content: it is what render.nix
    # makes of this service's option values.
    assert f"{blog['expected'][name]['fileHash']}-tsnsrv-{name}.json" in exec_start


def test_rendered_values(blog: dict) -> None:
    settings = {name: e["settings"] for name, e in blog["expected"].items()}
    assert settings["docs"]["suppressWhois"] is True
    assert settings["books"]["suppressWhois"] is False
    assert settings["books"]["loginServerUrl"] == "https://headscale.example.com"  # from defaults
    assert "loginServerUrl" not in settings["alertmanager"]  # overridden with null
    assert settings["home"]["toURL"] == "http://127.0.0.1:8123"
    assert settings["alertmanager"]["accessRules"] == ["allow user:me@example.com", "deny"]
    assert settings["grafana"]["certificateFile"] == "/var/lib/acme/grafana.example.com/fullchain.pem"
    assert settings["home"]["tailscaledSocket"] == "/run/tsnsrv-home/tailscaled.sock"
    assert settings["home"]["authKeyPath"] == "/run/credentials/tsnsrv-home.service/authKey"


def test_proxy_unit(blog: dict) -> None:
    unit = blog["units"]["tsnsrv-home"]
    sc = unit["serviceConfig"]
    assert sc["Type"] == "notify" and sc["NotifyAccess"] == "main"
    assert sc["Restart"] == "always" and sc["RestartSec"] == "5s"
    assert unit["stopIfChanged"] is False
    assert unit["wantedBy"] == ["multi-user.target"]
    assert unit["requires"] == ["tsnsrv-home-tailscaled.service"]
    assert "tsnsrv-home-tailscaled.service" in unit["after"]
    assert sc["LoadCredential"] == ["authKey:/run/secrets/tailscale-authkey"]
    assert sc["SupplementaryGroups"] == ["hass"]
    assert "IPAddressDeny" not in sc  # the proxy reaches upstreams on loopback
    # A crashed proxy's Serve config is reset, so nobody else can take its front port.
    assert sc["ExecStopPost"].startswith("-") and sc["ExecStopPost"].endswith(
        '"--socket=/run/tsnsrv-home/tailscaled.sock" "serve" "reset"')
    assert blog["units"]["tsnsrv-docs"]["serviceConfig"]["ExecStart"].endswith('"--log-level=debug"')


def test_tailscaled_unit_is_confined_to_the_front_address(blog: dict) -> None:
    unit = blog["units"]["tsnsrv-home-tailscaled"]
    sc = unit["serviceConfig"]
    assert sc["IPAddressDeny"] == "localhost"
    assert sc["IPAddressAllow"] == ["127.0.0.2", "127.0.0.53", "127.0.0.54"]  # front address + resolved stub
    assert sc["ExecStart"] == (
        '"/nix/store/00000000000000000000000000000000-tailscale-1.98.1/bin/tailscaled" '
        '"--tun=userspace-networking" "--statedir=/var/lib/tsnsrv-home" '
        '"--socket=/run/tsnsrv-home/tailscaled.sock" "--port=0" "--no-logs-no-support"')
    assert sc["StateDirectory"] == "tsnsrv-home"
    assert sc["Type"] == "notify" and sc["Restart"] == "always"
    assert unit["environment"] == {"TS_LOGS_DIR": "/var/lib/tsnsrv-home"}
    assert "--verbose=1" in blog["units"]["tsnsrv-docs-tailscaled"]["serviceConfig"]["ExecStart"]


def test_both_units_share_user_and_runtime_directory(blog: dict) -> None:
    proxy = blog["units"]["tsnsrv-books"]["serviceConfig"]
    daemon = blog["units"]["tsnsrv-books-tailscaled"]["serviceConfig"]
    for key in ("DynamicUser", "User", "Group", "RuntimeDirectory", "RuntimeDirectoryPreserve"):
        assert proxy[key] == daemon[key], key
    assert proxy["User"] == "tsnsrv-books" and proxy["DynamicUser"] is True
    assert proxy["RuntimeDirectoryPreserve"] is True


@pytest.mark.parametrize("unit", ["tsnsrv-books", "tsnsrv-books-tailscaled"])
def test_hardening(blog: dict, unit: str) -> None:
    sc = blog["units"][unit]["serviceConfig"]
    expected = {
        "CapabilityBoundingSet": "", "AmbientCapabilities": "", "NoNewPrivileges": True, "PrivateDevices": True,
        "PrivateTmp": True, "PrivateUsers": False, "ProtectSystem": "strict", "ProtectHome": True,
        "ProtectProc": "invisible", "ProtectKernelTunables": True, "ProtectKernelModules": True,
        "ProtectControlGroups": True, "RestrictNamespaces": True, "LockPersonality": True,
        "MemoryDenyWriteExecute": True, "RestrictSUIDSGID": True, "SystemCallArchitectures": "native",
    }
    assert {key: sc.get(key) for key in expected} == expected
    assert "@system-service" in sc["SystemCallFilter"]
    assert set(sc["RestrictAddressFamilies"]) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


def test_acme_host(blog: dict) -> None:
    unit = blog["units"]["tsnsrv-grafana"]
    assert "acme-grafana.example.com.service" in unit["after"]
    assert "acme-grafana.example.com.service" in unit["wants"]
    assert unit["serviceConfig"]["SupplementaryGroups"] == ["certs"]
    assert blog["acmeReloads"]["grafana.example.com"] == ["tsnsrv-grafana.service"]
    assert "kill -HUP $MAINPID" in unit["serviceConfig"]["ExecReload"]


ASSERTION_CASES = {
    "no upstream": ("{ a = { }; }", "services.tsnsrv.services.a: set toURL"),
    "funnel with plaintext": ('{ a = { toURL = "http://x:1"; funnel = true; plaintext = true; }; }',
                              "Funnel only carries TLS"),
    "certificate without key": ('{ a = { toURL = "http://x:1"; certificateFile = "/etc/c.pem"; }; }',
                                "certificateFile and certificateKey must be set together"),
    "duplicate names": ('{ a = { toURL = "http://x:1"; name = "web"; }; b = { toURL = "http://x:1"; name = "web"; }; }',
                        "machine name(s) web used by more than one service"),
    "front address on 127.0.0.1": ('{ a = { toURL = "http://x:1"; frontAddress = "127.0.0.1"; }; }',
                                   'frontAddress = "127.0.0.1" must be'),
    "control server on loopback": ('{ a = { toURL = "http://x:1"; loginServerUrl = "http://127.0.0.1:8080"; }; }',
                                   "is on host loopback"),
    "funnelOnly without funnel": ('{ a = { toURL = "http://x:1"; funnelOnly = true; }; }', "funnelOnly = true needs"),
    # What nixos/tailscale-trimmed.nix makes, as far as the module reads it.
    "log upload on the trimmed tailscale": (
        '{ a = { toURL = "http://x:1"; tailscaledLogUpload = true; tailscalePackage = { type = "derivation"; '
        'name = "tailscale-1.98.10"; version = "1.98.10"; outPath = "/nix/store/00000000000000000000000000000000-'
        'tailscale-1.98.10"; omittedFeatures = [ "logtail" ]; }; }; }', "built without log upload"),
    "long attribute name": ('{ a-very-long-service-attribute-name = { toURL = "http://x:1"; }; }',
                            "1-24 lowercase letters"),
    # A migrating user's configuration, written for the Go tsnsrv's module.
    "the Go tsnsrv's listenAddr": ('{ a = { toURL = "http://x:1"; listenAddr = ":8443"; }; }',
                                   "services.tsnsrv.services.a.listenAddr is an option of the Go tsnsrv's module, "
                                   "not of this one: use listenPort"),
    "the Go tsnsrv's tsnetVerbose": ('{ a = { toURL = "http://x:1"; tsnetVerbose = true; }; }',
                                     "use tailscaledVerbose"),
    "the Go tsnsrv's suppressTailnetDialer": ('{ a = { toURL = "http://x:1"; suppressTailnetDialer = true; }; }',
                                              "has no tailnet dialer"),
    # Both would make tsnsrv-web-tailscaled.service, and one proxy unit would silently vanish.
    "unit name clash": ('{ web = { toURL = "http://x:1"; }; web-tailscaled = { toURL = "http://x:2"; '
                        'name = "other"; }; }', "tsnsrv-web-tailscaled.service"),
}


@pytest.mark.parametrize("case", sorted(ASSERTION_CASES))
def test_assertions(case: str) -> None:
    services, message = ASSERTION_CASES[case]
    result = evaluate_module(f"{{ services.tsnsrv = {{ enable = true; services = {services}; }}; }}")
    assert any(message in failed for failed in result["failedAssertions"]), result["failedAssertions"]


def test_the_go_tsnsrvs_options_are_refused_in_the_defaults_too() -> None:
    result = evaluate_module('{ services.tsnsrv = { enable = true; defaults.tsnetVerbose = true; '
                             'services.a.toURL = "http://x:1"; }; }')
    assert result["failedAssertions"] == [
        "services.tsnsrv.defaults.tsnetVerbose is an option of the Go tsnsrv's module, not of this one: use "
        "tailscaledVerbose: each service runs a tailscaled of its own, which takes the place of tsnet."]


def test_a_valid_service_fails_no_assertion() -> None:
    result = evaluate_module('{ services.tsnsrv = { enable = true; services.a.toURL = "http://x:1"; }; }')
    assert result["failedAssertions"] == []


def test_old_tailscale_is_refused() -> None:
    result = evaluate_module('{ services.tsnsrv = { enable = true; services.a.toURL = "http://x:1"; }; }', "1.90.3")
    assert any("tailscale 1.90.3, but tsnsrv needs 1.92 or newer" in m for m in result["failedAssertions"])


def test_tags_must_be_tags() -> None:
    error = evaluation_error('{ services.tsnsrv = { enable = true; services.a = { toURL = "http://x:1"; '
                             'tags = [ "server" ]; }; }; }')
    assert "tags" in error and "tag:" in error


def test_secrets_cannot_be_store_paths() -> None:
    error = evaluation_error('{ services.tsnsrv = { enable = true; services.a = { toURL = "http://x:1"; '
                             'authKeyPath = "/nix/store/00000000000000000000000000000000-key"; }; }; }')
    assert "authKeyPath" in error


def test_disabled_module_defines_nothing() -> None:
    result = evaluate_module('{ services.tsnsrv.services.a.toURL = "http://x:1"; }')
    assert result["units"] == {} and result["failedAssertions"] == []


def test_option_tree_matches_the_stub_evaluation_and_the_runtime(blog: dict) -> None:
    stub = nix_eval(f"import {nix_string(TESTS / 'options-eval.nix')}")
    real = blog["options"]
    assert set(real["services"]) == set(stub["services"])
    assert set(real["defaults"]) == set(stub["defaults"])
    for name, option in real["services"].items():
        assert option["type"] == stub["services"][name]["type"], name
    # With nothing set in `defaults` but the key path, every default is the runtime's.
    values = evaluate_module('{ services.tsnsrv.enable = true; }')["options"]["defaultValues"]
    for key, field in config.FIELDS.items():
        if key not in values:
            continue
        default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default  # type: ignore[arg-type]
        ours = values[key]
        if isinstance(default, float) and not isinstance(ours, bool):
            ours = float(ours)
        assert ours == default, f"{key}: module default {values[key]!r}, runtime default {default!r}"


# --- identity assertions ---------------------------------------------------------------

ASSERTIONS = """{
  services.tsnsrv = {
    enable = true;
    defaults.assertions = true;
    services.books.toURL = "http://127.0.0.1:8083";
    services.grafana = {
      toURL = "http://127.0.0.1:3000";
      assertionAudience = "grafana";
      assertionJwksFile = "/var/lib/grafana/tsnsrv/jwks.json";
      supplementalGroups = [ "grafana" ];
    };
    services.plain = { toURL = "http://127.0.0.1:9000"; assertions = false; };
  };
}"""


@pytest.fixture(scope="module")
def asserted() -> dict[str, Any]:
    return evaluate_module(ASSERTIONS)


def test_the_signing_keys_are_in_a_state_directory_of_the_proxy_unit_alone(asserted: dict, tmp_path) -> None:
    assert asserted["failedAssertions"] == []
    proxy = asserted["units"]["tsnsrv-books"]["serviceConfig"]
    daemon = asserted["units"]["tsnsrv-books-tailscaled"]["serviceConfig"]
    assert proxy["StateDirectory"] == "tsnsrv-keys.d/books" and proxy["StateDirectoryMode"] == "0700"
    assert daemon["StateDirectory"] == "tsnsrv-books"  # the daemon's namespace holds no keys
    settings = asserted["expected"]["books"]["settings"]
    assert settings["assertionKeyDir"] == "/var/lib/tsnsrv-keys.d/books"
    assert settings["assertions"] is True
    assert tsnsrv_check(settings, tmp_path).returncode == 0


def test_the_public_keys_go_where_upstreams_read_them(asserted: dict) -> None:
    books = asserted["units"]["tsnsrv-books"]["serviceConfig"]
    assert asserted["expected"]["books"]["settings"]["assertionJwksFile"] == "/run/tsnsrv-jwks.d/books.json"
    assert books["ReadWritePaths"] == ["-/run/tsnsrv-jwks.d"]
    assert "tsnsrv-jwks" in books["SupplementaryGroups"]
    # Anyone may read; the services may add files; each file stays its writer's (sticky).
    assert asserted["tmpfilesRules"] == ["d /run/tsnsrv-jwks.d 1775 root tsnsrv-jwks - -"]
    assert "tsnsrv-jwks" in asserted["groups"]
    grafana = asserted["units"]["tsnsrv-grafana"]["serviceConfig"]
    assert asserted["expected"]["grafana"]["settings"]["assertionJwksFile"] == "/var/lib/grafana/tsnsrv/jwks.json"
    assert grafana["ReadWritePaths"] == ["-/var/lib/grafana/tsnsrv"]
    assert grafana["SupplementaryGroups"] == ["grafana"]


def test_a_service_without_assertions_gets_none_of_it(asserted: dict) -> None:
    plain = asserted["units"]["tsnsrv-plain"]["serviceConfig"]
    assert "StateDirectory" not in plain and "ReadWritePaths" not in plain
    assert "assertionJwksFile" not in asserted["expected"]["plain"]["settings"]
    result = evaluate_module('{ services.tsnsrv = { enable = true; services.a.toURL = "http://x:1"; }; }')
    assert result["tmpfilesRules"] == [] and result["groups"] == []


def test_a_sidecar_publishes_its_keys_on_its_volume(tmp_path) -> None:
    result = evaluate_module(SIDECARS.replace("funnel = true;", "funnel = true; assertions = true;"))
    settings = result["expectedSidecars"]["books-tailnet"]["settings"]
    assert settings["assertionJwksFile"] == "/state/jwks.json"
    assert "assertionKeyDir" not in settings  # the default: /state/assertion-keys
    assert tsnsrv_check(settings, tmp_path, "sidecar").returncode == 0
    outside = evaluate_module(SIDECARS.replace(
        "funnel = true;", 'funnel = true; assertions = true; assertionJwksFile = "/srv/jwks.json";'))
    assert any("assertionJwksFile" in m and "under /state/" in m for m in outside["failedAssertions"])


# --- OCI sidecars ---------------------------------------------------------------------

SIDECARS = """{
  services.tsnsrv.defaults = {
    authKeyPath = "/run/secrets/tailscale-authkey";
    loginServerUrl = "https://headscale.example.com";
  };
  virtualisation.oci-containers.containers.calibre-web = { image = "calibre-web:latest"; };
  virtualisation.oci-sidecars.tsnsrv = {
    enable = true;
    containers.books-tailnet = {
      name = "books";
      forContainer = "calibre-web";
      service = { toURL = "http://127.0.0.1:8083"; funnel = true; };
    };
  };
}"""


@pytest.fixture(scope="module")
def sidecars() -> dict[str, Any]:
    return evaluate_module(SIDECARS)


def test_a_sidecar_runs_in_its_apps_network_from_the_tsnsrv_image(sidecars: dict) -> None:
    assert sidecars["failedAssertions"] == []
    container = sidecars["containers"]["books-tailnet"]
    assert container["image"] == "tsnsrv:0.1.0"
    assert container["imageFile"] == "/nix/store/00000000000000000000000000000000-docker-image-tsnsrv.tar.gz"
    assert container["dependsOn"] == ["calibre-web"]
    assert container["extraOptions"] == ["--network=container:calibre-web", "--cap-drop=all",
                                         "--security-opt=no-new-privileges", "--read-only"]
    assert container["user"] == "65532:65532"  # never root: tsnsrv would refuse to run tailscaled as root
    state, credentials, config_file = container["volumes"]
    assert state == "/var/lib/podman-books-tailnet:/state"
    assert credentials == "/run/podman-books-tailnet:/run/tsnsrv-credentials:ro"
    expected = sidecars["expectedSidecars"]["books-tailnet"]
    assert config_file.endswith(f"-{expected['fileHash']}-tsnsrv-sidecar-books-tailnet.json:/etc/tsnsrv.json:ro")
    assert container["cmd"] == ["--config", "/etc/tsnsrv.json"]


def test_a_sidecar_spawns_its_own_tailscaled_with_state_on_the_volume(sidecars: dict, tmp_path) -> None:
    settings = sidecars["expectedSidecars"]["books-tailnet"]["settings"]
    assert settings["name"] == "books" and settings["funnel"] is True
    assert settings["stateDir"] == "/state" and settings["controlSocket"] == "/state/control.sock"
    assert "tailscaledSocket" not in settings  # spawn mode, under the loopback guard
    assert settings["authKeyPath"] == "/run/tsnsrv-credentials/authKey"
    result = tsnsrv_check(settings, tmp_path, "sidecar")
    assert result.returncode == 0, result.stderr


def test_a_sidecars_unit_hands_over_the_key_and_the_app_keeps_it_up(sidecars: dict) -> None:
    unit = sidecars["units"]["podman-books-tailnet"]["serviceConfig"]
    assert unit["LoadCredential"] == ["authKey:/run/secrets/tailscale-authkey"]
    # Made by the unit for the image's account: a StateDirectory= would be given back to
    # root (the unit's user) on every start, and the sidecar could not read its state.
    assert "StateDirectory" not in unit
    # Beside the one oci-containers names after the container (merged, not clashing).
    assert sorted(unit["RuntimeDirectory"]) == ["books-tailnet", "podman-books-tailnet"]
    state, chown, install, oci_pre_start = unit["ExecStartPre"]  # ours first, as root, before podman's
    assert state.endswith("install -d -m 0700 -o 65532 -g 65532 /var/lib/podman-books-tailnet")
    assert chown.endswith("chown 65532:65532 /run/podman-books-tailnet")
    assert "install -o 65532 -g 65532 -m 0400 ${CREDENTIALS_DIRECTORY}/authKey /run/podman-books-tailnet/authKey" \
        in install
    assert oci_pre_start.endswith("-pre-start/bin/pre-start")
    assert sidecars["units"]["podman-books-tailnet"]["requires"] == ["podman-calibre-web.service"]
    assert sidecars["units"]["podman-calibre-web"]["unitConfig"]["Upholds"] == ["podman-books-tailnet.service"]


def test_a_sidecar_refuses_the_go_tsnsrvs_options_as_services_do() -> None:
    result = evaluate_module(SIDECARS.replace("funnel = true;", 'funnel = true; listenAddr = ":8443";'))
    assert result["failedAssertions"] == [
        "virtualisation.oci-sidecars.tsnsrv.containers.books-tailnet.service.listenAddr is an option of the Go "
        'tsnsrv\'s module, not of this one: use listenPort, a port number (listenAddr = ":8443" becomes '
        "listenPort = 8443)."]


def test_a_sidecar_for_a_missing_container_is_refused() -> None:
    result = evaluate_module(SIDECARS.replace('forContainer = "calibre-web"', 'forContainer = "calibre"'))
    assert any('forContainer = "calibre" is not a container' in m for m in result["failedAssertions"])
