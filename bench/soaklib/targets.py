"""The candidates under soak, each run as its systemd unit would run it, and watched from
outside: only the command, its /health and /metrics, and /proc.

  tsnsrv     ours, over TLS with certificate files (--cert-file/--key-file), spawning its
             own tailscaled; its /health and /metrics on the control socket
  go-tsnsrv  the Go tsnsrv over TLS with the same files (-certificateFile/-keyFile); its
             metrics on its tailnet port 9099, read from the client device

Each is its own machine on the tailnet (soak-ours, soak-go), so that a client never finds
the other's node under the name. A Supervisor restarts the candidate's process whenever
it exits (Restart=always): after RestartSec it notes what of the process group is still
alive (a tailscaled outliving its tsnsrv would leak without systemd), kills it as systemd
stops what remains of a unit, and starts the candidate again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import comm, process_tree, status_kib
from harness.go_tsnsrv import GoTsnsrv
from harness.headscale import Headscale
from harness.processes import ManagedProcess, wait_for
from harness.tailnet import ClientDevice, TailscaleNode
from harness.tsnsrv import Tsnsrv

GO_METRICS_PORT = 9099


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fd_kinds(pid: int) -> dict[str, int]:
    """The process's open fds by kind, sockets by what they connect ("tcp 127.0.0.2:* <- 127.0.0.1:*"
    with ports as `*` unless listening), so that one off the baseline can be told apart."""
    sockets: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                listening = state == "0A"
                sockets[inode] = f"{table} {_address(local, keep_port=listening)} -> {_address(remote, False)}" + (
                    " (listening)" if listening else "")
    kinds: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    target = sockets.get(target[8:-1], "socket (unix or other)")
                elif target.startswith(("pipe:", "anon_inode:")):
                    target = target.split("[")[0] if target.startswith("pipe:") else target
                kinds[target] = kinds.get(target, 0) + 1
    return kinds


def _address(hex_address: str, keep_port: bool) -> str:
    """An address of /proc/net/tcp (hex, little-endian words) as text."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        text = ".".join(str(b) for b in reversed(raw))
    else:
        text = ":".join(raw[i:i + 4][::-1].hex() for i in range(0, 16, 4))
    return f"{text}:{int(port, 16) if keep_port else '*'}"


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group (a zombie has ended; only its pid is left)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    members.append(int(entry))
    return members


class Supervisor:
    """Restart=always for one ManagedProcess, in a thread."""

    def __init__(self, process: ManagedProcess, restart_sec: float, log: list[dict[str, Any]]):
        self.process = process
        self.restart_sec = restart_sec
        self.log = log
        self.stopping = False
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"supervise-{process.name}")

    def start(self) -> None:
        self.process.start()
        self._thread.start()

    def _watch(self) -> None:
        while not self.stopping:
            popen = self.process.process
            assert popen is not None
            status = popen.wait()
            if self.stopping:
                return
            exited = time.monotonic()
            # What is left of the process group after RestartSec would outlive the proxy
            # without systemd; with it, the rest of the unit is stopped, as here.
            deadline = exited + self.restart_sec
            while group_members(popen.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(max(0.0, deadline - time.monotonic()))
            remnants = [f"{pid} {comm(pid)}" for pid in group_members(popen.pid)]
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
            if self.stopping:
                return
            self.process.start()
            self.log.append({"t": exited, "event": "restart", "status": status, "remnants": remnants,
                             "restarted": time.monotonic()})

    def restart(self) -> None:
        """`systemctl restart`: stop (SIGTERM), then start at once."""
        self.stopping = True
        self.process.stop()
        self._thread.join(30)
        self.stopping = False
        self._thread = threading.Thread(target=self._watch, daemon=True, name=f"supervise-{self.process.name}")
        self.start()

    def stop(self) -> None:
        self.stopping = True
        self.process.stop()
        self._thread.join(30)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process.running else None


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples]


