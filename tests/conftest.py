"""Fixtures shared by every suite: a real offline tailnet on this machine.

Session-wide: the pinned binaries, a headscale control server, a client device
(alice's laptop: a kernel-TUN tailscaled in its own network namespace) and an
upstream web service. Per test: `tsnsrv` services started as a user would start them.
When a test fails, the logs of every process it started are attached to its report.

The services' own tailscaleds run the build that `--tailscale-build` (or
$TSNSRV_TAILSCALE_BUILD) names: `stock` (the default) or `trimmed`
(docs/trimmed-tailscaled.md); headscale and the client devices always run the stock one.
Tests marked `node` prove something of the service's own tailscaled, so CI runs them on
both builds (scripts/test).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import janitor
from harness.binaries import BUILD_ARGS, BUILD_ENV, BUILDS, BuildFailed, built_by
from harness.certtailnet import CertTailnet
from harness.headscale import Headscale, start_headscale
from harness.pebble import Pebble
from harness.processes import STARTED, free_port
from harness.tailnet import ClientDevice, NetworkNamespace, SocksClient, TailscaleNode
from harness.tsnsrv import Tsnsrv, ensure_tailscaled_test_user
from harness.upstream import Upstream


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--tailscale-build", choices=BUILDS, default=os.environ.get(BUILD_ENV) or "stock",
                     help=f"the tailscale build of the services' own tailscaleds (default: ${BUILD_ENV} or stock)")


def pytest_configure(config: pytest.Config) -> None:
    build = config.getoption("--tailscale-build")
    if build not in BUILDS:  # from the environment, which argparse does not check
        raise pytest.UsageError(f"{BUILD_ENV}={build!r}: the tailscale build is one of {', '.join(BUILDS)}")
    janitor.start()  # whatever the harness starts is gone when this run ends, even if it is killed


def pytest_report_header(config: pytest.Config) -> str:
    return f"tailscale build of the services' nodes: {config.getoption('--tailscale-build')}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
        if "/systemd/" in str(item.fspath):
            item.add_marker(pytest.mark.systemd)
        if "/oci/" in str(item.fspath):
            item.add_marker(pytest.mark.oci)
        if "/soak/" in str(item.fspath):
            item.add_marker(pytest.mark.soak)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("setup", "call"):
        first = getattr(item, "_first_process", 0)
        shown = STARTED[first:] or STARTED[-3:]
        for process in shown:
            report.sections.append((f"log of {process.name} ({process.log_path})", process.log_tail(80)))


@pytest.fixture(autouse=True)
def _note_processes(request: pytest.FixtureRequest) -> None:
    request.node._first_process = len(STARTED)


def _built_by(script: str, what: str, *args: str) -> Path:
    """The cache directory a build script of scripts/ prints (it builds only once)."""
    try:
        return built_by(script, *args)
    except BuildFailed as exc:
        pytest.fail(f"could not build {what}: {exc}")


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """headscale and the stock tailscaled/tailscale, for the control server and the clients."""
    return _built_by("tailnet-binaries", "the tailnet binaries")


@pytest.fixture(scope="session")
def node_bin_dir(request: pytest.FixtureRequest) -> Path:
    """tailscaled and tailscale of the build the services' own nodes run (--tailscale-build)."""
    build = request.config.getoption("--tailscale-build")
    return _built_by("tailnet-binaries", f"the {build} tailscale", *BUILD_ARGS[build])


@pytest.fixture(scope="session")
def cert_bin_dir() -> Path:
    """pebble and the patched headscale of the certificate tailnet."""
    return _built_by("cert-test-binaries", "pebble and the patched headscale")


@pytest.fixture(scope="session")
def tailscaled_user() -> str | None:
    """Root runs tsnsrv with --tailscaled-user; make sure that account exists."""
    if os.geteuid() != 0:
        return None
    return ensure_tailscaled_test_user()


@pytest.fixture(scope="session")
def netns() -> Iterator[NetworkNamespace]:
    if os.geteuid() != 0:
        pytest.fail("the end-to-end suites need root (network namespaces, a kernel TUN client device)")
    block = os.getpid() % 250 + 1
    namespace = NetworkNamespace(f"tsn{os.getpid()}", f"198.18.{block}.1", f"198.18.{block}.2").create()
    yield namespace
    namespace.destroy()


@pytest.fixture(scope="session")
def headscale(bin_dir: Path, netns: NetworkNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Headscale]:
    server = start_headscale(bin_dir, netns.host_ip, tmp_path_factory.mktemp("headscale"))
    yield server
    server.close()


@pytest.fixture
def private_tailnet(bin_dir: Path, node_bin_dir: Path, netns: NetworkNamespace,
                    tmp_path_factory: pytest.TempPathFactory, service_root: Path,
                    tailscaled_user: str | None) -> Iterator[TsnsrvFactory]:
    """A second headscale, for tests that would disturb the shared one, with a factory for its services."""
    server = start_headscale(bin_dir, netns.host_ip, tmp_path_factory.mktemp("private-headscale"))
    factory = TsnsrvFactory(node_bin_dir, server, service_root, clients=[])
    yield factory
    factory.stop_all()
    server.close()


@pytest.fixture(scope="session")
def laptop(bin_dir: Path, netns: NetworkNamespace, headscale: Headscale,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientDevice]:
    """Alice's laptop: what tests use to reach services over the tailnet."""
    headscale.relay_into(netns)
    node = TailscaleNode("laptop", bin_dir, tmp_path_factory.mktemp("laptop"), netns).start()
    node.up(headscale.url, headscale.auth_key("alice"))
    yield ClientDevice(node)
    node.stop()


def _socks_client(name: str, bin_dir: Path, headscale: Headscale, workdir: Path, auth_key: str) -> TailscaleNode:
    node = TailscaleNode(name, bin_dir, workdir, socks5_port=free_port()).start()
    return node.up(headscale.url, auth_key)


