"""The pinned binaries the tests and the benchmarks run, built by scripts/tailnet-binaries.

Two builds of tailscale: `stock` (every feature, less the probes that would leave the
machine) and `trimmed` (only the features nixos/tailscale-features keeps; see
docs/trimmed-tailscaled.md). headscale and the client devices always use the stock
build; a service's own tailscaled uses whichever build a run asks for.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILDS = ("stock", "trimmed")
FEATURES = REPO / "nixos" / "tailscale-features.txt"
# What picks the build of the services' tailscaled when no --tailscale-build is given.
BUILD_ENV = "TSNSRV_TAILSCALE_BUILD"


class BuildFailed(RuntimeError):
    pass


# scripts/tailnet-binaries' arguments for each build.
BUILD_ARGS: dict[str, tuple[str, ...]] = {"stock": (), "trimmed": ("trimmed",)}


@functools.cache
def built_by(script: str, *args: str) -> Path:
    """The cache directory that a build script of scripts/ prints (it builds only once)."""
    result = subprocess.run([str(REPO / "scripts" / script), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildFailed(f"scripts/{' '.join([script, *args])} failed:\n{result.stderr}")
    return Path(result.stdout.strip())


def tailnet_bin_dir() -> Path:
    """headscale and the stock tailscaled/tailscale."""
    return built_by("tailnet-binaries")


def tailscale_bin_dir(build: str) -> Path:
    """The directory holding `tailscaled` and `tailscale` of `build` (one of BUILDS)."""
    if build not in BUILDS:
        raise ValueError(f"unknown tailscale build {build!r}: one of {', '.join(BUILDS)}")
    return built_by("tailnet-binaries", *BUILD_ARGS[build])


def omit_tags(build: str) -> set[str]:
    """The `ts_omit_` build tags `build` is built with, as scripts/tailnet-binaries builds it."""
    if build == "stock":
        script = (REPO / "scripts" / "tailnet-binaries").read_text()
        return set(re.search(r"^TAILSCALE_TAGS=(\S+)", script, re.M).group(1).split(","))  # type: ignore[union-attr]
    return {f"ts_omit_{fields[1]}" for fields in map(str.split, FEATURES.read_text().splitlines())
            if fields and fields[0] == "omit"}


def build_tags(binary: Path) -> set[str]:
    """The build tags a Go binary was built with, from its embedded build information."""
    info = subprocess.run(["go", "version", "-m", str(binary)], capture_output=True, text=True, check=True).stdout
    for line in info.splitlines():
        key, _, value = line.strip().partition("\t")
        if key == "build" and value.startswith("-tags="):
            return set(value.removeprefix("-tags=").split(","))
    return set()
