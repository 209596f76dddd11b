"""The `server` of the VM test as the guest sees it: nixos/module.nix and the scenarios'
server configuration evaluated with the real nixpkgs lib, its units rendered as NixOS
writes them (tests/nix/systemd-units.nix), and every store path those units name made
real on the run disk, which the guest mounts at /nix.

Store paths of the stub package set become: tsnsrv (this checkout's python/tsnsrv, run by
the guest's virtualenv), tailscale (the pinned binaries the tests build), the rendered
configuration files, files of nixos/tests named by path, and the base system (coreutils,
systemd, Python) pointing at the guest's own /usr. A store path this cannot provide fails
the run by name.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import attrs

from .nixtools import NIXPKGS_LIB, nix_eval, nix_string

REPO = Path(__file__).resolve().parents[2]
STORE_PATH = re.compile(r"/nix/store/[0-9a-z]{32}-[^/\"' ]+")
TAILSCALE_VERSION = "1.98.10"  # scripts/tailnet-binaries
BASE_SYSTEM = ("coreutils-", "findutils-", "gnugrep-", "gnused-", "systemd-", "glibc-locales-")
# Test-only environment of the guest's units: DERP over plain HTTP (this tailnet's headscale
# has no TLS) and nothing that could leave the machine (reference/local-tailnet.md §2.4).
OFFLINE_DROP_IN = """[Service]
Environment=TS_DEBUG_USE_DERP_HTTP=1
Environment=TS_DISABLE_PORTMAPPER=1
Environment=TS_DEBUG_OMIT_LOCAL_ADDRS=1
Environment=TS_PANIC_IF_HIT_MAIN_CONTROL=1
Environment=TS_NO_LOGS_NO_SUPPORT=true
"""


@attrs.frozen
class Configuration:
    units: dict[str, str]  # unit file name -> text
    wanted_by: dict[str, list[str]]
    config_files: dict[str, dict[str, Any]]  # fileHash -> settings
    acme_reloads: dict[str, list[str]]  # certificate -> the units its renewal reloads
    tmpfiles_rules: list[str]  # systemd.tmpfiles.rules
    groups: list[str]  # users.groups


def evaluate(scenario_args: dict[str, Any], extra_modules: list[str], changed: bool) -> Configuration:
    """The guest's units for the scenarios' `server` (with its `changed` configuration)."""
    scenarios = (f"(import {nix_string(REPO / 'nixos/tests/scenarios.nix')} "
                 f"{{ inherit lib pkgs; {scenario_args_nix(scenario_args)} }})")
    modules = [f"({{ lib, pkgs, ... }}: {scenarios}.server)"]
    if changed:
        modules.append(f"({{ lib, pkgs, ... }}: {scenarios}.changed)")
    modules += extra_modules
    expr = (f"let lib = import {nix_string(NIXPKGS_LIB)}; result = import {nix_string(REPO / 'tests/nix/eval-module.nix')}"
            f" {{ inherit lib; configuration = {{ }}; modules = [ {' '.join(modules)} ];"
            f" tailscaleVersion = {json.dumps(TAILSCALE_VERSION)}; }}; in {{"
            " inherit (result) failedAssertions acmeReloads tmpfilesRules groups;"
            " units = builtins.mapAttrs (_: unit: unit.text) result.unitFiles;"
            " wantedBy = builtins.mapAttrs (_: unit: unit.wantedBy) result.unitFiles;"
            " configs = builtins.listToAttrs (map (e: { name = e.fileHash; value = e.settings; })"
            " (builtins.attrValues result.expected)); }")
    result = nix_eval(expr)
    if result["failedAssertions"]:
        raise AssertionError(f"the server configuration fails assertions: {result['failedAssertions']}")
    return Configuration(result["units"], result["wantedBy"], result["configs"], result["acmeReloads"],
                         result["tmpfilesRules"], result["groups"])


def scenario_args_nix(args: dict[str, Any]) -> str:
    return " ".join(f"{key} = {json.dumps(value)};" for key, value in args.items())


def test_script(scenario_args: dict[str, Any]) -> str:
    """The scenarios' testScript, as the NixOS test driver would get it."""
    expr = (f"let lib = import {nix_string(NIXPKGS_LIB)}; pkgs = import {nix_string(REPO / 'tests/nix/stub-pkgs.nix')}"
            f" {{ inherit lib; tailscaleVersion = {json.dumps(TAILSCALE_VERSION)}; }}; in (import {nix_string(REPO / 'nixos/tests/scenarios.nix')}"
            f" {{ inherit lib pkgs; {scenario_args_nix(scenario_args)} }}).testScript")
    return nix_eval(expr)


class RunDisk:
    """The tree that becomes the guest's /nix."""

    def __init__(self, root: Path, bin_dir: Path):
        self.root = root
        self.store = root / "store"
        self.store.mkdir(parents=True)
        self.bin_dir = bin_dir
        self.config_files: dict[str, dict[str, Any]] = {}

    def add_configuration(self, name: str, configuration: Configuration) -> None:
        """Units under /nix/units/NAME, and whatever store paths they name."""
        units = self.root / "units" / name
        units.mkdir(parents=True)
        self.config_files.update(configuration.config_files)
        for unit, text in configuration.units.items():
            (units / unit).write_text(text)
            for path in STORE_PATH.findall(text):
                self.provide(path)
        (units / "wanted-by.json").write_text(json.dumps(configuration.wanted_by))
        # What NixOS's activation makes of users.groups and systemd.tmpfiles.rules.
        (units / "groups").write_text("".join(f"{group}\n" for group in configuration.groups))
        (units / "tmpfiles.conf").write_text("".join(f"{rule}\n" for rule in configuration.tmpfiles_rules))

    def provide(self, store_path: str, text: str | None = None) -> None:
        target = self.store / store_path.removeprefix("/nix/store/")
        if target.exists() or target.is_symlink():
            return
        name = store_path.split("-", 1)[1]
        if text is not None:
            target.write_text(text)
        elif name.startswith(BASE_SYSTEM) or name == "python3-3.13":
            target.symlink_to("/usr")
        elif name == "python3-3.13-env":
            target.symlink_to("/opt/tsnsrv-venv")
        elif name.startswith("tsnsrv-") and name[7:8].isdigit():
            (target / "bin").mkdir(parents=True)
            shutil.copytree(REPO / "python" / "tsnsrv", target / "lib" / "tsnsrv",
                            ignore=shutil.ignore_patterns("__pycache__"))
            wrapper = target / "bin" / "tsnsrv"
            wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={store_path}/lib exec /opt/tsnsrv-venv/bin/python -m tsnsrv \"$@\"\n")
            wrapper.chmod(0o755)
        elif name.startswith("tailscale-"):
            (target / "bin").mkdir(parents=True)
            for binary in ("tailscaled", "tailscale"):
                shutil.copy2(self.bin_dir / binary, target / "bin" / binary)
        elif name.endswith(".json-checked") and name.split("-", 1)[0] in self.config_files:
            target.write_text(json.dumps(self.config_files[name.split("-", 1)[0]]))
        elif (REPO / "nixos" / "tests" / name).is_file():
            shutil.copy2(REPO / "nixos" / "tests" / name, target)
        else:
            raise AssertionError(f"the run disk cannot provide {store_path}")
