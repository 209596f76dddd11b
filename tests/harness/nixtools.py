"""Running the Nix evaluator from the Nix check tier.

Only `nix-instantiate` is needed (Debian's nix-bin 2.8 is enough): evaluation runs in
read-only mode with a throw-away state directory, so no Nix store or daemon is set up
and nothing is built or downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests" / "nix"
NIXOS = REPO / "nixos"
TSNSRV = [sys.executable, "-m", "tsnsrv"]
# nixpkgs' lib/, beside every checkout and CI run; TSNSRV_NIXPKGS_LIB overrides it.
VENDORED_NIXPKGS_LIB = REPO.parent / "shared" / "vendor" / "nixpkgs.lib" / "lib"


def nixpkgs_lib() -> Path | None:
    """The nixpkgs lib directory to evaluate the module with, if there is one."""
    if os.environ.get("TSNSRV_NIXPKGS_LIB"):
        return Path(os.environ["TSNSRV_NIXPKGS_LIB"]).resolve()
    return VENDORED_NIXPKGS_LIB if (VENDORED_NIXPKGS_LIB / "default.nix").exists() else None


NIXPKGS_LIB = nixpkgs_lib()
NO_LIB_REASON = ("no nixpkgs lib: neither ../shared/vendor/nixpkgs.lib/lib beside the checkout nor "
                 "TSNSRV_NIXPKGS_LIB (a lib/ directory of github.com/nix-community/nixpkgs.lib)")

_STATE = tempfile.mkdtemp(prefix="tsnsrv-nix-state-")


def nix_instantiate() -> str:
    found = shutil.which("nix-instantiate")
    if found is None:
        pytest.skip("nix-instantiate is not installed (scripts/bootstrap installs Debian's nix-bin)")
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["NIX_STATE_DIR"] = _STATE
    # Debian's nix.conf names a build group that need not exist: evaluation never builds.
    env["NIX_CONFIG"] = "build-users-group =\n" + env.get("NIX_CONFIG", "")
    env.pop("NIX_PATH", None)
    return env


def run_nix(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([nix_instantiate(), *args], capture_output=True, text=True, env=_env(), timeout=300)


def nix_eval(expr: str, *, args: dict[str, str] | None = None) -> Any:
    """The value of a Nix expression (evaluated strictly) as JSON data."""
    argv = ["--readonly-mode", "--eval", "--strict", "--json"]
    for name, value in (args or {}).items():
        argv += ["--argstr", name, value]
    result = run_nix([*argv, "-E", expr])
    if result.returncode != 0:
        raise AssertionError(f"nix-instantiate failed on:\n{expr}\n{result.stderr}")
    return json.loads(result.stdout)


def nix_string(path: Path) -> str:
    """A path as a Nix expression."""
    return json.dumps(str(path))


# nixos/tailscale-trimmed.nix built from the stub package set's tailscale: what the flake's
# tailscaleTrimmed is, evaluated without a build (a Nix expression; needs `lib` in scope).
TRIMMED_TAILSCALE = (f"import {nix_string(NIXOS / 'tailscale-trimmed.nix')} {{ inherit lib; "
                     f"tailscale = (import {nix_string(TESTS / 'stub-pkgs.nix')} "
                     "{ inherit lib; tailscaleVersion = \"1.98.10\"; }).tailscale; }")


def evaluate_module(configuration: str, tailscale_version: str = "1.98.1") -> dict[str, Any]:
    """tests/nix/eval-module.nix on a configuration (Nix source): the module evaluated
    with the real nixpkgs lib, its units, assertions and sidecars as JSON."""
    return nix_eval(f"import {nix_string(TESTS / 'eval-module.nix')} {{ lib = import {nix_string(Path(NIXPKGS_LIB or ''))}; "
                    f"configuration = {configuration}; tailscaleVersion = {json.dumps(tailscale_version)}; }}")


def tsnsrv_check(config: dict[str, Any], tmp_path: Path, name: str = "service") -> subprocess.CompletedProcess[str]:
    """`tsnsrv check --config FILE` on a rendered configuration."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    return subprocess.run([*TSNSRV, "check", "--config", str(path)], capture_output=True, text=True, env=env,
                          timeout=60)
