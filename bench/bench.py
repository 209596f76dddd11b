"""tsnsrv benchmarks: ours against a bare tailscaled Serve forward and the Go tsnsrv.

One local tailnet (headscale), one client device (alice's laptop: a kernel-TUN tailscaled
in network namespace tsb<pid>), one upstream (Debian's nginx-light on 127.0.0.1), and
four candidates that each expose that upstream as their own tailnet machine on port 80:

  limit           a userspace tailscaled whose Serve config TCP-forwards port 80 straight to
                  nginx: no proxy at all, the ceiling for anything built on tailscaled;
  go-tsnsrv       the Go tsnsrv (tsnet) in --plaintext mode;
  tsnsrv          ours, --plaintext, default settings;
  tsnsrv-trimmed  the same with the trimmed tailscaled (docs/trimmed-tailscaled.md).

Every measurement runs against the candidates in turn (round-robin, the order rotated each
round) so that machine noise hits all alike. Load comes from wrk (and curl for the big
transfers) run inside the client's network namespace. Writes results.md, results.json,
plot.png and machine.md to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.headscale import ALLOW_ALL_POLICY, Headscale  # noqa: E402
from harness import janitor  # noqa: E402
from harness.processes import STARTED, ManagedProcess, free_port, wait_for  # noqa: E402
from harness.tailnet import ClientDevice, NetworkNamespace, TailscaleNode, offline_env  # noqa: E402
from harness.tsnsrv import Tsnsrv, ensure_tailscaled_test_user, tsnsrv_command  # noqa: E402

CANDIDATES = ("limit", "go-tsnsrv", "tsnsrv", "tsnsrv-trimmed")
# With --assertions: ours signing identity assertions, unbound and bound; measured with the
# small GETs only, against ours with them off.
ASSERTION_KINDS = ("assertions", "assertions-bound")
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
CACHE = Path("/var/cache/tsnsrv-dev") if os.geteuid() == 0 else \
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tsnsrv-dev"
CACHE = Path(os.environ.get("TSNSRV_DEV_CACHE", CACHE))
GO_TSNSRV_CACHED = CACHE / "go-tsnsrv-bin" / "tsnsrv"
SMALL_SIZE = 1024


@contextlib.contextmanager
def step(text: str) -> Iterator[None]:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)
    yield


# --- /proc sampling ----------------------------------------------------------------------

def process_tree(root: int) -> list[int]:
    """`root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def smaps_kib(pid: int, field: str) -> int:
    """A field of smaps_rollup (Pss, Pss_Anon, Rss...), 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages count once across the processes sharing them."""
    return smaps_kib(pid, "Pss")


# The design card's floor for one service's Python process: the interpreter with the
# card's libraries imported and nothing else (issue 16's idle memory target).
BARE_IMPORT = "import aiohttp.web, attrs, cattrs, sys; print('ready', flush=True); sys.stdin.read()"


def bare_import_pss_mib(count: int) -> float:
    """Mean PSS of `count` idle Python processes that only import aiohttp.web, attrs and
    cattrs: as many as the ten-services group has proxies, so shared pages split alike."""
    processes = [subprocess.Popen([sys.executable, "-c", BARE_IMPORT], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, start_new_session=True) for _ in range(count)]
    try:
        for process in processes:
            janitor.process_group(process.pid)
            if process.stdout is None or process.stdout.readline().strip() != "ready":
                raise RuntimeError("a bare import process did not start")
        return sum(pss_kib(process.pid) for process in processes) / 1024 / count
    finally:
        for process in processes:
            process.kill()
            process.wait()


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


class RssSampler:
    """Samples the summed VmRSS of a process tree every `interval` seconds in a thread."""

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.1):
        self.roots = roots
        self.interval = interval
        self.peak_kib = 0
        self.proxy_peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = [pid for root in self.roots() for pid in process_tree(root)]
        rss = {pid: status_kib(pid, "VmRSS") for pid in pids}
        self.peak_kib = max(self.peak_kib, sum(rss.values()))
        self.proxy_peak_kib = max(self.proxy_peak_kib, sum(v for pid, v in rss.items() if comm(pid) != "tailscaled"))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# --- the upstream ------------------------------------------------------------------------

class Nginx:
    """Debian's nginx-light on 127.0.0.1 with its own configuration in `workdir`.

    /small.bin (1 KiB), /big.bin (sparse, `big_size` bytes; sendfile serves it from the
    page cache), POST /upload, which reads the whole body (echo module, from Debian's
    libnginx-mod-http-echo that nginx-light depends on), then answers 200, and /ws, passed
    to the websocket echo server (bench/wsecho.py) for every candidate alike. Bodies larger
    than the buffer go to a temporary file under /dev/shm (memory, deleted at once),
    so the upload measures the path, not a disk.
    """

    def __init__(self, workdir: Path, big_size: int, websocket_port: int):
        self.websocket_port = websocket_port
        self.dir = workdir
        self.www = workdir / "www"
        self.body_dir = Path(tempfile.mkdtemp(prefix="tsnsrv-bench-body-", dir="/dev/shm"))
        self.port = free_port()
        self.big_size = big_size
        self.big_file = self.www / "big.bin"
        self.process = ManagedProcess("nginx", ["nginx", "-c", str(workdir / "nginx.conf"), "-e",
                                               str(workdir / "error.log")], workdir / "nginx.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        self.www.mkdir(parents=True)
        for path in (self.dir, self.www):
            path.chmod(0o755)
        (self.www / "small.bin").write_bytes(bytes(range(256)) * (SMALL_SIZE // 256))
        with open(self.big_file, "wb") as big:
            big.truncate(self.big_size)
        for path in self.www.iterdir():
            path.chmod(0o644)
        self.body_dir.chmod(0o777)
        echo_module = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
        if not echo_module.exists():
            raise SystemExit(f"bench: {echo_module} is missing (Debian package libnginx-mod-http-echo)")
        d = self.dir
        (d / "nginx.conf").write_text(textwrap.dedent(f"""\
            load_module {echo_module};
            daemon off;
            user nobody nogroup;
            worker_processes 1;
            pid {d}/nginx.pid;
            error_log {d}/error.log warn;
            events {{ worker_connections 4096; }}
            http {{
              access_log off;
              sendfile on;
              tcp_nopush on;
              tcp_nodelay on;
              keepalive_requests 10000000;
              keepalive_timeout 300s;
              default_type application/octet-stream;
              client_body_temp_path {self.body_dir};
              proxy_temp_path {d}/proxy_temp;
              fastcgi_temp_path {d}/fastcgi_temp;
              uwsgi_temp_path {d}/uwsgi_temp;
              scgi_temp_path {d}/scgi_temp;
              server {{
                listen 127.0.0.1:{self.port} default_server;
                root {self.www};
                location = /upload {{
                  client_max_body_size 0;
                  client_body_buffer_size 1m;
                  echo_read_request_body;
                  echo "received";
                }}
                location = /ws {{
                  proxy_pass http://127.0.0.1:{self.websocket_port};
                  proxy_http_version 1.1;
                  proxy_set_header Upgrade $http_upgrade;
                  proxy_set_header Connection "upgrade";
                  proxy_buffering off;
                  proxy_read_timeout 300s;
                }}
              }}
            }}
            """))
        self.process.start()
        wait_for(self._serves, 20, "nginx")
        return self

    def _serves(self) -> bool:
        if not self.process.running:
            raise AssertionError(f"nginx exited:\n{self.process.log_tail()}\n"
                                 f"{(self.dir / 'error.log').read_text(errors='replace')}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"GET /small.bin HTTP/1.0\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.body_dir, ignore_errors=True)


# --- the candidates ------------------------------------------------------------------------

class Candidate:
    """One way of putting nginx on the tailnet as machine `name`, port 80."""

    kind = ""

    def __init__(self, bench: Bench, name: str):
        self.bench = bench
        self.name = name
        self.dir = bench.new_dir(name)
        self.ip: str | None = None

    def url(self, path: str) -> str:
        return f"http://{self.ip}{path}"

    def launch(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def roots(self) -> list[int]:
        """Processes whose tree is this candidate's footprint (RSS, CPU)."""
        raise NotImplementedError

    def tree(self) -> list[int]:
        return [pid for root in self.roots() for pid in process_tree(root)]

    def rss_kib(self) -> int:
        return sum(status_kib(pid, "VmRSS") for pid in self.tree())

    def proxy_rss_kib(self) -> int:
        """RSS without any tailscaled process (ours: the Python proxy alone; limit: 0)."""
        return sum(status_kib(pid, "VmRSS") for pid in self.tree() if comm(pid) != "tailscaled")

    def hwm_kib(self) -> int:
        return sum(status_kib(pid, "VmHWM") for pid in self.tree())

    def start_and_time(self, timeout: float = 120) -> float:
        """Start the process(es) and return the seconds until the client's first 200.

        The client polls with short curl attempts from the moment it knows the address (at
        once with existing state), as a user retrying in a browser would. Note: when the
        client's first WireGuard handshake races the node's own start (its DERP connection,
        or an old session of the previous process), wireguard-go retries only after its
        5 s REKEY_TIMEOUT; that shows up here for every candidate alike, as outliers."""
        started = time.monotonic()
        self.launch()
        self.launched()
        client = self.bench.client
        if self.ip is None:
            self.ip = wait_for(lambda: self.bench.peer_ip(self.name), timeout, f"the client to see {self.name}",
                               interval=0.05)
        remaining = max(1.0, timeout - (time.monotonic() - started))
        url = self.url("/small.bin")
        script = (f"end=$(($(date +%s)+{int(remaining)})); "
                  f"until curl -sf -o /dev/null --max-time 1 {url}; do "
                  f"[ $(date +%s) -ge $end ] && exit 1; sleep 0.02; done")
        result = client.run(["sh", "-c", script], timeout=remaining + 10)
        if result.returncode != 0:
            raise RuntimeError(f"{self.name}: no successful request within {timeout:g}s:\n{self.log_tail()}")
        return time.monotonic() - started

    def log_tail(self) -> str:
        return ""

    def launched(self) -> None:
        pass


class Limit(Candidate):
    kind = "limit"

    def __init__(self, bench: Bench, name: str):
        super().__init__(bench, name)
        self.node = TailscaleNode(name, bench.tailscale_dirs["stock"], self.dir)
        self.configured = False

    def launch(self) -> None:
        # What a user types: tailscaled, `tailscale up`, `tailscale serve --bg --tcp`.
        # With existing state the node logs itself in and the background Serve config is kept.
        self.node.start()
        if not self.configured:
            self.node.up(self.bench.headscale.url, self.bench.auth_key)
            self.node.cli("serve", "--bg", "--tcp", "80", f"tcp://127.0.0.1:{self.bench.nginx.port}")
            self.configured = True

    def stop(self) -> None:
        self.node.stop()

    def roots(self) -> list[int]:
        return [self.node.process.pid] if self.node.process.running else []

    def log_tail(self) -> str:
        return self.node.process.log_tail()


class GoTsnsrv(Candidate):
    kind = "go-tsnsrv"

    def __init__(self, bench: Bench, name: str):
        super().__init__(bench, name)
        key_file = self.dir / "authkey"
        key_file.write_text(bench.auth_key + "\n")
        key_file.chmod(0o600)
        argv = [str(bench.go_tsnsrv), "-name", name, "-plaintext", "-listenAddr", ":80",
                "-stateDir", str(self.dir / "state"), "-authkeyPath", str(key_file),
                "-prometheusAddr=", "-timeout", "120s", bench.nginx.url]
        # tsnet reads the control URL from TS_URL; the offline knobs are the same as tailscaled's.
        env = offline_env(TS_URL=bench.headscale.url, TS_LOGS_DIR=str(self.dir))
        (self.dir / "state").mkdir()
        self.process = ManagedProcess(f"go-tsnsrv-{name}", argv, self.dir / "tsnsrv.log", env=env)

    def launch(self) -> None:
        self.process.start()

    def stop(self) -> None:
        self.process.stop()

    def roots(self) -> list[int]:
        return [self.process.pid] if self.process.running else []

    def log_tail(self) -> str:
        return self.process.log_tail()


class OurTsnsrv(Candidate):
    kind = "tsnsrv"

    def __init__(self, bench: Bench, name: str):
        super().__init__(bench, name)
        self.service = Tsnsrv(name, bench.nginx.url, self.dir, bench.tailscale_dirs[self.tailscale_build()],
                              bench.headscale, bench.auth_key, list(bench.extra_tsnsrv_args) + self.extra_args(),
                              env=self.extra_env())

    def tailscale_build(self) -> str:
        """Which build of tailscaled this candidate's tsnsrv spawns."""
        return "stock"

    def extra_args(self) -> list[str]:
        return []

    def extra_env(self) -> dict[str, str]:
        return {}

    def launch(self) -> None:
        self.launch_time = time.monotonic()
        self.service.start(wait=False)

    def launched(self) -> None:
        """Note when tsnsrv itself reports ready (its /health), next to the client's view."""
        def watch() -> None:
            def ready() -> bool:
                return self.service.health()["ready"]
            with contextlib.suppress(Exception):
                wait_for(ready, 120, "ready", interval=0.02)
                self.ready_seconds = time.monotonic() - self.launch_time
        self.ready_seconds: float | None = None
        self._watcher = threading.Thread(target=watch, daemon=True)
        self._watcher.start()

    def ready_after(self) -> float | None:
        self._watcher.join(5)
        return self.ready_seconds

    def stop(self) -> None:
        self.service.stop()

    def roots(self) -> list[int]:
        return [self.service.process.pid] if self.service.process.running else []

    def log_tail(self) -> str:
        return self.service.process.log_tail()


class TrimmedTsnsrv(OurTsnsrv):
    """Ours with the trimmed tailscaled."""

    kind = "tsnsrv-trimmed"

    def tailscale_build(self) -> str:
        return "trimmed"


class Variant(OurTsnsrv):
    """Ours (or, with --variant-of tsnsrv-trimmed, ours on the trimmed tailscaled) with
    --variant-env / --variant-arg: to measure a change interleaved with the rest."""

    kind = "variant"

    def tailscale_build(self) -> str:
        return "trimmed" if self.bench.args.variant_of == "tsnsrv-trimmed" else "stock"

    def extra_args(self) -> list[str]:
        return list(self.bench.args.variant_arg or [])

    def extra_env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.bench.args.variant_env or [])


class Asserted(OurTsnsrv):
    """Ours signing an identity assertion for each request (one per client, reused)."""

    kind = "assertions"

    def extra_args(self) -> list[str]:
        return ["--assertions"]


class AssertedBound(OurTsnsrv):
    """Ours signing a request-bound identity assertion for every request."""

    kind = "assertions-bound"

    def extra_args(self) -> list[str]:
        return ["--assertions", "--assertion-bind-request"]


KINDS: dict[str, type[Candidate]] = {"limit": Limit, "go-tsnsrv": GoTsnsrv, "tsnsrv": OurTsnsrv,
                                     "tsnsrv-trimmed": TrimmedTsnsrv, "variant": Variant, "assertions": Asserted,
                                     "assertions-bound": AssertedBound}


# --- load ------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict[str, float]:
    result: dict[str, float] = {}
    for pct in ("50", "99"):
        match = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", output, re.M)
        if match:
            result[f"p{pct}_ms"] = _ms(match.group(1))
    match = re.search(r"^\s*(\d+) requests in", output, re.M)
    result["requests"] = float(match.group(1)) if match else 0.0
    match = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    result["rps"] = float(match.group(1)) if match else 0.0
    errors = 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if match:
        errors += sum(int(g) for g in match.groups())
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if match:
        errors += int(match.group(1))
    result["errors"] = float(errors)
    return result


# --- the run ----------------------------------------------------------------------------------

# Round trips (sequential 32-byte echoes for SECONDS), then SIZE bytes streamed to the client.
WEBSOCKET_CLIENT = """
import asyncio, sys, time
import websockets

async def main(url, seconds, size):
    async with websockets.connect(url, max_size=None, compression=None, ping_interval=None) as ws:
        count, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            await ws.send("x" * 32)
            await ws.recv()
            count += 1
        started = time.monotonic()
        await ws.send(f"stream {size}")
        got = 0
        while (message := await ws.recv()) != "done":
            got += len(message)
        assert got == size, got
        print(count / seconds, size / (time.monotonic() - started) / 1e6)

asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
"""

PROFILES = {
    "full": {"wrk_seconds": 10, "rounds": 3, "transfer_size": 1 << 30, "transfer_rounds": 2,
             "fresh_extra": 2, "existing_rounds": 4, "warmup_seconds": 3, "concurrency": (1, 16, 64),
             "ws_seconds": 10, "ws_stream_size": 100 * 1000 * 1000, "ten_count": 10, "ten_rounds": 2,
             "ten_load_seconds": 3},
    "quick": {"wrk_seconds": 3, "rounds": 1, "transfer_size": 64 * MIB, "transfer_rounds": 1,
              "fresh_extra": 0, "existing_rounds": 1, "warmup_seconds": 1, "concurrency": (1, 16, 64),
              "ws_seconds": 3, "ws_stream_size": 20 * 1000 * 1000, "ten_count": 10, "ten_rounds": 1,
              "ten_load_seconds": 1},
}


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.profile = dict(PROFILES["quick" if args.quick else "full"])
        if args.rounds:
            self.profile["rounds"] = args.rounds
        if args.seconds:
            self.profile["wrk_seconds"] = args.seconds
        self.bin_dir: Path = args.bin_dir
        self.tailscale_dirs: dict[str, Path] = {}  # build -> private copies of its tailscaled and tailscale
        self.go_tsnsrv: Path = args.go_tsnsrv
        self.extra_tsnsrv_args: list[str] = args.tsnsrv_arg or []
        self.work = Path(tempfile.mkdtemp(prefix="tsnsrv-bench-", dir="/var/tmp"))
        self.work.chmod(0o711)  # the spawned tailscaled runs as another user
        pid = os.getpid()
        block = pid % 250 + 1
        self.netns = NetworkNamespace(f"tsb{pid}", f"198.19.{block}.1", f"198.19.{block}.2")
        self.stack: list[Any] = []
        trimmed = args.trimmed_bin_dir is not None and not args.skip_trimmed
        self.kinds = [kind for kind in CANDIDATES if kind != "tsnsrv-trimmed" or trimmed] + (
            ["variant"] if args.variant_env or args.variant_arg else [])
        self.kinds += list(ASSERTION_KINDS) if args.assertions else []
        self.samples: dict[str, dict[str, list[float]]] = {kind: {} for kind in self.kinds}
        self.runs: list[dict[str, Any]] = []
        self.processes: dict[str, list[tuple[int, str, int]]] = {}
        self.last_proxy_growth_mib = 0.0
        self.last_proxy_cpu = 0.0
        self.notes: list[str] = []
        self.candidates: dict[str, Candidate] = {}
        self.auth_key = ""
        self._names = 0

    def new_dir(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work))
        path.chmod(0o711)
        return path

    def record(self, kind: str, metric: str, value: float) -> None:
        self.samples[kind].setdefault(metric, []).append(value)

    def peer_ip(self, hostname: str) -> str | None:
        status = self.laptop.status()
        for peer in (status.get("Peer") or {}).values():
            if peer.get("HostName") == hostname and peer.get("Online"):
                return next((ip for ip in peer.get("TailscaleIPs") or () if ":" not in ip), None)
        return None

    # --- setup / teardown ---

    def setup(self) -> None:
        # Each build the candidates run, copied: PSS splits a binary's pages among all the
        # processes that map the file, and test runs elsewhere on the machine may run the same one.
        for build, source in (("stock", self.bin_dir), ("trimmed", self.args.trimmed_bin_dir)):
            if source is not None:
                target = self.work / f"tailscale-{build}"
                target.mkdir()
                for binary in ("tailscaled", "tailscale"):
                    shutil.copy2(source / binary, target / binary)
                target.chmod(0o755)  # the spawned tailscaled runs as another user
                self.tailscale_dirs[build] = target
        with step(f"network namespace {self.netns.name} ({self.netns.host_ip} / {self.netns.ns_ip})"):
            self.netns.create()
            self.stack.append(self.netns)
        with step("headscale"):
            self.headscale = Headscale(self.bin_dir / "headscale", self.work / "headscale", self.netns.host_ip,
                                       free_port(self.netns.host_ip),
                                       free_port(self.netns.host_ip, socket.SOCK_DGRAM))
            self.headscale.write_config(ALLOW_ALL_POLICY)
            self.stack.append(self.headscale)
            self.headscale.start()
            self.auth_key = self.headscale.auth_key("alice")
        with step("client device (kernel-TUN tailscaled in the namespace)"):
            if hasattr(self.headscale, "relay_into"):  # newer harness: nodes log in through a loopback relay
                self.headscale.relay_into(self.netns)
            self.laptop = TailscaleNode("laptop", self.bin_dir, self.work / "laptop", self.netns).start()
            self.stack.append(self.laptop)
            self.laptop.up(self.headscale.url, self.auth_key)
            self.client = ClientDevice(self.laptop)
        with step("websocket echo server"):
            port = free_port()
            self.wsecho = ManagedProcess("wsecho", [sys.executable, str(REPO / "bench" / "wsecho.py"), str(port)],
                                         self.work / "wsecho.log")
            self.stack.append(self.wsecho)
            self.wsecho.start()
            wait_for(lambda: "listening" in self.wsecho.log_text(), 20, "the websocket echo server")
        with step(f"nginx upstream ({self.profile['transfer_size'] // MIB} MiB file)"):
            self.nginx = Nginx(self.work / "nginx", self.profile["transfer_size"], port)
            self.stack.append(self.nginx)
            self.nginx.start()

    def teardown(self) -> None:
        for candidate in list(self.candidates.values()):
            with contextlib.suppress(Exception):
                candidate.stop()
        for part in reversed(self.stack):
            with contextlib.suppress(Exception):
                if isinstance(part, NetworkNamespace):
                    part.destroy()
                elif hasattr(part, "close"):  # headscale with its relays (newer harness)
                    part.close()
                else:
                    part.stop()
        for process in STARTED:
            with contextlib.suppress(Exception):
                process.stop(5)
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)

    def order(self, round_index: int, with_assertions: bool = False) -> list[str]:
        kinds = [kind for kind in self.kinds if with_assertions or kind not in ASSERTION_KINDS]
        shift = round_index % len(kinds)
        return kinds[shift:] + kinds[:shift]

    # --- phases ---

    def start_candidates(self) -> None:
        """First start of each candidate, with a fresh state: the first 'fresh' sample."""
        for kind in self.kinds:
            with step(f"starting {kind} (fresh state)"):
                candidate = KINDS[kind](self, f"bench-{kind}")
                self.candidates[kind] = candidate
                seconds = candidate.start_and_time()
                self.record(kind, "start_fresh_s", seconds)
                self.note_ready(candidate, "fresh")
                print(f"    first request after {seconds:.2f}s; {candidate.ip}", flush=True)
        for kind, candidate in self.candidates.items():
            assert candidate.ip is not None
            self.laptop.wait_for_peer(candidate.ip)
        time.sleep(2)
        for kind, candidate in self.candidates.items():
            self.record(kind, "rss_idle_mib", candidate.rss_kib() / 1024)
            self.record(kind, "proxy_rss_idle_mib", candidate.proxy_rss_kib() / 1024)
            self.processes[kind] = [(pid, comm(pid), status_kib(pid, "VmRSS") // 1024) for pid in candidate.tree()]

    def wrk(self, candidate: Candidate, connections: int, seconds: float) -> tuple[dict[str, float], float, float]:
        url = candidate.url("/small.bin")
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s", "--latency", url]
        tree = candidate.tree()
        proxy = [pid for pid in tree if comm(pid) != "tailscaled"]
        cpu_before, proxy_before = cpu_seconds(tree), cpu_seconds(proxy)
        with RssSampler(candidate.roots) as sampler:
            result = self.client.run(argv, timeout=seconds + 60)
        cpu = cpu_seconds(tree) - cpu_before
        self.last_proxy_cpu = cpu_seconds(proxy) - proxy_before
        output = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            raise RuntimeError(f"wrk failed against {candidate.kind}: {result.stderr.decode(errors='replace')}")
        return parse_wrk(output), cpu, sampler.peak_kib / 1024

    def warmup(self) -> None:
        with step("warm-up"):
            for kind in self.kinds:
                self.wrk(self.candidates[kind], 16, self.profile["warmup_seconds"])

    def small_gets(self, round_index: int) -> None:
        seconds = self.profile["wrk_seconds"]
        for connections in self.profile["concurrency"]:
            with step(f"round {round_index + 1}: small GET, c={connections}, {seconds}s each"):
                for kind in self.order(round_index, with_assertions=True):
                    stats, cpu, peak = self.wrk(self.candidates[kind], connections, seconds)
                    self.runs.append({"kind": kind, "round": round_index, "test": f"wrk-c{connections}",
                                      **stats, "cpu_s": cpu, "rss_peak_mib": peak})
                    self.record(kind, f"rps_c{connections}", stats["rps"])
                    self.record(kind, f"p50_c{connections}_ms", stats.get("p50_ms", float("nan")))
                    self.record(kind, f"p99_c{connections}_ms", stats.get("p99_ms", float("nan")))
                    self.record(kind, f"errors_c{connections}", stats["errors"])
                    self.record(kind, "rss_peak_load_mib", peak)
                    if stats["requests"]:
                        self.record(kind, f"cpu_per_10k_c{connections}_s", cpu / stats["requests"] * 10_000)
                        self.record(kind, f"proxy_cpu_per_10k_c{connections}_s",
                                    self.last_proxy_cpu / stats["requests"] * 10_000)
                    print(f"    {kind:10} {stats['rps']:9.0f} req/s  p50 {stats.get('p50_ms', 0):7.2f} ms  "
                          f"p99 {stats.get('p99_ms', 0):7.2f} ms  cpu {cpu:5.1f}s  errors {stats['errors']:.0f}",
                          flush=True)

    def transfer(self, candidate: Candidate, upload: bool) -> tuple[float, float, float]:
        size = self.profile["transfer_size"]
        common = ["curl", "-sS", "-o", "/dev/null", "--max-time", "900"]
        if upload:
            argv = [*common, "-H", "Expect:", "-X", "POST", "-T", str(self.nginx.big_file),
                    "-w", "%{http_code} %{size_upload} %{time_total}", candidate.url("/upload")]
        else:
            argv = [*common, "-w", "%{http_code} %{size_download} %{time_total}", candidate.url("/big.bin")]
        before, proxy_before = candidate.rss_kib(), candidate.proxy_rss_kib()
        with RssSampler(candidate.roots) as sampler:
            result = self.client.run(argv, timeout=960)
        self.last_proxy_growth_mib = (sampler.proxy_peak_kib - proxy_before) / 1024
        code, moved, seconds = result.stdout.decode().split()
        if result.returncode != 0 or code != "200" or int(float(moved)) != size:
            raise RuntimeError(f"{'upload' if upload else 'download'} through {candidate.kind} failed: "
                               f"{code} {moved} bytes, {result.stderr.decode(errors='replace')}")
        return size / float(seconds) / 1e6, (sampler.peak_kib - before) / 1024, sampler.peak_kib / 1024

    def transfers(self, round_index: int) -> None:
        size = self.profile["transfer_size"] // MIB
        for upload in (False, True):
            what = "upload" if upload else "download"
            with step(f"round {round_index + 1}: {size} MiB {what}"):
                for kind in self.order(round_index):
                    candidate = self.candidates[kind]
                    rate, growth, peak = self.transfer(candidate, upload)
                    self.record(kind, f"{what}_MBps", rate)
                    self.record(kind, f"rss_growth_{what}_mib", growth)
                    self.record(kind, f"proxy_rss_growth_{what}_mib", self.last_proxy_growth_mib)
                    self.record(kind, "rss_peak_load_mib", peak)
                    self.runs.append({"kind": kind, "round": round_index, "test": what, "MBps": rate,
                                      "rss_growth_mib": growth})
                    print(f"    {kind:10} {rate:8.1f} MB/s  RSS growth {growth:6.1f} MiB", flush=True)

    def websockets(self, round_index: int) -> None:
        seconds, size = self.profile["ws_seconds"], self.profile["ws_stream_size"]
        with step(f"round {round_index + 1}: websocket echo round trips ({seconds}s) and a {size // MIB} MiB stream"):
            for kind in self.order(round_index):
                candidate = self.candidates[kind]
                result = self.client.run([sys.executable, "-c", WEBSOCKET_CLIENT, candidate.url("/ws").replace(
                    "http://", "ws://"), str(seconds), str(size)], timeout=seconds + 300)
                if result.returncode != 0:
                    raise RuntimeError(f"websocket client against {kind} failed: {result.stderr.decode()[-2000:]}")
                round_trips, stream_mbps = map(float, result.stdout.split())
                self.record(kind, "ws_round_trips_per_s", round_trips)
                self.record(kind, "ws_stream_MBps", stream_mbps)
                print(f"    {kind:10} {round_trips:8.0f} round trips/s  stream {stream_mbps:7.1f} MB/s", flush=True)

    def ten_services(self, round_index: int) -> None:
        """The blog post's setup: ten services of one kind on one host, started together."""
        count = self.profile["ten_count"]
        for kind in [k for k in self.order(round_index) if k in ("go-tsnsrv", "tsnsrv", "tsnsrv-trimmed", "variant")]:
            with step(f"round {round_index + 1}: {count} {kind} services at once"):
                group = [KINDS[kind](self, f"ten{round_index}-{i}-{kind}") for i in range(count)]
                started = time.monotonic()
                try:
                    threads = [threading.Thread(target=member.start_and_time) for member in group]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    all_serving = time.monotonic() - started
                    if any(member.ip is None for member in group):
                        raise RuntimeError(f"not all {count} {kind} services came up")
                    time.sleep(2)  # settle: connections from the start-up probes close
                    idle = sum(pss_kib(pid) for member in group for pid in member.tree()) / 1024
                    python_idle = sum(pss_kib(pid) for member in group for pid in member.tree()
                                      if comm(pid) != "tailscaled") / 1024 / count
                    for member in group:
                        self.wrk(member, 8, self.profile["ten_load_seconds"])
                    loaded = sum(pss_kib(pid) for member in group for pid in member.tree()) / 1024
                finally:
                    for member in group:
                        with contextlib.suppress(Exception):
                            member.stop()
                    # Gone from the tailnet too: the next group would otherwise carry these ten
                    # as peers in its network maps, and weigh more for it.
                    self.headscale.delete_nodes({member.name for member in group})
                self.record(kind, "ten_start_all_s", all_serving)
                self.record(kind, "ten_pss_idle_mib", idle)
                self.record(kind, "ten_pss_after_load_mib", loaded)
                if kind != "go-tsnsrv":
                    self.record(kind, "ten_python_pss_idle_mib", python_idle)
                print(f"    {kind:10} all serving after {all_serving:5.1f}s  PSS idle {idle:6.1f} MiB  "
                      f"after load {loaded:6.1f} MiB", flush=True)
        with step(f"round {round_index + 1}: {count} bare Python processes importing aiohttp.web, attrs, cattrs"):
            bare = bare_import_pss_mib(count)
            for kind in ("tsnsrv", "tsnsrv-trimmed", "variant"):
                if kind in self.kinds:
                    self.record(kind, "ten_bare_import_pss_mib", bare)
            print(f"    one bare import process: PSS {bare:5.1f} MiB (of {count} alike)", flush=True)

    def note_ready(self, candidate: Candidate, state: str) -> None:
        if isinstance(candidate, OurTsnsrv):
            ready = candidate.ready_after()
            if ready is not None:
                self.record(candidate.kind, f"ready_{state}_s", ready)

    def startups(self) -> None:
        for round_index in range(self.profile["existing_rounds"]):
            with step(f"restart with existing state, round {round_index + 1}"):
                for kind in self.order(round_index):
                    candidate = self.candidates[kind]
                    candidate.stop()
                    time.sleep(0.5)
                    seconds = candidate.start_and_time()
                    self.record(kind, "start_existing_s", seconds)
                    self.note_ready(candidate, "existing")
                    print(f"    {kind:10} first request after {seconds:.2f}s", flush=True)
        for round_index in range(self.profile["fresh_extra"]):
            with step(f"start with fresh state, round {round_index + 2}"):
                for kind in self.order(round_index + 1):
                    candidate = KINDS[kind](self, f"fresh{round_index + 2}-{kind}")
                    try:
                        seconds = candidate.start_and_time()
                        self.note_ready(candidate, "fresh")
                    finally:
                        candidate.stop()
                    self.record(kind, "start_fresh_s", seconds)
                    print(f"    {kind:10} first request after {seconds:.2f}s", flush=True)

    def run(self) -> dict[str, Any]:
        started = time.time()
        noise_before = machine_noise()
        monitor = NoiseMonitor()
        monitor.start()
        self.setup()
        self.start_candidates()
        self.warmup()
        for round_index in range(self.profile["rounds"]):
            self.small_gets(round_index)
        for round_index in range(0 if self.args.skip_transfers else self.profile["transfer_rounds"]):
            self.transfers(round_index)
        for round_index in range(self.profile["rounds"]):
            self.websockets(round_index)
        for kind, candidate in self.candidates.items():
            self.record(kind, "rss_idle_after_load_mib", candidate.rss_kib() / 1024)
            self.record(kind, "rss_hwm_mib", candidate.hwm_kib() / 1024)
        ours = self.candidates["tsnsrv"]
        assert isinstance(ours, OurTsnsrv)
        with contextlib.suppress(Exception):
            refused = {line.partition('reason="')[2].partition('"')[0]: float(line.rpartition(" ")[2])
                       for line in ours.service.metrics().splitlines()
                       if line.startswith("tsnsrv_refused_front_connections_total")}
            if sum(refused.values()):
                by_reason = ", ".join(f"{count:.0f} {reason}" for reason, count in sorted(refused.items()) if count)
                self.notes.append(f"ours refused front connections during the load: {by_reason} "
                                  "(tsnsrv_refused_front_connections_total; closed_before_check = the client "
                                  "hung up before tsnsrv could identify the connection)")
        if self.args.profile:
            self.profile_ours()
        if not self.args.skip_startup:
            self.startups()
        if not self.args.skip_ten:
            for round_index in range(self.profile["ten_rounds"]):
                self.ten_services(round_index)
        noise_after = machine_noise()
        during = monitor.stop()
        for kind in self.kinds:
            for metric in ("start_existing_s", "start_fresh_s"):
                if self.samples[kind].get(metric):
                    self.samples[kind][metric.replace("_s", "_min_s")] = [min(self.samples[kind][metric])]
        return {
            "mode": "quick" if self.args.quick else "full",
            "kinds": self.kinds,
            "variant": {"env": self.args.variant_env or [], "args": self.args.variant_arg or [],
                        "of": self.args.variant_of},
            "tsnsrv_args": self.extra_tsnsrv_args,
            "profile": {k: list(v) if isinstance(v, tuple) else v for k, v in self.profile.items()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "noise": {"before": noise_before, "after": noise_after, "during": during},
            "samples": self.samples,
            "processes": self.processes,
            "notes": self.notes,
            "summary": {kind: {metric: (max if metric in PEAK_METRICS else median)(values)
                                for metric, values in metrics.items()}
                        for kind, metrics in self.samples.items()},
            "runs": self.runs,
        }

    # --- profiling (optional) ---

    def profile_ours(self) -> None:
        """py-spy on our tsnsrv process during c=64 load and one big download."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(py_spy).exists():
            print("    (py-spy not installed in the venv: skipping --profile)", flush=True)
            return
        ours = self.candidates[self.args.profile_target]
        pid = ours.roots()[0]
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        seconds = self.profile["wrk_seconds"]
        for label, action in (
            ("c64", lambda: self.wrk(ours, 64, seconds)),
            ("download", lambda: self.transfer(ours, upload=False)),
            ("upload", lambda: self.transfer(ours, upload=True)),
        ):
            with step(f"profiling {ours.kind} under {label}"):
                raw = self.work / f"profile-{label}.txt"
                spy = subprocess.Popen([py_spy, "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(raw),
                                        "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(1)
                action()
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
                if raw.exists():
                    name = f"profile-{label}" if ours.kind == "tsnsrv" else f"profile-{ours.kind}-{label}"
                    (out / f"{name}.md").write_text(summarize_profile(raw.read_text(), label if ours.kind == "tsnsrv" else f"{ours.kind}, {label}"))
                    shutil.copy(raw, out / f"{name}.collapsed")


def summarize_profile(collapsed: str, label: str, top: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed stacks."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in set(frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + count
    modules: dict[str, int] = {}
    for frame, count in self_counts.items():
        match = re.search(r"\(([^/)]+)(?:/[^)]*)?\)$", frame)
        module = match.group(1) if match else "?"
        module = module.removesuffix(".py")
        modules[module] = modules.get(module, 0) + count
    lines = [f"# py-spy profile of our tsnsrv: {label}", "", f"{total} samples of the main thread at 200 Hz, idle time excluded "
             "(py-spy's default), so percentages are of busy time. Lines folded into functions.", "",
             "## Self time by package", "", "| % | package |", "| ---: | --- |"]
    for module, count in sorted(modules.items(), key=lambda kv: -kv[1]):
        if count * 200 >= total:  # at least 0.5 %
            lines.append(f"| {100 * count / max(total, 1):.1f} | {module} |")
    lines += ["", "## Self time", "", "| % | function |", "| ---: | --- |"]
    for frame, count in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {100 * count / max(total, 1):.1f} | `{frame}` |")
    lines += ["", "## Inclusive time", "", "| % | function |", "| ---: | --- |"]
    for frame, count in sorted(incl_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {100 * count / max(total, 1):.1f} | `{frame}` |")
    return "\n".join(lines) + "\n"


# Reported as the maximum over runs (worst case); everything else as the median.
PEAK_METRICS = frozenset({"rss_peak_load_mib", "rss_growth_download_mib", "rss_growth_upload_mib",
                          "proxy_rss_growth_download_mib", "proxy_rss_growth_upload_mib"})


def median(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


class NoiseMonitor:
    """Looks every few seconds for other work on the machine (test suites, builds) and the load."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self.max_load = 0.0
        self.samples = 0
        self.busy_samples = 0
        self.examples: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                noise = machine_noise()
                self.samples += 1
                self.max_load = max(self.max_load, noise["loadavg"][0])
                if noise["other_workloads"]:
                    self.busy_samples += 1
                    self.examples.update(noise["examples"])
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {"samples": self.samples, "busy_samples": self.busy_samples, "max_load1": self.max_load,
                "examples": sorted(self.examples)[:5]}


def machine_noise() -> dict[str, Any]:
    load = Path("/proc/loadavg").read_text().split()[:3]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    others = [line for line in ps if re.search(r"pytest|go build|/compile |go-build", line)]
    return {"loadavg": [float(x) for x in load], "other_workloads": len(others),
            "examples": sorted({line[:80] for line in others})[:5]}


# --- reporting --------------------------------------------------------------------------------

ROWS: list[tuple[str, str, str, int]] = [
    # metric key, label, better ("high"/"low"), decimals
    ("rps_c1", "small GET c=1: requests/s", "high", 0),
    ("p50_c1_ms", "small GET c=1: p50 latency (ms)", "low", 2),
    ("p99_c1_ms", "small GET c=1: p99 latency (ms)", "low", 2),
    ("rps_c16", "small GET c=16: requests/s", "high", 0),
    ("p50_c16_ms", "small GET c=16: p50 latency (ms)", "low", 2),
    ("p99_c16_ms", "small GET c=16: p99 latency (ms)", "low", 2),
    ("rps_c64", "small GET c=64: requests/s", "high", 0),
    ("p50_c64_ms", "small GET c=64: p50 latency (ms)", "low", 2),
    ("p99_c64_ms", "small GET c=64: p99 latency (ms)", "low", 2),
    ("download_MBps", "download: MB/s", "high", 1),
    ("upload_MBps", "upload: MB/s", "high", 1),
    ("rss_idle_mib", "RSS idle, after start (MiB)", "low", 1),
    ("rss_idle_after_load_mib", "RSS idle, after the load (MiB)", "low", 1),
    ("rss_peak_load_mib", "RSS peak under load, sampled (MiB)", "low", 1),
    ("rss_hwm_mib", "RSS high-water mark, VmHWM (MiB)", "low", 1),
    ("rss_growth_download_mib", "RSS growth during download (MiB)", "low", 1),
    ("rss_growth_upload_mib", "RSS growth during upload (MiB)", "low", 1),
    ("proxy_rss_idle_mib", "RSS without tailscaled, idle (MiB)", "low", 1),
    ("proxy_rss_growth_download_mib", "RSS growth without tailscaled, download (MiB)", "low", 1),
    ("proxy_rss_growth_upload_mib", "RSS growth without tailscaled, upload (MiB)", "low", 1),
    ("cpu_per_10k_c64_s", "CPU seconds per 10k requests (c=64)", "low", 2),
    ("cpu_per_10k_c1_s", "CPU seconds per 10k requests (c=1)", "low", 2),
    ("proxy_cpu_per_10k_c64_s", "CPU seconds per 10k requests without tailscaled (c=64)", "low", 2),
    ("start_existing_s", "start to first client request, existing state, median (s)", "low", 2),
    ("start_existing_min_s", "start to first client request, existing state, best (s)", "low", 2),
    ("start_fresh_s", "start to first client request, fresh state, median (s)", "low", 2),
    ("start_fresh_min_s", "start to first client request, fresh state, best (s)", "low", 2),
    ("ready_existing_s", "start to ready per /health, existing state (s)", "low", 2),
    ("ready_fresh_s", "start to ready per /health, fresh state (s)", "low", 2),
    ("ws_round_trips_per_s", "websocket echo round trips/s (one session)", "high", 0),
    ("ws_stream_MBps", "websocket stream to the client, 100 MB: MB/s", "high", 1),
    ("ten_start_all_s", "ten services: start until all ten serve (s)", "low", 1),
    ("ten_pss_idle_mib", "ten services: total PSS idle (MiB)", "low", 1),
    ("ten_pss_after_load_mib", "ten services: total PSS after a short load on each (MiB)", "low", 1),
    ("ten_python_pss_idle_mib", "ten services: PSS of one service's Python process, idle (MiB)", "low", 1),
    ("ten_bare_import_pss_mib", "the same for a bare `import aiohttp.web, attrs, cattrs` (MiB)", "low", 1),
]


ASSERTION_ROWS = [
    ("rps_c1", "small GET c=1: requests/s", 0),
    ("rps_c64", "small GET c=64: requests/s", 0),
    ("p99_c64_ms", "small GET c=64: p99 latency (ms)", 2),
    ("cpu_per_10k_c1_s", "CPU s per 10k requests, c=1 (proxy + tailscaled)", 2),
    ("cpu_per_10k_c64_s", "CPU s per 10k requests, c=64 (proxy + tailscaled)", 2),
    ("proxy_cpu_per_10k_c1_s", "CPU s per 10k requests, c=1 (Python alone)", 2),
    ("proxy_cpu_per_10k_c64_s", "CPU s per 10k requests, c=64 (Python alone)", 2),
]


def assertion_rows(summary: dict[str, dict[str, float]]) -> list[str]:
    """Ours with identity assertions (unbound, bound) against ours with them off."""
    off, unbound, bound = summary["tsnsrv"], summary["assertions"], summary["assertions-bound"]
    lines = ["## Identity assertions", "",
             "ours with `--assertions` (unbound: one assertion per client, reused until shortly before it "
             "expires) and with `--assertion-bind-request` as well (bound: one signature per request), against ours "
             "with assertions off; same small GETs, interleaved.", "",
             "| measure | off | unbound | bound | unbound/off | bound/off |", "| --- |" + " ---: |" * 5]
    for key, label, decimals in ASSERTION_ROWS:
        values = [off.get(key), unbound.get(key), bound.get(key)]
        lines.append(f"| {label} | " + " | ".join(fmt(v, decimals) for v in values) +
                     f" | {ratio(values[1], values[0])} | {ratio(values[2], values[0])} |")
    return lines + [""]


# Column headings of the results table, and the ratios it shows (numerator, denominator).
HEADERS = {"limit": "limit", "go-tsnsrv": "go-tsnsrv", "tsnsrv": "tsnsrv (ours)",
           "tsnsrv-trimmed": "ours, trimmed tailscaled", "variant": "variant"}
SHORT = {"limit": "limit", "go-tsnsrv": "go-tsnsrv", "tsnsrv": "ours", "tsnsrv-trimmed": "trimmed",
         "variant": "variant"}
RATIOS = [("tsnsrv", "go-tsnsrv"), ("tsnsrv", "limit"), ("tsnsrv-trimmed", "go-tsnsrv"), ("tsnsrv-trimmed", "tsnsrv")]


def fmt(value: float | None, decimals: int) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:,.{decimals}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a != a or b != b or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def targets(summary: dict[str, dict[str, float]]) -> list[tuple[str, str, bool | None]]:
    ours, go = summary["tsnsrv"], summary["go-tsnsrv"]

    def r(metric: str, base: dict[str, float]) -> float:
        a, b = ours.get(metric, float("nan")), base.get(metric, float("nan"))
        return a / b if b else float("nan")

    def check(value: float, ok: Callable[[float], bool]) -> bool | None:
        return None if value != value else ok(value)

    checks = [
        *((f"small GET c={c} requests/s ≥ 1.0 × go-tsnsrv", r(f"rps_c{c}", go), lambda v: v >= 1.0) for c in (1, 16, 64)),
        *((f"small GET c={c} p99 ≤ 1.2 × go-tsnsrv", r(f"p99_c{c}_ms", go), lambda v: v <= 1.2) for c in (1, 16, 64)),
        ("Python CPU per 10k requests (c=64) ≤ 0.6 × the whole go-tsnsrv",
         ours.get("proxy_cpu_per_10k_c64_s", float("nan")) / go.get("cpu_per_10k_c64_s", float("nan")),
         lambda v: v <= 0.6),
        ("download MB/s ≥ 1.0 × go-tsnsrv", r("download_MBps", go), lambda v: v >= 1.0),
        ("upload MB/s ≥ 1.0 × go-tsnsrv", r("upload_MBps", go), lambda v: v >= 1.0),
        ("proxy RSS growth during download < 8 MiB", ours.get("proxy_rss_growth_download_mib", float("nan")),
         lambda v: v < 8),
        ("proxy RSS growth during upload < 8 MiB", ours.get("proxy_rss_growth_upload_mib", float("nan")),
         lambda v: v < 8),
        ("websocket round trips/s ≥ 1.0 × go-tsnsrv", r("ws_round_trips_per_s", go), lambda v: v >= 1.0),
        ("100 MB websocket stream ≥ 1.0 × go-tsnsrv", r("ws_stream_MBps", go), lambda v: v >= 1.0),
        ("ten services, total PSS after load ≤ 1.0 × go-tsnsrv", r("ten_pss_after_load_mib", go), lambda v: v <= 1.0),
        ("ten services, total PSS idle ≤ 2.0 × go-tsnsrv", r("ten_pss_idle_mib", go), lambda v: v <= 2.0),
        ("ten services, start until all serve ≤ 1.0 × go-tsnsrv", r("ten_start_all_s", go), lambda v: v <= 1.0),
        ("ten services, one Python process idle within 4 MiB PSS of a bare import (difference, MiB)",
         ours.get("ten_python_pss_idle_mib", float("nan")) - ours.get("ten_bare_import_pss_mib", float("nan")),
         lambda v: v <= 4),
        ("ready with existing state ≤ 3 s (/health ready, median, s)",
         ours.get("ready_existing_s", float("nan")), lambda v: v <= 3),
    ]
    return [(label, f"{value:.2f}" if value == value else "n/a", check(value, ok)) for label, value, ok in checks]


def markdown(result: dict[str, Any], machine: dict[str, str]) -> str:
    summary = result["summary"]
    size = result["profile"]["transfer_size"] // MIB
    size_text = "1 GiB" if size == 1024 else f"{size} MiB"
    noise = result["noise"]
    during = noise.get("during", {})
    busy = noise["before"]["other_workloads"] or noise["after"]["other_workloads"] or during.get("busy_samples")
    lines = [
        f"# tsnsrv benchmark results ({result['mode']} run)",
        "",
        f"Run {result['started']}, {result['duration_s']:.0f} s, on {machine['cpu']} ({machine['nproc']} CPUs), "
        f"kernel {machine['kernel']}; details in machine.md. Medians over {result['profile']['rounds']} "
        f"round(s) of {result['profile']['wrk_seconds']} s wrk runs, {result['profile']['transfer_rounds']} "
        f"transfer round(s) of {size_text}; candidates interleaved. MB = 10^6 bytes.",
        "",
    ]
    if busy:
        examples = noise["before"]["examples"] or during.get("examples") or noise["after"]["examples"] or ["?"]
        lines += [f"**Noisy machine:** other workloads ran during this run (seen in "
                  f"{during.get('busy_samples', '?')} of {during.get('samples', '?')} checks every 5 s; load average "
                  f"up to {during.get('max_load1', noise['after']['loadavg'][0]):.1f}; e.g. `{examples[0]}`). "
                  "Ratios between candidates are more trustworthy than absolute figures.", ""]
    kinds = [kind for kind in result.get("kinds", list(CANDIDATES)) if kind not in ASSERTION_KINDS]
    if "variant" in kinds:
        base = result["variant"].get("of", "tsnsrv")
        lines += [f"variant = {HEADERS[base]} with {' '.join(result['variant']['env'] + result['variant']['args'])}",
                  ""]
    ratios = [(a, b) for a, b in RATIOS if a in kinds and b in kinds]
    if "variant" in kinds:
        ratios.append(("variant", result["variant"].get("of", "tsnsrv")))
    lines += [
        "| measure | " + " | ".join(HEADERS[kind] for kind in kinds) + " | " +
        " | ".join(f"{SHORT[a]}/{SHORT[b]}" for a, b in ratios) + " |",
        "| --- |" + " ---: |" * (len(kinds) + len(ratios)),
    ]
    for key, label, _better, decimals in ROWS:
        if key.endswith("MBps"):
            label = f"{size_text} {label}"
        values = {kind: summary[kind].get(key) for kind in kinds}
        lines.append(f"| {label} | " + " | ".join(fmt(values[kind], decimals) for kind in kinds) + " | " +
                     " | ".join(ratio(values[a], values[b]) for a, b in ratios) + " |")
    errors = {kind: sum(sum(result["samples"][kind].get(f"errors_c{c}", [])) for c in result["profile"]["concurrency"])
              for kind in kinds}
    lines += ["", "wrk errors (socket errors + non-2xx responses), all runs: " +
              ", ".join(f"{kind} {errors[kind]:.0f}" for kind in kinds) + ".", ""]
    for note in result.get("notes", []):
        lines += [f"Note: {note}.", ""]
    if ASSERTION_KINDS[0] in result.get("kinds", []):
        lines += assertion_rows(summary)
    lines += ["## Targets (issue 10)", "", "| target | ours | met |", "| --- | ---: | :---: |"]
    for label, value, met in targets(summary):
        lines.append(f"| {label} | {value} | {'yes' if met else 'n/a' if met is None else '**no**'} |")
    lines += [
        "",
        "## What is measured",
        "",
        "- limit: a userspace tailscaled with `tailscale serve --bg --tcp 80 tcp://127.0.0.1:<nginx>`; footprint = that "
        "tailscaled. go-tsnsrv: the Go tsnsrv `-plaintext -listenAddr :80`; footprint = its one process. tsnsrv: ours, "
        "`--plaintext`, default settings (access log on); footprint = the tsnsrv process and its tailscaled child.",
        "- small GET: `wrk -t1 -cN --latency` for a 1 KiB static file, from the client device's network namespace "
        "over its kernel WireGuard interface (tailscaled on TUN).",
        f"- transfers: curl of a {size_text} file (download) and a {size_text} POST that nginx reads whole (upload).",
        "- RSS: summed VmRSS of the footprint's process tree, sampled every 100 ms; growth = peak during a transfer "
        "minus RSS just before it (the maximum over rounds). \"Without tailscaled\": ours = the Python process alone; "
        "go-tsnsrv = its whole process (tsnet is inside it); limit = nothing. CPU: utime+stime deltas of the "
        "footprint over a wrk run / requests × 10,000 (\"without tailscaled\" as for RSS).",
        "- start: from spawning the process(es) (limit: tailscaled, then `tailscale up` and `tailscale serve` on "
        "a fresh state) until curl on the client gets its first 200; fresh = new state and node, existing = "
        "restart on the state of the previous run. The client polls with 1 s curl attempts. When its first "
        "WireGuard handshake races the node's start (old session, DERP not yet connected), wireguard-go retries "
        "after 5 s (REKEY_TIMEOUT): that hits every candidate alike and shows as ~5 s outliers, hence the best "
        "run next to the median. \"ready per /health\" is tsnsrv's own view (what sd_notify reports).",
        "- websockets: one session through each candidate to an echo server behind nginx (`bench/wsecho.py`): "
        "sequential 32-byte echoes for the run's length, then 100 MB sent to the client in 1 MiB messages.",
        "- ten services: ten of one kind (ours: ten proxies and ten tailscaleds) started at once, on fresh state; "
        "the time until the client's first 200 from the last of them; total PSS (smaps_rollup, so shared pages "
        "count once) of all their processes 2 s after, and again after `wrk -c8` on each for a few seconds. Each "
        "group's nodes are deleted from headscale afterwards, so every group sees a tailnet of the same size.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    colors = {"limit": "#9e9e9e", "go-tsnsrv": "#4c78a8", "tsnsrv": "#f58518", "tsnsrv-trimmed": "#e45756",
              "variant": "#54a24b"}
    kinds = [kind for kind in result.get("kinds", list(CANDIDATES)) if kind not in ASSERTION_KINDS]
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0][0], "small GET requests/s", [f"rps_c{c}" for c in result["profile"]["concurrency"]],
         [f"c={c}" for c in result["profile"]["concurrency"]]),
        (axes[0][1], "small GET p99 latency (ms)", [f"p99_c{c}_ms" for c in result["profile"]["concurrency"]],
         [f"c={c}" for c in result["profile"]["concurrency"]]),
        (axes[1][0], "transfer MB/s", ["download_MBps", "upload_MBps"], ["download", "upload"]),
        (axes[1][1], "memory (MiB)", ["rss_idle_mib", "rss_peak_load_mib"], ["idle", "peak under load"]),
    ]
    width = 0.8 / len(kinds)
    for axis, title, metrics, labels in panels:
        for index, kind in enumerate(kinds):
            values = [summary[kind].get(metric, float("nan")) for metric in metrics]
            positions = [x + (index - (len(kinds) - 1) / 2) * width for x in range(len(metrics))]
            bars = axis.bar(positions, values, width, label=kind, color=colors[kind])
            axis.bar_label(bars, fmt="%.0f" if max((v for v in values if v == v), default=0) >= 10 else "%.1f",
                           fontsize=7)
        axis.set_xticks(range(len(metrics)), labels)
        axis.set_title(title)
    axes[0][0].legend()
    figure.suptitle(f"tsnsrv vs go-tsnsrv vs bare tailscaled Serve ({result['mode']} run, {result['started']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def command_output(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({exc})"
    return (result.stdout or result.stderr).strip()


def machine_description(bench: Bench) -> dict[str, str]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    os_name = "unknown"
    with contextlib.suppress(OSError):
        os_name = re.search(r'PRETTY_NAME="([^"]*)"', Path("/etc/os-release").read_text()).group(1)  # type: ignore[union-attr]
    source = bench.go_tsnsrv.parent / "tsnsrv.source"
    import aiohttp
    return {
        "nproc": command_output(["nproc"]),
        "cpu": cpu,
        "memory": f"{int(memory) // 1024} MiB",
        "kernel": platform.release(),
        "os": os_name,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "tsnsrv (ours)": f"{command_output([tsnsrv_command(), '--version'])} (repo commit "
                         f"{command_output(['git', '-C', str(REPO), 'rev-parse', '--short', 'HEAD'])}"
                         + (", with uncommitted changes in python/" if command_output(
                             ['git', '-C', str(REPO), 'status', '--porcelain', '--', 'python']) else "") + ")",
        "go-tsnsrv": (source.read_text().strip().replace("\n", "; ") if source.exists() else str(bench.go_tsnsrv)),
        "go-tsnsrv build": command_output(["go", "version", str(bench.go_tsnsrv)]),
        "go-tsnsrv tailscale.com": next((line.split()[-2] for line in
                                         command_output(["go", "version", "-m", str(bench.go_tsnsrv)]).splitlines()
                                         if "\ttailscale.com\t" in line), "?"),
        "tailscaled": command_output([str(bench.bin_dir / "tailscaled"), "--version"]).splitlines()[0],
        **({"tailscaled (trimmed)": f"{(bench.args.trimmed_bin_dir / 'tailscaled').stat().st_size / 1e6:.1f} MB "
                                    f"(stock {(bench.bin_dir / 'tailscaled').stat().st_size / 1e6:.1f} MB), built "
                                    "from nixos/tailscale-features.txt"}
           if bench.args.trimmed_bin_dir else {}),
        "headscale": command_output([str(bench.bin_dir / "headscale"), "version"]).splitlines()[0],
        "nginx": command_output(["nginx", "-v"]),
        "wrk": command_output(["wrk", "-v"]).splitlines()[0],
        "curl": command_output(["curl", "--version"]).splitlines()[0],
    }


def write_results(result: dict[str, Any], machine: dict[str, str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**result, "machine": machine}, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(result, machine))
    (out / "machine.md").write_text("# Machine\n\n| | |\n| --- | --- |\n" +
                                    "\n".join(f"| {key} | {value} |" for key, value in machine.items()) + "\n")
    plot(result, out / "plot.png")


def main() -> int:
    janitor.start()  # every process and namespace of the bench is gone when it ends, however it ends
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", type=Path, required=True, help="directory with tailscaled, tailscale, headscale")
    parser.add_argument("--trimmed-bin-dir", type=Path, default=None,
                        help="directory with the trimmed tailscaled and tailscale (scripts/tailnet-binaries trimmed); "
                             "without it there is no tsnsrv-trimmed candidate")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter runs, one round (< 3 minutes)")
    parser.add_argument("--go-tsnsrv", type=Path, default=None,
                        help=f"the Go tsnsrv binary (default: {GO_TSNSRV_CACHED}, built by bench/build-go-tsnsrv)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: bench/results, or bench/results/quick with --quick)")
    parser.add_argument("--profile", action="store_true",
                        help="also record py-spy profiles of our tsnsrv (needs py-spy in the venv)")
    parser.add_argument("--profile-target", choices=("tsnsrv", "tsnsrv-trimmed", "variant"), default="tsnsrv",
                        help="which of ours to profile with --profile")
    parser.add_argument("--tsnsrv-arg", action="append", metavar="ARG",
                        help="extra argument for our tsnsrv, repeatable (to compare settings)")
    parser.add_argument("--variant-env", action="append", metavar="KEY=VALUE",
                        help="add a candidate: ours with this environment variable, repeatable")
    parser.add_argument("--variant-arg", action="append", metavar="ARG",
                        help="add a candidate: ours with this extra argument, repeatable")
    parser.add_argument("--variant-of", choices=("tsnsrv", "tsnsrv-trimmed"), default="tsnsrv",
                        help="what the variant changes: ours (default) or ours on the trimmed tailscaled "
                             "(e.g. --variant-of tsnsrv-trimmed --variant-env GOMEMLIMIT=32MiB)")
    parser.add_argument("--assertions", action="store_true",
                        help="also measure ours with identity assertions on, unbound and bound (small GETs only)")
    parser.add_argument("--rounds", type=int, help="rounds of small GETs (overrides the mode's)")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (overrides the mode's)")
    parser.add_argument("--skip-transfers", action="store_true", help="no big downloads/uploads (for A/B runs)")
    parser.add_argument("--skip-startup", action="store_true", help="no start-up timing rounds (for A/B runs)")
    parser.add_argument("--skip-ten", action="store_true", help="no ten-services rounds (for A/B runs)")
    parser.add_argument("--skip-trimmed", action="store_true", help="no tsnsrv-trimmed candidate (for A/B runs)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory (logs) afterwards")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (a network namespace and a kernel-TUN client device)", file=sys.stderr)
        return 1
    if args.out is None:
        args.out = REPO / "bench" / "results" / ("quick" if args.quick else "")
    if args.go_tsnsrv is None:
        args.go_tsnsrv = GO_TSNSRV_CACHED
    if args.variant_of == "tsnsrv-trimmed" and args.trimmed_bin_dir is None:
        print("bench: --variant-of tsnsrv-trimmed needs --trimmed-bin-dir (bench/run passes it)", file=sys.stderr)
        return 1
    if not args.go_tsnsrv.exists():
        print(f"bench: no Go tsnsrv at {args.go_tsnsrv}. Build it with bench/build-go-tsnsrv "
              "(go install from the module proxy, else from a source checkout), or pass --go-tsnsrv PATH.",
              file=sys.stderr)
        return 1
    for tool in ("wrk", "nginx", "curl"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing; run scripts/bootstrap", file=sys.stderr)
            return 1
    ensure_tailscaled_test_user()

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    bench = Bench(args)
    print(f"bench: work directory {bench.work}", flush=True)
    try:
        result = bench.run()
        machine = machine_description(bench)
        write_results(result, machine, args.out)
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    except Exception:
        args.keep_work = True
        print(f"bench: failed; logs kept in {bench.work}", file=sys.stderr)
        raise
    finally:
        bench.teardown()
    print((args.out / "results.md").read_text())
    print(f"bench: results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
