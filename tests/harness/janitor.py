"""Clean up after a test run, the demo or the bench even when it is killed (SIGKILL too).

`start()` runs a janitor process in a session of its own, reading from a pipe that only
the run holds: every process group and network namespace the harness creates is written
there as it is made, and commands that undo what no process holds (removing a container).
When the pipe closes (the run ended, however it ended), the janitor runs those commands,
kills whatever of those process groups is still alive (checking each one's start time, so
a reused pid is never hit) and deletes the namespaces and veth links still there.

    python -m harness.janitor     (started by start(); reads its pipe on stdin)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_pipe: int | None = None


def start() -> None:
    """Start the janitor for this process (once); later registrations go to it."""
    global _pipe
    if _pipe is not None:
        return
    read, write = os.pipe()
    subprocess.Popen([sys.executable, "-m", "harness.janitor"], stdin=read, start_new_session=True,
                     cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(read)
    _pipe = write


def _tell(line: str) -> None:
    if _pipe is not None:
        os.write(_pipe, (line + "\n").encode())


def process_group(pid: int) -> None:
    """A process that leads its own process group (start_new_session)."""
    _tell(f"group {pid} {_start_time(pid)}")


def namespace(name: str, host_link: str) -> None:
    _tell(f"netns {name} {host_link}")


def command(argv: list[str]) -> None:
    """A command that undoes something not held by a process group (a container)."""
    _tell("command " + json.dumps(argv))


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _ours(pid: int, started: str) -> bool:
    """Whether process group `pid` can only be ours: its leader is the one we saw start, or
    has exited (a pid is not reused while its process group has members)."""
    return _start_time(pid) in (started, "?")


def _signal_groups(groups: list[tuple[int, str]], sig: int) -> bool:
    """Send `sig` to each of our groups that still has members; whether any had."""
    any_left = False
    for pid, started in groups:
        if _ours(pid, started):
            try:
                os.killpg(pid, sig)
                any_left = True
            except (ProcessLookupError, PermissionError):
                pass
    return any_left


def _clean(groups: list[tuple[int, str]], namespaces: list[tuple[str, str]], commands: list[list[str]]) -> None:
    for argv in commands:
        subprocess.run(argv, capture_output=True, timeout=60)
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while _signal_groups(groups, 0) and time.monotonic() < deadline:  # signal 0: is anyone left?
        time.sleep(0.2)
    _signal_groups(groups, signal.SIGKILL)
    for name, link in namespaces:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the run is not for the janitor
    groups: list[tuple[int, str]] = []
    namespaces: list[tuple[str, str]] = []
    commands: list[list[str]] = []
    for line in sys.stdin:
        kind, _, rest = line.partition(" ")
        fields = rest.split()
        if kind == "group":
            groups.append((int(fields[0]), fields[1]))
        elif kind == "netns":
            namespaces.append((fields[0], fields[1]))
        elif kind == "command":
            commands.append(json.loads(rest))
    _clean(groups, namespaces, commands)


if __name__ == "__main__":
    main()
