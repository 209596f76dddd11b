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

A candidate is a build (`stock` or `trimmed`, the pairs scripts/tailnet-binaries builds, or
a directory holding another tailscaled), optionally with environment for its tailscaleds:
`trimmed:GOMEMLIMIT=16MiB,GOGC=50`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import attrs

from bench import smaps_kib  # noqa: E402  (bench.py puts tests/ on sys.path)
from harness import janitor  # noqa: E402
from harness.binaries import BUILDS, tailscale_bin_dir, tailnet_bin_dir  # noqa: E402
from harness.headscale import start_headscale  # noqa: E402
from harness.processes import wait_for  # noqa: E402
from harness.tailnet import NetworkNamespace, TailscaleNode  # noqa: E402

MIB = 1024
# smaps_rollup fields summed over a candidate's nodes: Pss_File is mostly the binary's code,
# shared by the nodes of one build; Pss_Anon is each node's own heap and stacks.
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
    for binary in ("tailscaled", "tailscale"):
        shutil.copy2(bin_dir / binary, target / binary)
    return target


def measure(candidates: list[Candidate], count: int, settle: float, samples: int, work: Path) -> list[dict]:
    block = os.getpid() % 250 + 1
    # .8/30 of 198.19.<block>.0/24: the bench takes .0/30, the systemd tier .4/30.
    netns = NetworkNamespace(f"tsi{os.getpid()}", f"198.19.{block}.9", f"198.19.{block}.10").create()
    nodes: dict[Candidate, list[TailscaleNode]] = {candidate: [] for candidate in candidates}
    headscale = None
    try:
        headscale = start_headscale(tailnet_bin_dir(), netns.host_ip, work / "headscale")
        key = headscale.auth_key("alice")
        # Private copies: PSS splits a binary's pages among every process that maps them,
        # here or in other runs on the machine, which would flatter a widely used build.
        copies = {candidate: private_copy(candidate.bin_dir, work / f"bin{number}")
                  for number, candidate in enumerate(candidates)}
        for index in range(count):  # interleaved, so that no candidate gets the quieter start
            for number, candidate in enumerate(candidates):
                name = f"idle{number}-{index}"
                node = TailscaleNode(name, copies[candidate], work / name, env=dict(candidate.env))
                nodes[candidate].append(node)
                node.start().up(headscale.url, key)
        everyone = [node for group in nodes.values() for node in group]
        wait_for(lambda: all(len(node.status().get("Peer") or {}) == len(everyone) - 1 for node in everyone),
                 60, "every node to see all the others")
        print(f"all {len(everyone)} nodes logged in; settling {settle:g}s", flush=True)
        time.sleep(settle)  # a measurement at rest, not a readiness wait
        readings: dict[Candidate, list[dict[str, int]]] = {candidate: [] for candidate in candidates}
        for _ in range(samples):
            for candidate, group in nodes.items():
                pids = [node.process.pid for node in group]
                readings[candidate].append({field: sum(smaps_kib(pid, field) for pid in pids) for field in FIELDS})
            time.sleep(2)
    finally:
        for group in nodes.values():
            for node in group:
                with contextlib.suppress(Exception):
                    node.stop()
        if headscale is not None:
            headscale.close()
        netns.destroy()
    return [{"candidate": candidate.label, "binary_bytes": (candidate.bin_dir / "tailscaled").stat().st_size,
             **{field: statistics.median(reading[field] for reading in readings[candidate]) for field in FIELDS}}
            for candidate in candidates]


def table(rows: list[dict], count: int) -> str:
    base = rows[0]["Pss"]
    lines = [f"| candidate | tailscaled binary (MB) | PSS of {count} nodes (MiB) | of which anon / file (MiB) | "
             f"PSS per node (MiB) | RSS per node (MiB) | PSS vs {rows[0]['candidate']} |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['candidate']} | {row['binary_bytes'] / 1e6:.1f} | {row['Pss'] / MIB:.1f} | "
                     f"{row['Pss_Anon'] / MIB:.1f} / {row['Pss_File'] / MIB:.1f} | {row['Pss'] / MIB / count:.1f} | "
                     f"{row['Rss'] / MIB / count:.1f} | {row['Pss'] / base:.2f} |")
    return "\n".join(lines)


def main() -> int:
    janitor.start()  # every node and the namespace are gone when this ends, however it ends
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5, help="idle nodes per candidate (default 5)")
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
    try:
        rows = measure(candidates, args.nodes, args.settle, args.samples, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows, args.nodes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