class Candidate:
    """What the soak needs of a candidate; subclasses say how."""

    label = ""
    faults_without_equivalent: dict[str, str] = {}
    counts_tasks = False  # whether /health says how many asyncio tasks run
    # Whether its RSS is the proxy's alone, to be judged for leaks. The Go tsnsrv's is its
    # netstack's and garbage-collected heap's too, which swing by hundreds of MiB with load.
    rss_is_the_proxy = False

    def __init__(self, restart_sec: float):
        self.restart_log: list[dict[str, Any]] = []
        self.restart_sec = restart_sec
        self.ip = ""
        self.supervisor: Supervisor

    def start(self, laptop: TailscaleNode) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.supervisor.pid

    def kill_proxy(self) -> int:
        pid = self.pid
        assert pid is not None, "the proxy is not running"
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_tailscaled(self) -> int:
        raise NotImplementedError

    def reload(self) -> str:
        """Make the candidate serve the certificate files' new contents; says how."""
        raise NotImplementedError

    def tasks(self) -> int | None:
        return None

    def tailscaled_rss_kib(self) -> int:
        return 0

    def counts(self, client: ClientDevice) -> dict[str, float] | None:
        """The metrics as {total, 2xx, 5xx, websockets} (None when they cannot be read)."""
        raise NotImplementedError

    def stop(self) -> None:
        self.supervisor.stop()

    def log_tail(self) -> str:
        return self.supervisor.process.log_tail()


class Ours(Candidate):
    label = "tsnsrv"
    counts_tasks = True
    rss_is_the_proxy = True

    def __init__(self, workdir: Path, bin_dir: Path, headscale: Headscale, auth_key: str, upstream_url: str,
                 cert: Path, key: Path, extra_args: list[str], restart_sec: float):
        super().__init__(restart_sec)
        args = ["--cert-file", str(cert), "--key-file", str(key), *extra_args]
        self.service = Tsnsrv("soak-ours", upstream_url, workdir, bin_dir, headscale, auth_key, args, plaintext=False)
        self.supervisor = Supervisor(self.service.process, restart_sec, self.restart_log)

    def start(self, laptop: TailscaleNode) -> None:
        self.supervisor.start()
        self.service.wait_ready(120)
        self.ip = self.service.ip
        laptop.wait_for_peer(self.ip, timeout=60)

    def health(self) -> dict[str, Any]:
        return self.service.health()

    def kill_tailscaled(self) -> int:
        pid = self.health()["tailscaled"]["pid"]
        os.kill(pid, signal.SIGKILL)
        return pid

    def reload(self) -> str:
        pid = self.pid
        assert pid is not None
        os.kill(pid, signal.SIGHUP)
        return "SIGHUP"

    def tasks(self) -> int | None:
        with contextlib.suppress(Exception):
            return self.health().get("tasks")
        return None

    def tailscaled_rss_kib(self) -> int:
        pid = self.pid
        if pid is None:
            return 0
        return sum(status_kib(p, "VmRSS") for p in process_tree(pid) if comm(p) == "tailscaled")

    def counts(self, client: ClientDevice) -> dict[str, float] | None:
        try:
            samples = metric_samples(self.service.metrics())
        except Exception:  # noqa: BLE001 - a restarting proxy has no control socket for a moment
            return None
        counts = {"total": 0.0, "2xx": 0.0, "5xx": 0.0, "websockets": 0.0}
        for name, labels, value in samples:
            if name == "tsnsrv_responses_total":
                counts["total"] += value
                if labels.get("status_class") in ("2xx", "5xx"):
                    counts[labels["status_class"]] += value
            elif name == "tsnsrv_websocket_sessions_total":
                counts["websockets"] += value
            elif name == "tsnsrv_refused_front_connections_total":  # not compared; says why connects failed
                counts[f"refused {labels.get('reason')}"] = value
        return counts


