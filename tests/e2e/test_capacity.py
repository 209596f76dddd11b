"""The hard numbers: 1 GiB each way byte-exact with bounded proxy memory, and a thousand
idle websockets held for a minute. The figures are printed (run with -s to see them);
only correctness and the memory bound are asserted, never wall-clock time."""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
import threading
import time

import pytest

from harness.upstream import PATTERN, pattern_sha256

pytestmark = pytest.mark.slow

GIB = 1 << 30
RSS_GROWTH_LIMIT = 32 << 20


class PeakRSS:
    """Samples a process's resident set every 100 ms while a transfer runs."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for pid {self.pid}")

    def _sample(self) -> None:
        while not self._done.wait(0.1):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


@pytest.fixture(scope="module")
def bulk(module_tsnsrv, upstream):
    return module_tsnsrv("bulk", upstream.url)


def test_one_gib_download_is_byte_exact_with_bounded_memory(bulk, laptop):
    started = time.monotonic()
    with PeakRSS(bulk.health()["pid"]) as rss:
        result = laptop.run(["sh", "-c", f"curl -sS --max-time 600 http://{bulk.ip}/bytes/{GIB} | sha256sum"],
                            timeout=660)
    seconds = time.monotonic() - started
    print(f"\n1 GiB download: {GIB / seconds / 1e6:.0f} MB/s, proxy RSS {rss.start >> 20} MiB "
          f"-> peak {rss.peak >> 20} MiB (+{rss.growth / (1 << 20):.1f} MiB)")
    assert result.stdout.split()[0].decode() == pattern_sha256(GIB)
    assert rss.growth < RSS_GROWTH_LIMIT


UPLOAD = """
import sys
pattern = bytes(range(256)) * 4096
for _ in range(int(sys.argv[1]) // len(pattern)):
    sys.stdout.buffer.write(pattern)
"""


def test_one_gib_upload_is_byte_exact_with_bounded_memory(bulk, laptop):
    expected = hashlib.sha256()
    for _ in range(GIB // len(PATTERN)):
        expected.update(PATTERN)
    started = time.monotonic()
    with PeakRSS(bulk.health()["pid"]) as rss:
        result = laptop.run(["sh", "-c", f"{sys.executable} -c '{UPLOAD}' {GIB} | curl -sS --max-time 600 "
                                         f"-H 'Content-Type: application/octet-stream' -T - http://{bulk.ip}/upload"],
                            timeout=660)
    seconds = time.monotonic() - started
    print(f"\n1 GiB upload: {GIB / seconds / 1e6:.0f} MB/s, proxy RSS {rss.start >> 20} MiB "
          f"-> peak {rss.peak >> 20} MiB (+{rss.growth / (1 << 20):.1f} MiB)")
    answer = json.loads(result.stdout)
    assert answer == {"length": GIB, "sha256": expected.hexdigest()}
    assert rss.growth < RSS_GROWTH_LIMIT


IDLE_WEBSOCKETS = """
import asyncio, resource, sys, time, websockets
url, count, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (count * 2 + 100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
async def main():
    sockets = []
    for start in range(0, count, 100):  # open in batches, like a busy morning
        sockets += await asyncio.gather(*(websockets.connect(url, ping_interval=None, open_timeout=60)
                                          for _ in range(start, min(count, start + 100))))
    opened = time.monotonic()
    print("open", len(sockets), flush=True)
    await asyncio.sleep(hold)
    alive = 0
    async def echo(index, ws):
        await ws.send(f"still here {index}")
        return await asyncio.wait_for(ws.recv(), 30) == f"still here {index}"
    results = await asyncio.gather(*(echo(i, ws) for i, ws in enumerate(sockets)), return_exceptions=True)
    alive = sum(1 for r in results if r is True)
    print("held", round(time.monotonic() - opened, 1), "alive", alive, flush=True)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
asyncio.run(main())
"""


def test_a_thousand_idle_websockets_are_held_for_a_minute(bulk, laptop, upstream):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))  # the upstream's side
    with PeakRSS(bulk.health()["pid"]) as rss:
        client = laptop.popen([sys.executable, "-c", IDLE_WEBSOCKETS, f"ws://{bulk.ip}/ws", "1000", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        opened = client.stdout.readline().strip()
        relayed = bulk.metric("tsnsrv_websocket_sessions_open")
        held_line, errors = client.communicate(timeout=400)
    print(f"\n{opened}, {relayed:.0f} relayed by the proxy; {held_line.strip()}; proxy RSS {rss.start >> 20} MiB "
          f"-> peak {rss.peak >> 20} MiB ({rss.growth / 1000 / 1024:.1f} KiB per connection)")
    assert opened == "open 1000", errors[-2000:]
    assert relayed == 1000
    _, held, _, alive = held_line.split()
    assert float(held) >= 60 and alive == "1000"
