"""A run that is killed outright (SIGKILL, no teardown) leaves nothing behind: the harness's
janitor (harness/janitor.py) stops headscale, the client device's tailscaled, tsnsrv and its
tailscaled, and deletes the client's network namespace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from harness.processes import wait_for

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def namespace_exists(name: str) -> bool:
    return name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


def test_a_killed_run_leaves_no_process_or_namespace_behind(tmp_path):
    report = tmp_path / "report.json"
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/e2e/killed_run.py"], cwd=REPO, env={**os.environ, "KILLED_RUN_REPORT": str(report)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        started = wait_for(lambda: report.exists() and json.loads(report.read_text()), 180,
                           "the doomed run to bring up its tailnet")
        assert all(alive(pid) for pid in started["pids"]) and len(started["pids"]) >= 5, started
        assert namespace_exists(started["netns"])

        run.send_signal(signal.SIGKILL)
        run.wait(10)

        wait_for(lambda: not any(alive(pid) for pid in started["pids"]), 30, "every process of the killed run to end")
        wait_for(lambda: not namespace_exists(started["netns"]), 10, "the killed run's namespace to go")
        assert started["link"] not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
