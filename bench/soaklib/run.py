"""bench/soak: mixed traffic through one service over the local tailnet while its parts
are killed, restarted, reset and slowed on a seeded schedule; the invariants checked
throughout, ours and the Go tsnsrv side by side. See bench/README.md ("Soak under faults").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
sys.path[:0] = [str(REPO / "tests"), str(BENCH)]

from bench import GO_TSNSRV_CACHED  # noqa: E402
from harness import janitor  # noqa: E402
from harness.headscale import ALLOW_ALL_POLICY, Headscale  # noqa: E402
from harness.processes import free_port  # noqa: E402
from harness.tailnet import ClientDevice, NetworkNamespace, TailscaleNode  # noqa: E402
from harness.tsnsrv import ensure_tailscaled_test_user  # noqa: E402

from soaklib import analysis, report  # noqa: E402
from soaklib.faults import PROFILES, PlannedFault, Profile, Stage, as_record, inject, plan  # noqa: E402
from soaklib.rig import Certificates, ClientsProcess, SoakUpstream  # noqa: E402
from soaklib.targets import Candidate, Go, Ours, Sampler, fd_kinds, settle, wait_ready_by_probe  # noqa: E402

HOST = "soak.tailnet.test"  # the name on the certificates; clients send it as SNI
CANDIDATES = ("tsnsrv", "go-tsnsrv")
# Ours gets short upstream timeouts, so that the slow upstream goes past them.
OURS_TIMEOUTS = {"--upstream-response-header-timeout": 3.0, "--upstream-idle-timeout": 6.0}
SLOW_BEYOND = 2.0  # the slow upstream's delay and stall exceed those timeouts by this much


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Tailnet:
    """headscale and the client device, shared by the candidates' runs."""

    def __init__(self, bin_dir: Path, work: Path):
        self.bin_dir = bin_dir
        self.work = work
        pid = os.getpid()
        block = pid % 250 + 1
        # 198.19.B.4/30: apart from bench/run's 198.19.B.0/30 and the tests' 198.18.0.0/16.
        self.netns = NetworkNamespace(f"tss{pid}", f"198.19.{block}.5", f"198.19.{block}.6")
        self.headscale: Headscale | None = None
        self.laptop: TailscaleNode | None = None

    def start(self) -> None:
        say(f"network namespace {self.netns.name}, headscale, the client device")
        self.netns.create()
        self.headscale = Headscale(self.bin_dir / "headscale", self.work / "headscale", self.netns.host_ip,
                                   free_port(self.netns.host_ip), free_port(self.netns.host_ip, socket.SOCK_DGRAM))
        self.headscale.write_config(ALLOW_ALL_POLICY)
        self.headscale.start()
        self.headscale.relay_into(self.netns)
        self.laptop = TailscaleNode("laptop", self.bin_dir, self.work / "laptop", self.netns).start()
        self.laptop.up(self.headscale.url, self.headscale.auth_key("alice"))
        self.client = ClientDevice(self.laptop)

    def udp_drops(self) -> dict[str, int]:
        """UDP datagrams the kernel dropped for want of receive buffer (WireGuard's packets are
        UDP: a tailscaled too starved to read loses them), here and on the client device."""
        def parse(snmp: str) -> int:
            head, values = [line.split() for line in snmp.splitlines() if line.startswith("Udp:")][:2]
            return int(values[head.index("RcvbufErrors")])
        return {"host": parse(Path("/proc/net/snmp").read_text()),
                "client": parse(self.client.run(["cat", "/proc/net/snmp"]).stdout.decode())}

    def stop(self) -> None:
        for part in (self.laptop, self.headscale):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close() if isinstance(part, Headscale) else part.stop()
        self.netns.destroy()


