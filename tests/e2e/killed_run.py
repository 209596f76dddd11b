"""Not a test of its own: the run that test_cleanup.py starts and then kills with SIGKILL.

It brings up what a real run has (headscale, the client device in its namespace, a tsnsrv
service with its tailscaled), writes their pids and the namespace to $KILLED_RUN_REPORT,
and waits to be killed.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from harness.processes import STARTED


def test_waits_to_be_killed(make_tsnsrv, upstream, laptop):
    service = make_tsnsrv("doomed", upstream.url)
    pids = [process.pid for process in STARTED if process.running] + [service.tailscaled_pid]
    report = {"pids": pids, "netns": laptop.netns.name, "link": laptop.netns.host_if}
    Path(os.environ["KILLED_RUN_REPORT"]).write_text(json.dumps(report))
    threading.Event().wait(600)  # until the parent kills this whole run
