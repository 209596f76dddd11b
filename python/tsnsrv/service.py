"""Running one service: start-up checks, the node's life, serving, recovery, shutdown.

Start-up order matters for readiness: the front listener is bound first (its port
goes into the Serve config and the loopback guard's allow-list), then tailscaled runs
and the node comes up, then the certificate loads, then Serve forwards the port, and
only then does the front listener accept and systemd hear READY=1.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import pwd
import resource
import shutil
import signal
import socket
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import logs, paths
from .cli import print_problems
from .auth import AuthKeyError, OAuthUnavailable, find_credential
from .config import ServiceConfig, option_name
from .confine import Endpoint, LoopbackPolicy, resolver_endpoints
from .control import ControlServer, Health
from .front import FrontListener, reserve_closed_port
from .identity import WhoisCache
from .localapi import LocalAPI, LocalAPIError, TailscaledUnreachable, daemon_credentials
from .metrics import Metrics
from .node import Node, NodeError
from .peercheck import PeerLookupError, TailscaledPeerCheck, unfinished_connections
from .proxy import Proxy
from .systemd import Notifier
from .tailscaled import SpawnedTailscaled, StateDirLock, TailscaledStartError
from .tlscerts import (CertificateError, CertificateKeeper, CertificateUnavailable, FileCertificates, LoadedCertificate,
                       TailscaleCertificates)

if TYPE_CHECKING:
    from .assertion import Asserter

log = logging.getLogger("tsnsrv")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
DELIVERY_GRACE_SECONDS = 5.0
LOGIN_WAIT_EXTENSION_SECONDS = 90.0
MAX_BACKOFF = 30.0
# Waiting for a first certificate that tailscaled cannot get yet: retry this often, doubling
# up to the longest, gently on the CA (Let's Encrypt limits new orders per account).
CERTIFICATE_RETRY_FIRST, CERTIFICATE_RETRY_LONGEST = 5.0, 300.0


def _first_untraversable(directory: Path, account: pwd.struct_passwd) -> Path | None:
    """The first existing directory on the way to `directory` that `account` may not enter."""
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for path in reversed([directory, *directory.parents]):
        try:
            st = path.stat()
        except FileNotFoundError:
            return None  # created by us later, with the right owner
        if st.st_uid == account.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return path
    return None


def return_freed_memory() -> None:
    """Start-up (imports, configuration, login) leaves freed heap behind: give it back to
    the system, as ten services on a host each hold on to it otherwise."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim this way


def _jwks_directory_problem(directory: Path, daemon_user: str | None) -> str | None:
    """Why the JWKS cannot go into `directory`, if it cannot: it must exist, and
    tailscaled's account must not own it (it could swap in keys of its own)."""
    try:
        owner = directory.stat().st_uid
    except OSError as exc:
        return f"{directory} is not an existing directory ({exc.strerror}); create it first"
    if daemon_user is not None and owner == pwd.getpwnam(daemon_user).pw_uid:
        return (f"{directory} belongs to {daemon_user}, the account tailscaled runs as, which could replace the "
                "keys an upstream trusts; choose a directory it cannot write")
    return None


class StartupProblem(Exception):
    """A configuration that is valid on paper but cannot run here; exit 2 before anything starts."""


def run(cfg: ServiceConfig) -> int:
    logs.setup(cfg.name, cfg.log_level, cfg.access_log)
    service = Service(cfg)
    try:
        return asyncio.run(service.main())
    except KeyboardInterrupt:
        return EXIT_FAILURE


