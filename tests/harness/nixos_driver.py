"""The NixOS test driver's machine methods that nixos/tests/scenarios.nix uses, over the
systemd tier's machines: the guest (`server`), and on this host the headscale and the
client device (`headscale`, `client`). Semantics follow nixos/lib/test-driver's Machine:
`execute` gives (status, stdout), `succeed` fails on a non-zero status, `wait_*` poll
once a second until their timeout.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence

from .vm import Guest

DEFAULT_TIMEOUT = 900


class ScenarioFailure(AssertionError):
    pass


class Machine:
    def __init__(self, name: str):
        self.name = name

    def execute(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str]:
        raise NotImplementedError

    def succeed(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        status, out = self.execute(command, timeout)
        if status != 0:
            raise ScenarioFailure(f"{self.name}: command failed with {status}: {command.strip()[:400]}\n{out[-3000:]}")
        return out

    def fail(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        status, out = self.execute(command, timeout)
        if status == 0:
            raise ScenarioFailure(f"{self.name}: command succeeded but should have failed: {command.strip()[:400]}")
        return out

    def _poll(self, check: Callable[[], tuple[bool, str]], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            done, detail = check()
            if done:
                return detail
            if time.monotonic() > deadline:
                raise ScenarioFailure(f"{self.name}: timed out after {timeout:g}s waiting for {what}\n{detail[-3000:]}")
            time.sleep(1)

    def wait_until_succeeds(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        def check() -> tuple[bool, str]:
            status, out = self.execute(command, timeout=min(timeout, 120))
            return status == 0, out
        return self._poll(check, timeout, f"`{command.strip()[:200]}` to succeed")

    def wait_until_fails(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> str:
        def check() -> tuple[bool, str]:
            status, out = self.execute(command, timeout=min(timeout, 120))
            return status != 0, out
        return self._poll(check, timeout, f"`{command.strip()[:200]}` to fail")

    def systemctl(self, query: str) -> tuple[int, str]:
        return self.execute(f"systemctl {query}")

    def wait_for_unit(self, unit: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        def check() -> tuple[bool, str]:
            state = self.execute(f"systemctl show -P ActiveState {unit}")[1].strip()
            if state == "failed":
                raise ScenarioFailure(f"{self.name}: unit {unit} failed:\n"
                                      f"{self.execute(f'journalctl -u {unit} -n 40 --no-pager')[1]}")
            if state == "inactive":
                jobs = self.execute(f"systemctl list-jobs --full --no-legend {unit}")[1].strip()
                if not jobs:
                    raise ScenarioFailure(f"{self.name}: unit {unit} is inactive and there are no pending jobs")
            return state == "active", state
        self._poll(check, timeout, f"unit {unit} to be active")

    def wait_for_open_port(self, port: int, address: str = "localhost", timeout: float = DEFAULT_TIMEOUT) -> None:
        self.wait_until_succeeds(f"bash -c '</dev/tcp/{address}/{port}'", timeout)


class GuestMachine(Machine):
    """The QEMU guest, through its agent."""

    def __init__(self, name: str, guest: Guest):
        super().__init__(name)
        self.guest = guest

    def execute(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str]:
        status, out, err = self.guest.execute(command, timeout)
        if err.strip():
            print(f"[{self.name}] {err.rstrip()[-2000:]}")
        return status, out


class HostMachine(Machine):
    """Commands on this host, optionally inside a network namespace, with `bin_dir` first
    on PATH (wrappers that point the tailscale and headscale CLIs at this run's daemons)."""

    def __init__(self, name: str, bin_dir: str, netns_prefix: Sequence[str] = (), unit_checks: dict | None = None):
        super().__init__(name)
        self.bin_dir = bin_dir
        self.prefix = list(netns_prefix)
        self.unit_checks = unit_checks or {}

    def execute(self, command: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str]:
        argv = [*self.prefix, "env", f"PATH={self.bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "bash", "-c", command]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, ""
        if done.stderr.strip():
            print(f"[{self.name}] {done.stderr.rstrip()[-2000:]}")
        return done.returncode, done.stdout

    def wait_for_unit(self, unit: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """The host runs no systemd: a unit stands for one of this run's processes."""
        check = self.unit_checks.get(unit)
        if check is None:
            raise ScenarioFailure(f"{self.name}: no unit {unit} here")
        self._poll(lambda: (check(), ""), timeout, f"{unit} on {self.name}")


class Subtests:
    """The driver's `subtest(name)`: timed, and each one reported."""

    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        print(f"subtest: {name}", flush=True)
        try:
            yield
        except Exception:
            print(f"subtest FAILED after {time.monotonic() - started:.1f}s: {name}", flush=True)
            raise
        self.done.append((name, time.monotonic() - started))
        print(f"subtest passed in {self.done[-1][1]:.1f}s: {name}", flush=True)
