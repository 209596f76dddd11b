"""Every Nix file of the repository parses (`nix-instantiate --parse`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.nixtools import REPO, run_nix


def nix_files() -> list[Path]:
    return sorted(path for path in REPO.rglob("*.nix")
                  if not any(part.startswith(".") for part in path.relative_to(REPO).parts))


def test_the_flake_and_the_module_are_there() -> None:
    names = {path.relative_to(REPO).as_posix() for path in nix_files()}
    expected = {"flake.nix", "nixos/module.nix", "nixos/render.nix", "nixos/options.nix", "nixos/package.nix",
                "nixos/tests/default.nix", "nixos/tests/tailnet.nix", "nixos/tests/oci.nix",
                "nixos/tests/headscale.nix", "nixos/oci-sidecars.nix", "nixos/oci-image.nix"}
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.parametrize("path", nix_files(), ids=lambda path: path.relative_to(REPO).as_posix())
def test_parses(path: Path) -> None:
    result = run_nix(["--parse", str(path)])
    assert result.returncode == 0, f"{path.relative_to(REPO)} does not parse:\n{result.stderr}"
