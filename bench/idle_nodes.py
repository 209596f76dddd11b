"""Idle memory of tailscaled builds: N logged-in, idle userspace nodes per candidate.

A cheap, load-independent measurement of what a service's tailscaled weighs at rest:
one local headscale, and for each candidate N userspace tailscaleds started with the
flags tsnsrv gives its own (`--tun=userspace-networking --port=0 --no-logs-no-support`,
the offline environment of the tests), logged in, and left alone. After they settle,
the summed PSS of each candidate's N processes is sampled a few times (median). All
candidates run at the same time, in one tailnet (every node has all the others as
peers), so machine noise and the control server's chatter hit them alike. Each candidate
runs a private copy of its binary: PSS splits a file's pages among all processes mapping
it, so nothing else on the machine lowers a candidate's share.

With --services each node is a whole tsnsrv service instead (tsnsrv, its loopback guard
and the tailscaled it spawns, serving a small upstream), and the tailscaleds' share of
the PSS is shown apart.

A candidate is a build (`stock` or `trimmed`, the pairs scripts/tailnet-binaries builds, or
a directory holding another tailscaled), optionally with environment for its tailscaleds:
`trimmed:GOMEMLIMIT=16MiB,GOGC=50`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from bench import comm, process_tree, smaps_kib  # noqa: E402  (bench.py puts tests/ on sys.path)
from harness import janitor  # noqa: E402
from harness.binaries import BUILDS, tailnet_bin_dir, tailscale_bin_dir  # noqa: E402
from harness.headscale import Headscale, start_headscale  # noqa: E402
from harness.processes import wait_for  # noqa: E402
from harness.tailnet import NetworkNamespace, TailscaleNode  # noqa: E402
from harness.tsnsrv import Tsnsrv, ensure_tailscaled_test_user  # noqa: E402
from harness.upstream import Upstream  # noqa: E402

MIB = 1024
# smaps_rollup fields summed over a candidate's processes: Pss_File is mostly the binaries'
# code, shared by the processes of one build; Pss_Anon is each process's heap and stacks.
FIELDS = ("Pss", "Pss_Anon", "Pss_File", "Rss")


@attrs.frozen
class Candidate:
    build: str
    env: tuple[tuple[str, str], ...]  # for the tailscaleds' environment

    @property
    def label(self) -> str:
        return self.build + "".join(f" {key}={value}" for key, value in self.env)

    @property
    def bin_dir(self) -> Path:
        return tailscale_bin_dir(self.build) if self.build in BUILDS else Path(self.build)


def parse_candidate(text: str) -> Candidate:
    build, _, env_text = text.partition(":")
    if build not in BUILDS and not (Path(build) / "tailscaled").is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: the build must be one of {', '.join(BUILDS)}, "
                                         "or a directory with a tailscaled")
    env = []
    for item in filter(None, env_text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{text!r}: environment is KEY=VALUE[,KEY=VALUE...], not {item!r}")
        env.append((key, value))
    return Candidate(build, tuple(env))


def private_copy(bin_dir: Path, target: Path) -> Path:
    target.mkdir()
    target.chmod(0o755)  # a service's tailscaled runs as the test account
    for binary in ("tailscaled", "tailscale"):
        shutil.copy2(bin_dir / binary, target / binary)
    return target


class IdleNode:
    """A bare logged-in tailscaled."""

    def __init__(self, name: str, bin_dir: Path, work: Path, env: dict[str, str], headscale: Headscale, key: str):
        self.node = TailscaleNode(name, bin_dir, work / name, env=env).start().up(headscale.url, key)

    def pids(self) -> list[int]:
        return [self.node.process.pid]

    def peers(self) -> int:
        return len(self.node.status().get("Peer") or {})

    def stop(self) -> None:
        self.node.stop()


class IdleService:
    """A tsnsrv service spawning the candidate's tailscaled, ready."""

    def __init__(self, name: str, bin_dir: Path, work: Path, env: dict[str, str], headscale: Headscale, key: str,
                 upstream: str):
        workdir = work / name
        workdir.mkdir()
        workdir.chmod(0o711)
        self.bin_dir = bin_dir
        self.service = Tsnsrv(name, upstream, workdir, bin_dir, headscale, key, [], env=env).start()

    def pids(self) -> list[int]:
        return process_tree(self.service.process.pid)

    def peers(self) -> int:
        socket = self.service.health()["tailscaled"]["socket"]
        status = subprocess.run([str(self.bin_dir / "tailscale"), f"--socket={socket}", "status", "--json"],
                                capture_output=True, text=True, check=True, timeout=10).stdout
        return len(json.loads(status).get("Peer") or {})

    def stop(self) -> None:
        self.service.stop()


def sample(members: list[IdleNode] | list[IdleService]) -> dict[str, int]:
    """FIELDS summed over the members' processes, and the PSS of their tailscaleds alone."""
    pids = [pid for member in members for pid in member.pids()]
    reading = {field: sum(smaps_kib(pid, field) for pid in pids) for field in FIELDS}
    reading["Pss_tailscaled"] = sum(smaps_kib(pid, "Pss") for pid in pids if comm(pid) == "tailscaled")
    return reading