class CandidateRun:
    """One candidate through the whole schedule."""

    def __init__(self, args: argparse.Namespace, tailnet: Tailnet, label: str, profile: Profile,
                 schedule: list[PlannedFault]):
        self.args = args
        self.tailnet = tailnet
        self.label = label
        self.profile = profile
        self.schedule = schedule
        self.work = args.work / label
        self.work.mkdir(parents=True)
        self.work.chmod(0o711)  # the spawned tailscaled runs as another user
        self.faults: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []

    def candidate(self, upstream: SoakUpstream, certificates: Certificates) -> Candidate:
        headscale = self.tailnet.headscale
        assert headscale is not None
        key = headscale.auth_key("alice")
        if self.label == "tsnsrv":
            return Ours(self.work / "tsnsrv", self.args.tailscale_bin_dir, headscale, key, upstream.url,
                        certificates.cert_file, certificates.key_file, self.args.ours_flags, self.args.restart_sec)
        return Go(self.args.go_tsnsrv, self.work / "go-tsnsrv", headscale, key, upstream.url,
                  certificates.cert_file, certificates.key_file, self.args.restart_sec)

    def run(self) -> dict[str, Any]:
        tailnet, profile = self.tailnet, self.profile
        assert tailnet.laptop is not None and tailnet.headscale is not None
        certificates = Certificates(self.work, HOST)
        upstream = SoakUpstream(self.work / "upstream")
        upstream.start()
        candidate = self.candidate(upstream, certificates)
        say(f"{self.label}: starting")
        candidate.start(tailnet.laptop)
        wait_ready_by_probe(candidate, tailnet.client, HOST, certificates.ca_file, 120)
        say(f"{self.label}: serving at {candidate.ip}")
        sampler = Sampler(candidate)
        clients = ClientsProcess(tailnet.client, self.work, [
            "--ip", candidate.ip, "--port", "443", "--host", HOST, "--ca", str(certificates.ca_file),
            "--seed", str(self.args.seed), "--max-transfer", str(profile.max_transfer),
            "--max-events", str(profile.max_events), "--max-messages", str(profile.max_messages)])
        stage = Stage(candidate, upstream, tailnet.headscale, tailnet.laptop, certificates,
                      slow_head=OURS_TIMEOUTS["--upstream-response-header-timeout"] + SLOW_BEYOND,
                      slow_stall=OURS_TIMEOUTS["--upstream-idle-timeout"] + SLOW_BEYOND)
        t0 = time.monotonic()
        sampler.start()
        clients.start()
        try:
            time.sleep(profile.warmup)
            self.checkpoint(candidate, clients, upstream, "warm-up")
            for fault in self.schedule:
                if not self.cycle(stage, clients, fault):
                    break
        finally:
            end = time.monotonic()
            clients.stop()
            sampler.stop()
            candidate.stop()
            upstream.stop()
        return {"label": self.label, "t0": t0, "end": end, "faults": self.faults, "checkpoints": self.checkpoints,
                "samples": sampler.samples, "restarts": candidate.restart_log,
                "client_events": clients.events, "upstream_events": upstream.events,
                "no_equivalent": candidate.faults_without_equivalent, "counts_tasks": candidate.counts_tasks,
                "rss_is_the_proxy": candidate.rss_is_the_proxy}

    def cycle(self, stage: Stage, clients: ClientsProcess, fault: PlannedFault) -> bool:
        """Traffic, the fault, recovery, a checkpoint; False when the service did not recover."""
        record: dict[str, Any] = as_record(fault)
        self.faults.append(record)
        if fault.kind in stage.candidate.faults_without_equivalent:
            record["skipped"] = stage.candidate.faults_without_equivalent[fault.kind]
            return True
        time.sleep(fault.gap)
        record["t_inject"] = time.monotonic()
        say(f"{self.label}: fault {fault.index + 1}/{len(self.schedule)}: {fault.kind}")
        try:
            record.update(inject(stage, fault))
        except Exception as exc:  # noqa: BLE001 - a fault that could not be done is reported, not fatal
            record.update(restored=time.monotonic(), error=f"{type(exc).__name__}: {exc}")
            say(f"{self.label}:   could not inject: {record['error']}")
        record["recovered"] = wait_for_probe(clients, record["restored"], self.args.recovery_timeout)
        if record["recovered"] is None:
            say(f"{self.label}:   NOT recovered within {self.args.recovery_timeout:g} s")
            return False
        say(f"{self.label}:   first success {record['recovered'] - record['restored']:.1f} s after it was back "
            f"({record['recovered'] - record['t_inject']:.1f} s after the fault)")
        time.sleep(self.profile.settle)
        self.checkpoint(stage.candidate, clients, stage.upstream, fault.kind)
        return True

    def checkpoint(self, candidate: Candidate, clients: ClientsProcess, upstream: SoakUpstream, after: str) -> None:
        """Pause the clients (every connection closed), let the upstream drop its idle
        keep-alive connections, wait until fds and tasks stop moving, and measure."""
        paused = clients.pause(timeout=self.args.recovery_timeout + 60)
        with contextlib.suppress(Exception):
            upstream.control("drop-idle")
        sample = settle(candidate)
        sample["fd_kinds"] = fd_kinds(sample["pid"]) if sample["pid"] else {}
        metrics = candidate.counts(self.tailnet.client)
        clients.resume()
        self.checkpoints.append({**sample, "after": after, "epoch": paused["paused"], "client": paused["counts"],
                                 "metrics": metrics, "udp_drops": self.tailnet.udp_drops()})
        say(f"{self.label}:   checkpoint: RSS {(sample['rss_kib'] or 0) / 1024:.1f} MiB, fds {sample['fds']}, "
            f"tasks {sample['tasks']}; {sum(paused['counts'].get(k, 0) for k in ('ok', 'failed'))} exchanges, "
            f"{paused['counts'].get('failed', 0)} failed, {paused['counts'].get('violation', 0)} violations")