def raise_open_file_limit() -> None:
    """Every proxied connection holds two descriptors (client and upstream side); the
    soft limit systemd and shells start us with (1024) would cap a service at ~500 open
    websockets. The hard limit is ours to take, as Go programs do by themselves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Service:
    def __init__(self, cfg: ServiceConfig):
        self.cfg = cfg
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.health = Health(
            name=cfg.name, mode="spawn" if cfg.spawns_tailscaled else "attach", upstream=cfg.to_url,
            listen_port=cfg.effective_listen_port, funnel=cfg.funnel,
            tls_mode="plaintext" if cfg.plaintext else ("files" if cfg.certificate_file else "tailscale"))
        self.peer_check = TailscaledPeerCheck()
        self.stop_requested = asyncio.Event()
        self.daemon: SpawnedTailscaled | None = None
        self.certificates: CertificateKeeper | None = None
        self.claims: dict[int, str] = {}  # tailnet ports claimed only to keep peers off them
        self.asserter: Asserter | None = None
        self._closed_port: socket.socket | None = None
        self._tasks: list[asyncio.Task] = []

    # --- start-up checks ---------------------------------------------------------

    def preflight(self) -> tuple[Path | None, Path]:
        """Everything that can be checked before starting anything; returns (state dir, LocalAPI socket)."""
        cfg = self.cfg
        problems = []
        try:
            find_credential(cfg)
        except AuthKeyError as exc:
            problems.append(f"{option_name('authKeyPath')}: {exc}")
        for key, path in (("certificateFile", cfg.certificate_file), ("certificateKey", cfg.certificate_key),
                          ("upstreamCaFile", cfg.upstream_ca_file)):
            if path is not None and not os.access(path, os.R_OK):
                problems.append(f"{option_name(key)}: cannot read {path}")
        if cfg.control_socket is None or cfg.tailscaled_socket is None:
            if unsafe := paths.unsafe_shared_runtime_base():
                problems.append(f"runtime directory: {unsafe}")
        if cfg.tailscaled_socket is not None:
            if problems:
                raise StartupProblem("\n".join(problems))
            return None, cfg.tailscaled_socket
        if shutil.which(cfg.tailscaled_path) is None:
            problems.append(f'{option_name("tailscaledPath")}: "{cfg.tailscaled_path}" is not an executable on '
                            '$PATH; install tailscale or pass --tailscaled /path/to/tailscaled')
        if os.geteuid() == 0 and cfg.tailscaled_user is None:
            problems.append(f"{option_name('tailscaledUser')}: tsnsrv runs as root, and tailscaled would too (as root "
                            "it rewrites system DNS settings at start); pass --tailscaled-user USER (a dedicated "
                            "account)")
        state_dir = paths.state_dir(cfg)
        if cfg.tailscaled_user is not None:
            try:
                account = pwd.getpwnam(cfg.tailscaled_user)
            except KeyError:
                problems.append(f'{option_name("tailscaledUser")}: no account named "{cfg.tailscaled_user}"')
            else:
                blocked = _first_untraversable(state_dir.parent, account)
                if blocked is not None:
                    problems.append(f"{option_name('stateDir')}: tailscaled runs as {cfg.tailscaled_user}, who cannot "
                                    f"enter {blocked} on the way to {state_dir}; choose a directory that user can "
                                    "reach")
            if os.geteuid() != 0:
                problems.append(f"{option_name('tailscaledUser')}: only root can start tailscaled as another user")
        existing = next(path for path in [state_dir, *state_dir.parents] if path.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"{option_name('stateDir')}: cannot create or write {state_dir}: {existing} is not a "
                            "writable directory")
        socket_path = paths.runtime_dir(cfg) / "tailscaled.sock"
        if len(str(socket_path)) > paths.MAX_SOCKET_PATH:
            problems.append(f"{option_name('name')}: the socket path {socket_path} is longer than unix sockets "
                            "allow; use a shorter name")
        if problems:
            raise StartupProblem("\n".join(problems))
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StartupProblem(f"{option_name('stateDir')}: cannot create {state_dir}: {exc.strerror}") from None
        try:
            StateDirLock(state_dir).acquire()
        except (TailscaledStartError, OSError) as exc:
            raise StartupProblem(f"{option_name('stateDir')}: {exc}") from None
        return state_dir, socket_path

    def _start_assertions(self) -> Asserter:
        """Signed identity assertions: the keys (made on first start), the JWKS, and the
        request path's and control socket's hooks. The JOSE library loads only here."""
        from .assertion import Asserter, AssertionSetupError, KeyDirectory

        cfg = self.cfg
        jwks_file = cfg.assertion_jwks_file
        if jwks_file is not None:
            problem = _jwks_directory_problem(jwks_file.parent, cfg.tailscaled_user if cfg.spawns_tailscaled else None)
            if problem:
                raise StartupProblem(f"{option_name('assertionJwksFile')}: {problem}")
        try:
            asserter = Asserter(cfg, KeyDirectory(paths.assertion_key_dir(cfg),
                                                  follow_symlinks=cfg.assertion_key_dir is not None))
        except AssertionSetupError as exc:
            raise StartupProblem(f"{option_name(exc.key)}: {exc}") from None
        self.proxy.asserter = asserter
        self.control.jwks = lambda: asserter.jwks_bytes
        self._tasks.append(asyncio.create_task(asserter.keep_keys_current()))
        log.info("%s", asserter.describe())
        return asserter

    async def loopback_policy(self, front: list[FrontListener]) -> LoopbackPolicy:
        """What the guarded tailscaled may reach on host loopback: the front listeners, DNS
        resolvers there, and a control server that resolves there."""
        control: set[Endpoint] = set()
        if self.cfg.login_server_url:
            url = urlsplit(self.cfg.login_server_url)
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                answers = await asyncio.get_running_loop().getaddrinfo(url.hostname, port, type=socket.SOCK_STREAM)
            except OSError:
                answers = []  # tailscaled will say it cannot reach the control server
            for *_, sockaddr in answers:
                ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
                if ip.is_loopback or ip.is_unspecified:
                    control.add((ip, port))
        policy = LoopbackPolicy.build({(ipaddress.ip_address(listener.address), listener.port) for listener in front},
                                      resolver_endpoints(), control)
        if policy.control:
            log.info("the control server is on host loopback (%s): the node claims port(s) %s with Serve and stays "
                     "shields-up until it does, so that no tailnet peer reaches them through it",
                     ", ".join(f"{ip}:{port}" for ip, port in sorted(policy.control, key=str)),
                     ", ".join(map(str, sorted(policy.control_ports))))
        return policy

    # --- main --------------------------------------------------------------------

    async def main(self) -> int:
        cfg = self.cfg
        try:
            state_dir, socket_path = self.preflight()
        except StartupProblem as exc:
            print_problems("cannot start with this configuration", str(exc).splitlines())
            return EXIT_CONFIG
        raise_open_file_limit()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload_certificate)

        self.api = LocalAPI(socket_path)
        self.health.tailscaled_socket = str(socket_path)
        whois = None if cfg.suppress_whois else WhoisCache(self.api.whois, cfg.whois_timeout, self.metrics)
        self.proxy = Proxy(cfg, whois, self.metrics)
        self.control = ControlServer(self.health, self.metrics, self._probe_upstream)
        if cfg.assertions:
            try:
                self.asserter = self._start_assertions()
            except StartupProblem as exc:
                print_problems("cannot start with this configuration", str(exc).splitlines())
                return EXIT_CONFIG
        self.front = self._front_listener(self.proxy.handle)
        self.forwards = {cfg.effective_listen_port: self.front}
        if cfg.metrics_addr and cfg.metrics_addr.startswith("tailnet:"):
            self.forwards[int(cfg.metrics_addr.removeprefix("tailnet:"))] = self._front_listener(
                self.control.tailnet_metrics, funnel=False)
        for listener in self.forwards.values():
            listener.bind()
        self.health.front = f"{self.front.address}:{self.front.port}"
        await self.control.start_unix(paths.control_socket(cfg))
        if cfg.metrics_addr and not cfg.metrics_addr.startswith("tailnet:"):
            host, _, port = cfg.metrics_addr.rpartition(":")
            await self.control.start_tcp(host.strip("[]"), int(port))

        shield_until_claimed = False
        if state_dir is not None:
            loopback = await self.loopback_policy(list(self.forwards.values()))
            self.daemon = SpawnedTailscaled(cfg, state_dir, socket_path, loopback)
            self.daemon.prepare()
            shield_until_claimed = bool(loopback.control)
            if loopback.control_ports - self.forwards.keys():
                # Claimed so that the forwarder never dials them for a peer: tailscaled
                # itself connects there. They forward to a port that refuses connections.
                self._closed_port = reserve_closed_port(cfg.front_address)
                closed = self._host_port(cfg.front_address, self._closed_port.getsockname()[1])
                self.claims = {port: closed for port in loopback.control_ports - self.forwards.keys()}
        self.node = Node(cfg, self.api, self._node_state_changed,
                         lambda warnings: setattr(self.health, "warnings", dict(warnings)),
                         on_shielded=self.daemon.open_control if shield_until_claimed and self.daemon else None)
        if self.notifier.watchdog_interval:
            self._tasks.append(asyncio.create_task(self._watchdog()))
        if self.notifier.enabled:
            self._tasks.append(asyncio.create_task(self._hold_start_open_for_login()))
        lifecycle = asyncio.create_task(self._keep_serving(), name="lifecycle")
        stop = asyncio.create_task(self.stop_requested.wait())
        await asyncio.wait({lifecycle, stop}, return_when=asyncio.FIRST_COMPLETED)
        exit_code = EXIT_OK
        if lifecycle.done():
            exit_code = lifecycle.result()
        else:
            lifecycle.cancel()
            await asyncio.gather(lifecycle, return_exceptions=True)
        stop.cancel()
        await self.shutdown()
        return exit_code

    def _front_listener(self, handler: Any, funnel: bool | None = None) -> FrontListener:
        cfg = self.cfg
        serves_funnel = cfg.funnel if funnel is None else funnel
        return FrontListener(cfg.front_address, handler, self.peer_check, self.metrics,
                             read_header_timeout=cfg.read_header_timeout,
                             funnel_read_header_timeout=cfg.funnel_read_header_timeout,
                             accept_tailnet=not cfg.funnel_only, accept_funnel=serves_funnel)

    def _request_stop(self, sig: signal.Signals) -> None:
        if self.stop_requested.is_set():
            log.warning("second %s: exiting now", sig.name)
            os._exit(EXIT_FAILURE)
        log.info("%s received: finishing in-flight requests (up to %gs), then stopping", sig.name,
                 self.cfg.shutdown_timeout)
        self.stop_requested.set()

    def _reload_certificate(self) -> None:
        """SIGHUP: re-read the certificate now (e.g. after ACME renewed the files)."""
        if self.certificates is None:
            log.info("SIGHUP: no certificate to reload")
            return

        async def reload() -> None:
            try:
                loaded = await self.certificates.refresh()  # type: ignore[union-attr]
                log.info("SIGHUP: certificate valid until %s", loaded.not_after.isoformat())
            except Exception as exc:  # noqa: BLE001 - keep the old certificate, say why
                log.error("SIGHUP: certificate reload failed, keeping the current one: %s", exc)
        self._tasks.append(asyncio.create_task(reload()))

    def _node_state_changed(self, state: str) -> None:
        self.health.backend_state = state
        self.metrics.node_running.set(1 if state == "Running" else 0)
        self.notifier.status(self.health.summary())

    async def _keep_serving(self) -> int:
        """Bring everything up; when tailscaled goes away, bring it back. Returns an exit code on fatal errors."""
        first = True
        lost_at = 0.0
        backoff = 1.0
        while True:
            try:
                await self._connect_tailscaled()
                info = await asyncio.wait_for(self.node.bring_up(), (self.cfg.timeout or None) if first else None)
                self.health.dns_name, self.health.addresses = info.dns_name, info.addresses
                if self.asserter is not None:
                    self.asserter.set_issuer(self.health.url)
                if first:
                    await self._load_certificate()
                await self.node.apply_serve_config(
                    {**self.claims, **{port: self._host_port(listener.address, listener.port)
                                       for port, listener in self.forwards.items()}},
                    self.cfg.effective_listen_port if self.cfg.funnel else None)
                self.health.serve_config = True
                if first:
                    for listener in self.forwards.values():
                        listener.start()
                    self.health.accepting = True
                    first = False
                    log.info("ready: %s", self.health.summary())
                    self.notifier.ready(self.health.summary())
                    return_freed_memory()
                else:
                    log.info("recovered %.1fs after losing tailscaled: %s", time.monotonic() - lost_at,
                             self.health.summary())
                    self.notifier.status(self.health.summary())
                backoff = 1.0
                await self.node.watch()
            except (NodeError, AuthKeyError, CertificateError) as exc:
                log.error("%s", exc)
                return EXIT_CONFIG
            except OAuthUnavailable as exc:
                log.error("%s; exiting to be restarted", exc)
                return EXIT_FAILURE
            except TailscaledStartError as exc:
                log.error("%s", exc)
                return EXIT_FAILURE
            except asyncio.TimeoutError:
                log.error("the node did not come up within %gs (--timeout)", self.cfg.timeout)
                return EXIT_FAILURE
            except (TailscaledUnreachable, ConnectionError, LocalAPIError) as exc:
                if lost_at == 0.0 or self.health.tailscaled == "running":
                    lost_at = time.monotonic()
                self.health.serve_config = False
                self._node_state_changed("Unknown")
                if isinstance(exc, LocalAPIError):
                    log.error("tailscaled refused a request, retrying in %.0fs: %s", backoff, exc)
                else:
                    self.health.tailscaled = "unreachable"
                    log.warning("lost contact with tailscaled: %s", exc)
                await self._restart_or_wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    @staticmethod
    def _host_port(address: str, port: int) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{host}:{port}"

    async def _connect_tailscaled(self) -> None:
        if self.daemon is not None:
            if self.daemon.process is None or self.daemon.process.returncode is not None:
                self.health.tailscaled = "starting"
                await self.daemon.start()
            pid, uid = self.daemon.pid, self.daemon.uid
            self.health.confined = "seccomp" if self.daemon.confined else "none"
        else:
            await self.api.status()  # raises TailscaledUnreachable until it answers
            pid, uid = daemon_credentials(self.api.socket_path)
            self.health.confined = "external (systemd IPAddressDeny)"
        assert pid is not None
        self.peer_check.set_daemon(pid, uid)
        self.health.peer_check = "uid and fd" if self.peer_check.inspects_fds else "uid only"
        self.health.tailscaled, self.health.tailscaled_pid = "running", pid

    async def _restart_or_wait(self, backoff: float) -> None:
        daemon = self.daemon
        if daemon is not None and daemon.process is not None and daemon.process.returncode is None:
            try:
                await asyncio.wait_for(daemon.wait_exit(), backoff)
            except asyncio.TimeoutError:
                return  # still alive: just reconnect
        if daemon is not None and daemon.process is not None:
            code = daemon.process.returncode
            self.health.tailscaled = "restarting"
            self.health.tailscaled_restarts += 1
            self.metrics.tailscaled_restarts.inc()
            log.warning("tailscaled exited (status %s); restarting it in %.0fs", code, backoff)
        await asyncio.sleep(backoff)

    async def _load_certificate(self) -> None:
        cfg = self.cfg
        if cfg.plaintext:
            return
        source: FileCertificates | TailscaleCertificates
        if cfg.certificate_file is not None and cfg.certificate_key is not None:
            source = FileCertificates(cfg.certificate_file, cfg.certificate_key)
        else:
            info = self.node.info
            assert info is not None
            if not info.dns_name or info.dns_name not in info.cert_domains:
                raise CertificateError(
                    f"TLS: the control server offers no HTTPS certificate for {info.dns_name or 'this node'} "
                    "(headscale cannot issue them; on Tailscale enable HTTPS in the admin console). "
                    "Use --plaintext, or --cert-file/--key-file with your own certificate.")
            node = self.node
            source = TailscaleCertificates(self.api.cert_pair, lambda: node.info.dns_name if node.info else "",
                                           unavailable=(LocalAPIError, TimeoutError))
        self.certificates = CertificateKeeper(source, self._certificate_changed, self._certificate_problem)
        await self._first_certificate(self.certificates)
        self._tasks.append(asyncio.create_task(self.certificates.run()))

    async def _first_certificate(self, keeper: CertificateKeeper) -> None:
        """Until tailscaled has a certificate for us: not ready, saying why, retrying with backoff."""
        delay = CERTIFICATE_RETRY_FIRST
        while True:
            try:
                await keeper.refresh()
                return
            except CertificateUnavailable as exc:
                log.error("TLS: %s; not ready, trying again in %.0fs", exc, delay)
                self.notifier.status(f"not ready: no TLS certificate yet: {exc}"[:200])
            await asyncio.sleep(delay)
            delay = min(delay * 2, CERTIFICATE_RETRY_LONGEST)

    def _certificate_problem(self, problem: str | None) -> None:
        self.health.certificate_error = problem or ""

    def _certificate_changed(self, loaded: LoadedCertificate) -> None:
        for listener in self.forwards.values():
            if listener is self.front:
                listener.tls_context = loaded.context
        self.health.certificate_not_after = loaded.not_after
        self.health.certificate_source = loaded.source
        self.metrics.certificate_expiry.set(loaded.not_after.timestamp())

    async def _probe_upstream(self) -> dict[str, Any]:
        return await self.proxy.probe()

    async def _hold_start_open_for_login(self) -> None:
        """A node waiting for someone to open its login URL is not a failed start:
        keep systemd's start timeout from killing it (and printing a new URL each time)."""
        extended_until = 0.0
        while not self.health.ready:
            waiting = self.health.backend_state in ("NeedsLogin", "NeedsMachineAuth")
            if waiting and time.monotonic() > extended_until - LOGIN_WAIT_EXTENSION_SECONDS * 2 / 3:
                self.notifier.extend_start_timeout(LOGIN_WAIT_EXTENSION_SECONDS)
                extended_until = time.monotonic() + LOGIN_WAIT_EXTENSION_SECONDS
            await asyncio.sleep(1)

    async def _watchdog(self) -> None:
        assert self.notifier.watchdog_interval is not None
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_interval)

    async def _let_tailscaled_deliver(self) -> None:
        """Keep tailscaled up until it has handed the last responses to their clients.

        Stopping it the moment our handlers finish would drop bytes still on their way
        through its netstack; it closes each front connection once its client has them."""
        deadline = time.monotonic() + DELIVERY_GRACE_SECONDS
        while time.monotonic() < deadline:
            try:
                open_connections = sum(unfinished_connections((listener.address, listener.port))
                                       for listener in self.forwards.values())
            except (OSError, PeerLookupError) as exc:
                log.warning("cannot tell whether tailscaled delivered the last responses: %s", exc)
                return
            if not open_connections:
                return
            await asyncio.sleep(0.05)
        log.warning("stopping tailscaled with front connections still open after %gs", DELIVERY_GRACE_SECONDS)

    async def shutdown(self) -> None:
        self.health.stopping = True
        self.notifier.stopping("stopping: finishing in-flight requests")
        if self.daemon is None and self.health.serve_config:
            # An attached tailscaled outlives us: left in place, its Serve config would
            # forward tailnet clients to a front port that any local user could bind.
            try:
                await self.api.set_serve_config({})
                log.info("serve config removed")
            except (TailscaledUnreachable, LocalAPIError) as exc:
                log.warning("could not remove the serve config: %s", exc)
        for listener in self.forwards.values():
            await listener.stop_accepting()
        self.health.accepting = False
        await self.proxy.close_websockets()
        await asyncio.gather(*(listener.shutdown(self.cfg.shutdown_timeout) for listener in self.forwards.values()))
        if self.daemon is not None:  # an attached tailscaled keeps running and delivers anyway
            await self._let_tailscaled_deliver()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.cfg.ephemeral and self.health.backend_state == "Running":
            try:
                await self.node.logout()  # an ephemeral node leaves now, freeing its name
            except (TailscaledUnreachable, LocalAPIError) as exc:
                log.warning("could not log the ephemeral node out: %s", exc)
        if self.daemon is not None:
            await self.daemon.stop()
        self.health.tailscaled = "stopped"
        await self.proxy.close()
        await self.api.close()
        await self.control.close()
        if self._closed_port is not None:
            self._closed_port.close()
        log.info("stopped")
