"""Real upstream routing stacks (Node with Express and with its URL parser, Go net/http,
Python aiohttp, Django REST framework with format suffixes, Java/Tomcat),
each serving the same four areas under /api, so tests can see which area a request
spelling really reaches on each, with the stack's own router deciding.

The sources are in ./routing; builds (npm install, go build, the Tomcat jars from Maven
Central, javac) are cached outside the repository, keyed by the sources' hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from .processes import ManagedProcess, free_port, wait_until_listening

SOURCES = Path(__file__).with_name("routing")
STACKS = ("express", "node-url", "go", "python", "drf", "tomcat")
AREAS = ("admin", "secret", "ops", "public")

TOMCAT_VERSION = "11.0.27"
TOMCAT_JARS = {  # Maven Central path -> sha256, pinned
    f"org/apache/tomcat/embed/tomcat-embed-core/{TOMCAT_VERSION}/tomcat-embed-core-{TOMCAT_VERSION}.jar":
        "b71785ff101c0df501064b3e3b8c4a02e4f9cc3047a7fa686c41fc4edc2f0cb4",
    f"org/apache/tomcat/tomcat-annotations-api/{TOMCAT_VERSION}/tomcat-annotations-api-{TOMCAT_VERSION}.jar":
        "34e004c54a23b8486a8f0c1541a31594afab12f85fbc84243a3271c4ce1b420b",
}
MAVEN_CENTRAL = "https://repo.maven.apache.org/maven2/"


def dev_cache() -> Path:
    """The cache scripts/bootstrap uses (root's, or the user's)."""
    if os.environ.get("TSNSRV_DEV_CACHE"):
        return Path(os.environ["TSNSRV_DEV_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/tsnsrv-dev")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tsnsrv-dev"


def _build_dir() -> Path:
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return dev_cache() / f"routing-stacks-{digest.hexdigest()[:16]}"


def run_build_step(argv: list[str], cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed in {cwd}:\n{result.stdout}{result.stderr}")


def require_tool(tool: str, stack: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise RuntimeError(f"the {stack} routing stack needs {tool} on $PATH")
    return found


def _build(stack: str, out: Path) -> None:
    if stack == "express":
        for name in ("package.json", "package-lock.json", "server.js"):
            shutil.copy(SOURCES / name, out)
        run_build_step([require_tool("npm", stack), "ci", "--no-audit", "--no-fund", "--omit=dev"], out)
    elif stack == "go":
        run_build_step([require_tool("go", stack), "build", "-o", str(out / "server"), "."], SOURCES)
    elif stack == "tomcat":
        for path, sha256 in TOMCAT_JARS.items():
            with urllib.request.urlopen(MAVEN_CENTRAL + path, timeout=120) as response:
                data = response.read()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise RuntimeError(f"{path} from Maven Central does not have the pinned sha256")
            (out / Path(path).name).write_bytes(data)
        run_build_step([require_tool("javac", stack), "-d", str(out), "-cp", str(out / "*"),
                        str(SOURCES / "RoutingServer.java")], out)


def stack_argv(stack: str, port: int) -> list[str]:
    """The command that serves `stack` on 127.0.0.1:port, built first if needed."""
    if stack == "python":
        return [sys.executable, str(SOURCES / "server.py"), str(port)]
    if stack == "drf":  # Django and DRF are test dependencies (python/pyproject.toml)
        return [sys.executable, str(SOURCES / "server_drf.py"), str(port)]
    if stack == "node-url":
        return [require_tool("node", stack), str(SOURCES / "url-server.js"), str(port)]
    out = _build_dir() / stack
    if not (out / ".built").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        _build(stack, out)
        (out / ".built").touch()
    if stack == "express":
        return [require_tool("node", stack), str(out / "server.js"), str(port)]
    if stack == "go":
        return [str(out / "server"), str(port)]
    return [require_tool("java", stack), "-cp", f"{out}:{out}/*", "RoutingServer", str(port)]


class RoutingUpstream:
    """One routing stack serving on a loopback port."""

    def __init__(self, stack: str, workdir: Path):
        self.stack = stack
        self.port = free_port()
        self.process = ManagedProcess(f"routing-{stack}", stack_argv(stack, self.port), workdir / f"{stack}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RoutingUpstream:
        self.process.start()
        wait_until_listening(self.process, self.port, f"the {self.stack} upstream")
        return self

    def stop(self) -> None:
        self.process.stop()