def wait_for_probe(clients: ClientsProcess, since: float, timeout: float) -> float | None:
    """When the first probe that started at or after `since` succeeded (None: none did in time)."""
    deadline = time.monotonic() + timeout
    offset = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with open(clients.events) as events:
                events.seek(offset)
                for line in events:
                    if not line.endswith("\n"):
                        break
                    offset += len(line.encode())
                    if '"probe"' in line:
                        event = json.loads(line)
                        if event.get("kind") == "probe" and event["result"] == "ok" and event["start"] >= since:
                            return event["end"]
        time.sleep(0.1)
    return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", type=Path, required=True, help="directory with tailscaled, tailscale, headscale")
    parser.add_argument("--tailscale-bin-dir", type=Path, default=None,
                        help="the tailscaled our service spawns, e.g. the trimmed one (`scripts/tailnet-binaries "
                             "trimmed`; docs/trimmed-tailscaled.md); default: --bin-dir's")
    parser.add_argument("--short", action="store_true",
                        help="every fault kind once, small transfers (a few minutes per candidate)")
    parser.add_argument("--duration", type=float, default=3600,
                        help="seconds of faults to plan per candidate, long mode (default 3600)")
    parser.add_argument("--seed", type=int, default=1, help="the schedule's and the clients' seed")
    parser.add_argument("--candidates", default=None,
                        help="comma-separated: tsnsrv,go-tsnsrv (default both; --short: tsnsrv)")
    parser.add_argument("--go-tsnsrv", type=Path, default=GO_TSNSRV_CACHED,
                        help="the Go tsnsrv binary (bench/build-go-tsnsrv builds it)")
    parser.add_argument("--tsnsrv-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for our tsnsrv, repeatable (e.g. --tsnsrv-arg=--upstream-retry-window "
                             "--tsnsrv-arg=10)")
    parser.add_argument("--restart-sec", type=float, default=0.1,
                        help="the supervisor's RestartSec after the proxy exits (default systemd's 0.1)")
    parser.add_argument("--recovery-timeout", type=float, default=120,
                        help="seconds a fault may take to recover before the run stops (default 120)")
    parser.add_argument("--rss-step-limit-mib", type=float, default=0.5,
                        help="largest median RSS growth of the proxy from one checkpoint to the next, in the "
                             "second half of each process life, that is no leak (default 0.5)")
    parser.add_argument("--max-transfer", type=int, help="largest upload/download in bytes (overrides the mode's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results/soak, or bench/results/soak/short)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory (logs, events)")
    parser.add_argument("--combine", action="append", type=Path, metavar="FOLDER",
                        help="run nothing: write one side-by-side report to --out from the results of runs made "
                             "apart (their results.json and plots), on the same seed and duration; repeatable")
    args = parser.parse_args()
    names = (args.candidates or ("tsnsrv" if args.short else ",".join(CANDIDATES))).split(",")
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown:
        parser.error(f"--candidates: {', '.join(unknown)} unknown; use tsnsrv and/or go-tsnsrv")
    args.candidates = names
    if args.duration <= 0:
        parser.error(f"--duration: {args.duration:g} is not a positive number of seconds")
    if "go-tsnsrv" in names and not args.go_tsnsrv.exists():
        parser.error(f"--go-tsnsrv: no Go tsnsrv at {args.go_tsnsrv}; build it with bench/build-go-tsnsrv")
    if args.out is None:
        args.out = BENCH / "results" / "soak" / ("short" if args.short else "")
    args.tailscale_bin_dir = args.tailscale_bin_dir or args.bin_dir
    return args


def main() -> int:
    args = parse_args()
    if args.combine:
        report.combine(args.combine, args.out)
        print((args.out / "results.md").read_text())
        return 0
    if os.geteuid() != 0:
        print("soak: needs root (a network namespace and a kernel-TUN client device)", file=sys.stderr)
        return 1
    janitor.start()  # every process and namespace is gone when the run ends, however it ends
    ensure_tailscaled_test_user()

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    args.ours_flags = [str(x) for pair in OURS_TIMEOUTS.items() for x in pair] + list(args.tsnsrv_arg)
    profile = PROFILES["short" if args.short else "long"]
    if args.max_transfer:
        profile = Profile(**{**profile.__dict__, "max_transfer": args.max_transfer})
    schedule = plan(args.seed, profile, None if args.short else args.duration)
    args.work = Path(tempfile.mkdtemp(prefix="tsnsrv-soak-", dir="/var/tmp"))
    args.work.chmod(0o711)
    say(f"soak: work directory {args.work}; {len(schedule)} faults, seed {args.seed}: "
        + ", ".join(f.kind for f in schedule))
    tailnet = Tailnet(args.bin_dir, args.work)
    runs = []
    failed = False  # a crash, or an invariant that did not hold: then the logs stay
    started = time.time()
    try:
        tailnet.start()
        for label in args.candidates:
            runs.append(CandidateRun(args, tailnet, label, profile, schedule).run())
        results = [analysis.analyse(run, args.recovery_timeout, args.rss_step_limit_mib) for run in runs]
        report.write(args, profile, schedule, runs, results, started)
        failed = not all(held for result in results for _name, held, _numbers in analysis.verdicts(result))
    except KeyboardInterrupt:
        print("soak: interrupted; cleaning up", file=sys.stderr)
        return 130
    except Exception:
        failed = True
        print(f"soak: failed; logs kept in {args.work}", file=sys.stderr)
        raise
    finally:
        tailnet.stop()
        if not (args.keep_work or failed):
            shutil.rmtree(args.work, ignore_errors=True)
    print((args.out / "results.md").read_text())
    print(f"soak: results in {args.out}" + (f"; an invariant did not hold: logs kept in {args.work}" if failed else ""))
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
