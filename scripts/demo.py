"""The demo behind scripts/demo: a whole tailnet on this machine, offline.

Uses the test harness (tests/harness): headscale as the control server, alice's
laptop as a client device in its own network namespace, a sample upstream, and the
real `tsnsrv` command exposing that upstream as the tailnet machine "hello".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness import janitor  # noqa: E402
from harness.headscale import ALLOW_ALL_POLICY, Headscale  # noqa: E402
from harness.tailnet import ClientDevice, NetworkNamespace, TailscaleNode  # noqa: E402
from harness.tsnsrv import Tsnsrv, ensure_tailscaled_test_user, tsnsrv_command  # noqa: E402
from harness.upstream import Upstream, echo  # noqa: E402


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def free_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bin_dir", type=Path, help="directory with tailscaled, tailscale and headscale")
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the demo needs root: it creates a network namespace for the client device", file=sys.stderr)
        return 1
    ensure_tailscaled_test_user()
    janitor.start()  # everything below is gone when the demo ends, however it ends
    work = Path(tempfile.mkdtemp(prefix="tsnsrv-demo-", dir="/var/tmp"))
    work.chmod(0o711)
    netns = NetworkNamespace(f"tsndemo{os.getpid() % 10000}", "198.18.250.1", "198.18.250.2").create()
    stack = []  # how to stop what was started, in order
    try:
        say("Starting headscale, the tailnet's control server, on 198.18.250.1")
        headscale = Headscale(args.bin_dir / "headscale", work / "headscale", netns.host_ip,
                              free_port(netns.host_ip), free_port(netns.host_ip, socket.SOCK_DGRAM))
        headscale.write_config(ALLOW_ALL_POLICY)
        headscale.start()
        stack.append(headscale.close)
        headscale.relay_into(netns)

        say("Joining alice's laptop (a kernel-TUN tailscaled in network namespace "
            f"{netns.name}) to the tailnet")
        laptop_node = TailscaleNode("laptop", args.bin_dir, work / "laptop", netns).start()
        stack.append(laptop_node.stop)
        laptop_node.up(headscale.url, headscale.auth_key("alice"))
        laptop = ClientDevice(laptop_node)

        say("Starting a sample upstream web service on 127.0.0.1 (it echoes what it receives)")
        upstream = Upstream().start()
        stack.append(upstream.stop)

        service = Tsnsrv("hello", upstream.url, work / "hello", args.bin_dir, headscale, headscale.auth_key("alice"))
        say("Running: " + " ".join(service.argv).replace(tsnsrv_command(), "tsnsrv"))
        service.start(clients=[laptop_node])
        stack.append(service.stop)
        health = service.health()
        print(f"hello is on the tailnet as {health['node']['dnsName']} ({service.ip}); "
              f"tailscaled's loopback guard: {health['tailscaled']['loopbackGuard']}")

        say(f"From the laptop: curl http://{service.ip}/greeting?from=demo")
        result = laptop.curl(f"http://{service.ip}/greeting?from=demo")
        if result.returncode != 0:
            print(result.stderr.decode(), file=sys.stderr)
            return 1
        seen = echo(result.stdout)
        print(json.dumps({key: seen[key] for key in ("method", "path", "query")}, indent=2))
        print("identity headers the upstream received:")
        for name, value in seen["headers"]:
            if name.lower().startswith("x-tailscale-"):
                print(f"  {name}: {value}")

        say("tsnsrv status")
        subprocess.run([tsnsrv_command(), "status", "--socket", str(service.control_socket)])
        if args.keep:
            say(f"Everything keeps running; try: ip netns exec {netns.name} curl http://{service.ip}/ "
                "(Ctrl-C to stop)")
            try:
                service.process.wait(timeout=None)
            except KeyboardInterrupt:
                pass
        say("Demo done: the answer above came over the tailnet, through tsnsrv")
        return 0
    finally:
        for stop in reversed(stack):
            stop()
        netns.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
