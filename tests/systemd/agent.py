#!/usr/bin/python3
"""Command agent of the systemd test tier, run inside the guest by systemd.

Reads one JSON request per line from the virtio serial port named by its argument,
{"id": N, "command": "shell text", "timeout": seconds}, runs the command with bash as
root, and answers {"id": N, "status": exit status, "stdout": ..., "stderr": ...}. The
host side is tests/systemd/guest.py. Nothing but that port can reach it.
"""

import glob
import json
import os
import subprocess
import sys
import time


def port_device(name: str) -> str:
    """/dev/vportNpM of the virtio serial port called `name` (udev may not link it yet)."""
    while True:
        for entry in glob.glob("/sys/class/virtio-ports/*/name"):
            with open(entry) as f:
                if f.read().strip() == name:
                    return "/dev/" + entry.split("/")[-2]
        time.sleep(0.2)


def main(name: str) -> None:
    port = os.open(port_device(name), os.O_RDWR)  # a virtio port opens once: one fd both ways
    os.write(port, b'{"ready": true}\n')
    buffer = b""
    while True:
        chunk = os.read(port, 65536)
        if not chunk:  # the host side is not connected (yet, or any more)
            time.sleep(0.2)
            continue
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                answer = json.dumps(run(json.loads(line))).encode() + b"\n"
                while answer:
                    answer = answer[os.write(port, answer):]


def run(request: dict) -> dict:
    try:
        done = subprocess.run(["bash", "-c", request["command"]], capture_output=True,
                              timeout=request.get("timeout") or None, stdin=subprocess.DEVNULL)
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        status, stdout, stderr = 124, exc.stdout or b"", (exc.stderr or b"") + b"\n(timed out)"
    return {"id": request.get("id"), "status": status, "stdout": stdout.decode(errors="replace"),
            "stderr": stderr.decode(errors="replace")}


if __name__ == "__main__":
    main(sys.argv[1])
