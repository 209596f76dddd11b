#!/usr/bin/python3
"""Command agent of the systemd test tier, run inside the guest by systemd.

Reads one JSON request per line from the virtio serial port given as its argument,
{"id": N, "command": "shell text", "timeout": seconds}, runs the command with bash as
root, and answers {"id": N, "status": exit status, "stdout": ..., "stderr": ...}. The
host side is tests/systemd/guest.py. Nothing but that port can reach it.
"""

import json
import subprocess
import sys
import time


def main(port: str) -> None:
    with open(port, "rb", buffering=0) as incoming, open(port, "wb", buffering=0) as outgoing:
        outgoing.write(b'{"ready": true}\n')
        buffer = b""
        while True:
            chunk = incoming.read(65536)
            if not chunk:  # the host side is not connected (yet, or any more)
                time.sleep(0.2)
                continue
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    outgoing.write(json.dumps(run(json.loads(line))).encode() + b"\n")


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
