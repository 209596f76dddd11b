"""nixos/tailscale-trimmed.nix: nixpkgs' tailscale built with exactly the omissions of
nixos/tailscale-features.txt (the list scripts/tailnet-binaries builds the tests' copy
from; tests/e2e/test_tailscale_builds.py checks that copy against the same list), the
module taking it as a service's tailscalePackage, and docs/trimmed-tailscaled.md's way
of choosing it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from harness.binaries import omit_tags
from harness.nixtools import (NIXPKGS_LIB, NO_LIB_REASON, REPO, TRIMMED_TAILSCALE as TRIMMED, evaluate_module, nix_eval,
                              nix_string)

pytestmark = pytest.mark.skipif(NIXPKGS_LIB is None, reason=NO_LIB_REASON)


@pytest.fixture(scope="module")
def trimmed() -> dict[str, Any]:
    return nix_eval(f"let lib = import {nix_string(Path(NIXPKGS_LIB or ''))}; package = {TRIMMED}; in "
                    "{ inherit (package) tags version omittedFeatures; inherit (package.meta) description; }")


def test_it_is_nixpkgs_tailscale_with_every_omission_of_the_feature_list(trimmed: dict[str, Any]) -> None:
    assert trimmed["tags"][0] == "ts_include_cli"  # nixpkgs' own tag: the CLI inside tailscaled
    assert len(trimmed["tags"]) == len(set(trimmed["tags"]))
    assert set(trimmed["tags"][1:]) == omit_tags("trimmed")
    assert {f"ts_omit_{feature}" for feature in trimmed["omittedFeatures"]} == omit_tags("trimmed")
    assert trimmed["version"] == "1.98.10"  # what the module's version check reads
    assert "trimmed" in trimmed["description"]


LOG_UPLOAD_REFUSED = ("services.tsnsrv.services.chatty: tailscaledLogUpload = true, but tailscalePackage is built "
                      "without log upload (the trimmed tailscale); use pkgs.tailscale for this service.")


def test_a_service_runs_it_and_may_not_ask_it_for_log_upload() -> None:
    service = f"""{{ lib, ... }}: {{ services.tsnsrv = {{ enable = true;
      defaults.tailscalePackage = {TRIMMED};
      services.quiet.toURL = "http://127.0.0.1:1";
      services.chatty = {{ toURL = "http://127.0.0.1:2"; tailscaledLogUpload = true; }}; }}; }}"""
    result = evaluate_module(service)
    assert result["failedAssertions"] == [LOG_UPLOAD_REFUSED]
    daemon = result["units"]["tsnsrv-quiet-tailscaled"]["serviceConfig"]["ExecStart"]
    assert daemon.startswith('"/nix/store/00000000000000000000000000000000-tailscale-1.98.10/bin/tailscaled"')


def test_the_docs_way_of_choosing_it_gives_every_service_the_flakes_package(tmp_path) -> None:
    doc = (REPO / "docs" / "trimmed-tailscaled.md").read_text()
    example = tmp_path / "example.nix"
    example.write_text(next(block for block in re.findall(r"```nix\n(.*?)```", doc, flags=re.S)
                            if "tailscalePackage" in block))
    # The flake as the example's `tsnsrv` argument, with its package built from the stub tailscale.
    configuration = f"""{{ lib, pkgs, ... }}@args: lib.recursiveUpdate
      (import {nix_string(example)} (args // {{ tsnsrv.packages.x86_64-linux.tailscaleTrimmed = {TRIMMED}; }}))
      {{ services.tsnsrv = {{ enable = true;
           services.chatty = {{ toURL = "http://127.0.0.1:2"; tailscaledLogUpload = true; }}; }}; }}"""
    assert evaluate_module(configuration)["failedAssertions"] == [LOG_UPLOAD_REFUSED]