class Go(Candidate):
    label = "go-tsnsrv"
    faults_without_equivalent = {
        "tailscaled-kill": "no tailscaled of its own: tsnet runs inside its one process (see proxy-kill)",
    }

    def __init__(self, binary: Path, workdir: Path, headscale: Headscale, auth_key: str, upstream_url: str,
                 cert: Path, key: Path, restart_sec: float):
        super().__init__(restart_sec)
        self.service = GoTsnsrv(binary, "soak-go", upstream_url, workdir, headscale, auth_key,
                                f"-prometheusAddr=:{GO_METRICS_PORT}", tls_files=(cert, key))
        self.supervisor = Supervisor(self.service.process, restart_sec, self.restart_log)

    def start(self, laptop: TailscaleNode) -> None:
        self.supervisor.start()
        self.service.wait_on_tailnet([laptop])
        self.ip = self.service.ip

    def reload(self) -> str:
        # The Go tsnsrv reads its certificate files once, and SIGHUP would end it: its users
        # restart it (systemctl restart), which is what happens here.
        self.supervisor.restart()
        return "restart (no reload in the Go tsnsrv)"

    def counts(self, client: ClientDevice) -> dict[str, float] | None:
        result = client.curl("-f", f"http://{self.ip}:{GO_METRICS_PORT}/metrics", timeout=10)
        if result.returncode != 0:
            return None
        counts = {"total": 0.0, "2xx": 0.0, "5xx": 0.0, "websockets": 0.0}
        for name, labels, value in metric_samples(result.stdout.decode()):
            # Counted when the upstream's answer arrives; a failed exchange is a proxy error
            # answered with 502 and not counted by class.
            if name.startswith("tsnsrv_response_status_classes"):
                status_class = labels.get("status_code_class", "")
                counts["total"] += value
                if status_class in ("2xx", "5xx"):
                    counts[status_class] += value
                if status_class == "1xx":
                    counts["websockets"] += value
            elif name.startswith("tsnsrv_proxy_errors"):
                counts["total"] += value
                counts["5xx"] += value
        return counts


class Sampler:
    """Every second: the proxy's RSS, open fds and (ours) asyncio tasks, from /proc and /health."""

    def __init__(self, candidate: Candidate, interval: float = 1.0):
        self.candidate = candidate
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sampler")

    def sample(self) -> dict[str, Any]:
        pid = self.candidate.pid
        rss = status_kib(pid, "VmRSS") if pid else 0
        return {"t": time.monotonic(), "pid": pid, "rss_kib": rss or None, "fds": open_fds(pid) if pid else None,
                "tasks": self.candidate.tasks(), "tailscaled_rss_kib": self.candidate.tailscaled_rss_kib() or None,
                "load1": os.getloadavg()[0]}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def settle(candidate: Candidate, seconds: float = 2.0, timeout: float = 20.0) -> dict[str, Any]:
    """Once nothing moves: RSS, fds and tasks after the same fds and tasks for `seconds`."""
    sampler = Sampler(candidate)
    last: tuple[Any, Any] | None = None
    since = time.monotonic()
    deadline = since + timeout
    while True:
        sample = sampler.sample()
        key = (sample["fds"], sample["tasks"])
        if key != last:
            last, since = key, time.monotonic()
        elif time.monotonic() - since >= seconds or time.monotonic() > deadline:
            sample["settled"] = time.monotonic() - since >= seconds
            return sample
        time.sleep(0.25)


def wait_ready_by_probe(candidate: Candidate, client: ClientDevice, host: str, ca: Path, timeout: float) -> None:
    """Until the client device gets an answer through the candidate (curl, against the test CA)."""
    def answers() -> bool:
        result = client.curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(ca), "--resolve",
                             f"{host}:443:{candidate.ip}", f"https://{host}/body?id=ready&size=1", timeout=5)
        return result.stdout == b"200"
    wait_for(answers, timeout, f"{candidate.label} to answer the client", interval=0.5)