@pytest.fixture(scope="session")
def bob_phone(bin_dir: Path, headscale: Headscale, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocksClient]:
    """Bob's phone: a second user's device (through its tailscaled's SOCKS5 proxy)."""
    node = _socks_client("phone", bin_dir, headscale, tmp_path_factory.mktemp("phone"), headscale.auth_key("bob"))
    yield SocksClient(node)
    node.stop()


@pytest.fixture(scope="session")
def ci_runner(bin_dir: Path, headscale: Headscale, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SocksClient]:
    """A tagged machine (tag:ci) that belongs to no user."""
    key = headscale.auth_key(tags=["tag:ci"])
    node = _socks_client("ci-runner", bin_dir, headscale, tmp_path_factory.mktemp("ci"), key)
    yield SocksClient(node)
    node.stop()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    server = Upstream(unix_socket=tmp_path_factory.mktemp("upstream") / "upstream.sock").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_root(tailscaled_user: str | None) -> Path:
    """Where services keep state: pytest's own temp tree is private to root, and the
    tailscaled of a service runs as the unprivileged test user."""
    root = Path(tempfile.mkdtemp(prefix="tsnsrv-e2e-", dir="/var/tmp"))
    root.chmod(0o711)
    return root


@pytest.fixture
def service_dir(service_root: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory for one service of this test."""
    path = Path(tempfile.mkdtemp(prefix=f"{request.node.name[:40]}-", dir=service_root))
    path.chmod(0o711)
    return path


class TsnsrvFactory:
    """Starts `tsnsrv` services: factory("name", upstream_url, *flags, auth_key=..., start=True).

    `node_bin_dir` holds the tailscaled the services spawn."""

    def __init__(self, node_bin_dir: Path, headscale: Headscale, service_root: Path, clients: list[TailscaleNode]):
        self.node_bin_dir, self.headscale, self.service_root = node_bin_dir, headscale, service_root
        self.clients = clients
        self.started: list[Tsnsrv] = []

    def __call__(self, name: str, upstream_url: str, *flags: str, auth_key: str | None = "alice", start: bool = True,
                 workdir: Path | None = None, plaintext: bool = True, env: dict[str, str] | None = None,
                 node_bin_dir: Path | None = None, **options: Any) -> Tsnsrv:
        """`node_bin_dir` replaces the run's tailscale build for this one; `options` go to
        Tsnsrv (login_server, command_prefix)."""
        key = self.headscale.auth_key(auth_key) if auth_key in ("alice", "bob") else auth_key
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.service_root))
            workdir.chmod(0o711)
        service = Tsnsrv(name, upstream_url, workdir, node_bin_dir or self.node_bin_dir, self.headscale, key,
                         list(flags), env=env, plaintext=plaintext, **options)
        self.started.append(service)
        if start:
            service.start(clients=self.clients)
        return service

    def stop_all(self) -> None:
        for service in self.started:
            service.stop()


@pytest.fixture(scope="session")
def clients(laptop: ClientDevice, bob_phone: SocksClient, ci_runner: SocksClient) -> list[TailscaleNode]:
    """Every client device is on the tailnet before any service starts, so that a
    service counts as started only once all of them can reach it."""
    return [laptop.node, bob_phone.node, ci_runner.node]


@pytest.fixture
def make_tsnsrv(node_bin_dir: Path, headscale: Headscale, tailscaled_user: str | None, service_root: Path,
                clients: list[TailscaleNode]) -> Iterator[TsnsrvFactory]:
    factory = TsnsrvFactory(node_bin_dir, headscale, service_root, clients)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def module_tsnsrv(node_bin_dir: Path, headscale: Headscale, tailscaled_user: str | None, service_root: Path,
                  clients: list[TailscaleNode]) -> Iterator[TsnsrvFactory]:
    """Like make_tsnsrv, for services that every test of a module shares."""
    factory = TsnsrvFactory(node_bin_dir, headscale, service_root, clients)
    yield factory
    factory.stop_all()


# --- the certificate tailnet: real HTTPS certificates and Funnel (harness/certtailnet.py) ---


@pytest.fixture(scope="session")
def cert_tailnet(bin_dir: Path, cert_bin_dir: Path, node_bin_dir: Path, service_root: Path,
                 tailscaled_user: str | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CertTailnet]:
    if os.geteuid() != 0:
        pytest.fail("the certificate tailnet needs root (network namespaces, a resolver on port 53)")
    shared = service_root / "cert-tailnet"
    shared.mkdir(mode=0o755)
    tailnet = CertTailnet(bin_dir, cert_bin_dir, node_bin_dir, tmp_path_factory.mktemp("cert-tailnet"), shared)
    try:
        yield tailnet.start()
    finally:
        tailnet.close()


@pytest.fixture
def cert_tsnsrv(node_bin_dir: Path, cert_tailnet: CertTailnet, service_root: Path,
                tailscaled_user: str | None) -> Iterator[Any]:
    """Starts `tsnsrv` with HTTPS on the certificate tailnet: cert_tsnsrv("name", upstream_url, *flags,
    pebble=None (the session's CA), auth_key="alice" (or a key), start=True, ...)."""
    assert cert_tailnet.headscale is not None and cert_tailnet.laptop is not None
    factory = TsnsrvFactory(node_bin_dir, cert_tailnet.headscale, service_root, [cert_tailnet.laptop.node])

    def make(name: str, upstream_url: str, *flags: str, pebble: Pebble | None = None, **options: Any) -> Tsnsrv:
        return factory(name, upstream_url, *flags, plaintext=False, **cert_tailnet.service_options(pebble),
                       **options)
    yield make
    factory.stop_all()
