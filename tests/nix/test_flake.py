"""flake.nix and flake.lock: pinned to a NixOS release, outputs as documented.

The lock and the inputs are checked with Nix alone; the outputs (evaluated with a stub
package set) and the package's declared dependencies need nixpkgs' lib (nixtools).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from harness.nixtools import NIXPKGS_LIB, NO_LIB_REASON, REPO, TESTS, nix_eval, nix_string

LIB = NIXPKGS_LIB
needs_lib = pytest.mark.skipif(LIB is None, reason=NO_LIB_REASON)
LINUX = {"x86_64-linux", "aarch64-linux"}
ALL = LINUX | {"x86_64-darwin", "aarch64-darwin"}


def test_nixpkgs_is_pinned_to_the_release_the_flake_names() -> None:
    inputs = nix_eval(f"builtins.mapAttrs (_: i: i.url) (import {nix_string(REPO / 'flake.nix')}).inputs")
    assert inputs == {"nixpkgs": "github:NixOS/nixpkgs/nixos-26.05"}
    lock = json.loads((REPO / "flake.lock").read_text())
    assert lock["version"] == 7 and lock["root"] == "root"
    assert lock["nodes"]["root"]["inputs"] == {"nixpkgs": "nixpkgs"}
    node = lock["nodes"]["nixpkgs"]
    assert node["original"] == {"owner": "NixOS", "repo": "nixpkgs", "ref": "nixos-26.05", "type": "github"}
    locked = node["locked"]
    assert locked["type"] == "github" and (locked["owner"], locked["repo"]) == ("NixOS", "nixpkgs")
    assert re.fullmatch(r"[0-9a-f]{40}", locked["rev"])
    assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked["narHash"])
    assert isinstance(locked["lastModified"], int)


@pytest.fixture(scope="module")
def flake() -> dict[str, Any]:
    return nix_eval(f"import {nix_string(TESTS / 'eval-flake.nix')} {{ lib = import {nix_string(Path(LIB or ''))}; }}")


@needs_lib
def test_outputs(flake: dict[str, Any]) -> None:
    assert {s: sorted(p) for s, p in flake["packages"].items()} == {
        s: ["default"] + (["tailscaleTrimmed"] if s in LINUX else []) + ["tsnsrv"]
        + (["tsnsrvOciImage"] if s in LINUX else []) for s in ALL}
    assert flake["packageFile"] == "package.nix"
    assert set(flake["checks"]) == LINUX
    assert all({"package", "vm-tailnet", "vm-tailnet-trimmed", "vm-oci"} <= set(c) for c in flake["checks"].values())
    assert {name: [Path(path).name.split("-", 1)[1] for path in imports]
            for name, imports in flake["vmTests"].items()} == {
        "vm-tailnet": ["tailnet.nix"], "vm-tailnet-trimmed": ["tailnet.nix"], "vm-oci": ["oci.nix"]}
    assert set(flake["devShells"]) == ALL
    assert set(flake["formatter"]) == ALL and set(flake["formatter"].values()) == {"nixfmt-tree"}
    assert flake["nixosModules"] == {"default": str(REPO / "nixos/module.nix"),
                                     "tsnsrv": str(REPO / "nixos/module.nix")}
    assert flake["overlay"] == ["tailscaleTrimmed", "tsnsrv"]
    assert flake["trimmedPackageFile"] == flake["overlayTrimmedFile"] == "tailscale-trimmed.nix"
    assert flake["vmTrimmedTailscaleFile"] == "tailscale-trimmed.nix"


@needs_lib
def test_package_declares_what_pyproject_needs(flake: dict[str, Any]) -> None:
    project = tomllib.loads((REPO / "python" / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[=<>~!\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}

    package = flake["package"]
    assert package["pname"] == project["name"] and package["version"] == project["version"]
    assert set(package["dependencies"]) == names(project["dependencies"])
    missing = names(project["optional-dependencies"]["test"]) - {"pytest"} - set(package["checkInputs"])
    assert not missing, f"test dependencies missing from the package's check inputs: {sorted(missing)}"
    assert package["mainProgram"] == "tsnsrv"
    assert package["enabledTestPaths"] == ["tests/unit"]
    assert {"x86_64-linux", "aarch64-darwin"} <= set(package["platforms"])


@needs_lib
def test_the_package_check_phase_runs_the_unit_tier_as_pytest_check_hook_does(flake: dict[str, Any]) -> None:
    """nixpkgs' pytestCheckHook imports test modules with --import-mode=importlib, where a
    test module cannot import another one; the unit tier must pass that way too."""
    package = flake["package"]
    result = subprocess.run([sys.executable, "-m", "pytest", "--import-mode=importlib", "-q",
                             *package["pytestFlags"], *package["enabledTestPaths"],
                             "-k", " and ".join(f"not {name}" for name in package["disabledTests"])],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