def measure(candidates: list[Candidate], count: int, settle: float, samples: int, work: Path,
            services: bool) -> list[dict]:
    block = os.getpid() % 250 + 1
    # .12/30 of 198.19.<block>.0/24: the bench takes .0/30, the systemd tier .4/30, the
    # certificate tailnet .8/30.
    netns = NetworkNamespace(f"tsi{os.getpid()}", f"198.19.{block}.13", f"198.19.{block}.14").create()
    members: dict[Candidate, list] = {candidate: [] for candidate in candidates}
    headscale = upstream = None
    try:
        headscale = start_headscale(tailnet_bin_dir(), netns.host_ip, work / "headscale")
        key = headscale.auth_key("alice")
        # Private copies: PSS splits a binary's pages among every process that maps them,
        # here or in other runs on the machine, which would flatter a widely used build.
        copies = {candidate: private_copy(candidate.bin_dir, work / f"bin{number}")
                  for number, candidate in enumerate(candidates)}
        if services:
            ensure_tailscaled_test_user()
            upstream = Upstream().start()
        for index in range(count):  # interleaved, so that no candidate gets the quieter start
            for number, candidate in enumerate(candidates):
                name, env = f"idle{number}-{index}", dict(candidate.env)
                members[candidate].append(
                    IdleService(name, copies[candidate], work, env, headscale, key, upstream.url) if upstream
                    else IdleNode(name, copies[candidate], work, env, headscale, key))
        everyone = [member for group in members.values() for member in group]
        wait_for(lambda: all(member.peers() == len(everyone) - 1 for member in everyone), 60,
                 "every node to see all the others")
        print(f"all {len(everyone)} {'services' if services else 'nodes'} up; settling {settle:g}s", flush=True)
        time.sleep(settle)  # a measurement at rest, not a readiness wait
        readings: dict[Candidate, list[dict[str, int]]] = {candidate: [] for candidate in candidates}
        for _ in range(samples):
            for candidate, group in members.items():
                readings[candidate].append(sample(group))
            time.sleep(2)
    finally:
        for group in members.values():
            for member in group:
                with contextlib.suppress(Exception):
                    member.stop()
        if upstream is not None:
            upstream.stop()
        if headscale is not None:
            headscale.close()
        netns.destroy()
    return [{"candidate": candidate.label, "binary_bytes": (candidate.bin_dir / "tailscaled").stat().st_size,
             **{field: statistics.median(reading[field] for reading in readings[candidate])
                for field in readings[candidate][0]}}
            for candidate in candidates]


def table(rows: list[dict], count: int, services: bool) -> str:
    what = "service" if services else "node"
    base = rows[0]["Pss"]
    lines = [f"| candidate | tailscaled binary (MB) | PSS of {count} {what}s (MiB) | of which anon / file (MiB) | "
             f"of which tailscaled (MiB) | PSS per {what} (MiB) | RSS per {what} (MiB) | "
             f"PSS vs {rows[0]['candidate']} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['candidate']} | {row['binary_bytes'] / 1e6:.1f} | {row['Pss'] / MIB:.1f} | "
                     f"{row['Pss_Anon'] / MIB:.1f} / {row['Pss_File'] / MIB:.1f} | {row['Pss_tailscaled'] / MIB:.1f} | "
                     f"{row['Pss'] / MIB / count:.1f} | {row['Rss'] / MIB / count:.1f} | {row['Pss'] / base:.2f} |")
    return "\n".join(lines)


def main() -> int:
    janitor.start()  # every process and the namespace are gone when this ends, however it ends
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5, help="idle nodes (or services) per candidate (default 5)")
    parser.add_argument("--services", action="store_true",
                        help="whole tsnsrv services (tsnsrv and the tailscaled it spawns) instead of bare tailscaleds")
    parser.add_argument("--settle", type=float, default=20, help="seconds at rest before sampling (default 20)")
    parser.add_argument("--samples", type=int, default=5, help="PSS samples, 2 s apart; the median counts")
    parser.add_argument("--candidate", type=parse_candidate, action="append", metavar="BUILD[:KEY=VALUE,...]",
                        help="a build and optional environment for its tailscaleds, repeatable "
                             "(default: stock and trimmed)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("idle-nodes: needs root (a network namespace for headscale's address)", file=sys.stderr)
        return 1
    candidates = args.candidate or [parse_candidate("stock"), parse_candidate("trimmed")]
    if len(set(candidates)) != len(candidates):
        print("idle-nodes: each --candidate only once", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="tsnsrv-idle-", dir="/var/tmp"))
    work.chmod(0o711)  # the services' tailscaleds run as the test account
    try:
        rows = measure(candidates, args.nodes, args.settle, args.samples, work, args.services)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows, args.nodes, args.services))
    return 0


if __name__ == "__main__":
    sys.exit(main())
