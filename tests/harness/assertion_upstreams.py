"""Upstreams that trust only a verified identity assertion: the same small server in
three ecosystems, each verifying with that ecosystem's usual JOSE library (PyJWT from
PyPI, jose from npm, go-jose from the Go module proxy), all pinned (./assertion_verifiers:
package-lock.json, go.sum; PyJWT is tsnsrv's own pin).

Builds (npm ci, go build) are cached outside the repository, keyed by the sources' hash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .processes import ManagedProcess, free_port, wait_until_listening
from .routing_stacks import dev_cache, require_tool, run_build_step

SOURCES = Path(__file__).with_name("assertion_verifiers")
LANGUAGES = ("python", "node", "go")
HEADER = "X-Tailscale-Identity-Assertion"


def _build_dir() -> Path:
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return dev_cache() / f"assertion-verifiers-{digest.hexdigest()[:16]}"


def verifier_command(language: str) -> list[str]:
    """The verifier's command (built first if needed), to be followed by its arguments."""
    if language == "python":
        return [sys.executable, str(SOURCES / "verifier.py")]
    out = _build_dir() / language
    if not (out / ".built").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if language == "node":
            for name in ("package.json", "package-lock.json", "verifier.js"):
                shutil.copy(SOURCES / name, out)
            run_build_step([require_tool("npm", language), "ci", "--no-audit", "--no-fund", "--omit=dev"], out)
        else:
            run_build_step([require_tool("go", language), "build", "-o", str(out / "verifier"), "."], SOURCES)
        (out / ".built").touch()
    if language == "node":
        return [require_tool("node", language), str(out / "verifier.js")]
    return [str(out / "verifier")]


class VerifyingUpstream:
    """One verifier on a loopback port, trusting the keys in `jwks_file` for `audience` and `issuer`."""

    def __init__(self, language: str, workdir: Path, port: int | None = None):
        self.language = language
        self.workdir = workdir
        self.port = port or free_port()
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, jwks_file: Path, audience: str, issuer: str, bound: bool) -> VerifyingUpstream:
        argv = [*verifier_command(self.language), str(self.port), str(jwks_file), audience, issuer]
        self.process = ManagedProcess(f"verifier-{self.language}", argv + (["bound"] if bound else []),
                                      self.workdir / f"verifier-{self.language}.log").start()
        wait_until_listening(self.process, self.port, f"the {self.language} verifier")
        return self

    def call(self, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """A request straight to the verifier, as any local process can make one."""
        request = urllib.request.Request(self.url + path, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
