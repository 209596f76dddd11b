"""The service's own tailscaled, when tsnsrv spawns it (the default outside NixOS).

One userspace-networking tailscaled per service, with its own state directory and
LocalAPI socket, kept offline-clean (no log upload unless asked), started under the
loopback guard (see confine), killed with tsnsrv (TS_PARENT_DEATH_FD) and restarted by
tsnsrv if it dies.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import sys
from pathlib import Path

from .config import ServiceConfig
from .confine import ConfinementUnavailable, LoopbackGuard, LoopbackPolicy, receive_listener
from .localapi import LocalAPI, LocalAPIError, TailscaledUnreachable
from .paths import assertion_key_dir

log = logging.getLogger(__name__)
daemon_log = logging.getLogger("tsnsrv.tailscaled")

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Kept from the child: secrets it must not see, and systemd's per-process protocol
# variables (tailscaled speaks sd_notify itself and would tell systemd READY=1 before
# tsnsrv is ready; the watchdog and socket activation are tsnsrv's, not its child's).
WITHHELD_ENV = ("TS_AUTHKEY", "TS_AUTH_KEY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                "LISTEN_PID", "LISTEN_FDNAMES")
LOG_TIMESTAMP = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(\.\d+)? ")


UNCONFINED_WARNING = """
!!! tailscaled runs WITHOUT the loopback guard (%s).
!!! A tailnet peer that may reach this service can also reach every other TCP and UDP
!!! port on this host's 127.0.0.1 through it. Restrict the node with your tailnet ACL
!!! to the service's port only (see docs/security.md), or run tsnsrv with the
!!! NixOS module, whose systemd units close this with IPAddressDeny."""


class TailscaledStartError(Exception):
    pass


LOCK_FILE = "tsnsrv.lock"


class StateDirLock:
    """An exclusive lock on the state directory: one process per node identity."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        # The directory belongs to tailscaled's account: never follow what it may have
        # planted there (a symlink, or a hard link to another file) while we are root.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise TailscaledStartError(f"cannot open the lock file {self.path}: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise TailscaledStartError(f"{self.path} is not a plain file of its own; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise TailscaledStartError(f"state directory {self.path.parent} is in use by tsnsrv pid {holder}; "
                                       "each service needs its own --state-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd


class SpawnedTailscaled:
    def __init__(self, cfg: ServiceConfig, state_dir: Path, socket_path: Path, loopback: LoopbackPolicy):
        self.cfg = cfg
        self.state_dir = state_dir
        self.socket_path = socket_path
        self.loopback = loopback
        self.process: asyncio.subprocess.Process | None = None
        self.guard: LoopbackGuard | None = None
        self.confined = False
        self.uid = os.getuid()
        self._death_pipe_write: int | None = None
        self._log_task: asyncio.Task | None = None
        self.recent_output: collections.deque[str] = collections.deque(maxlen=15)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def open_control(self) -> None:
        """The node is shields-up or claims the control ports: let held control connects through."""
        if self.guard is not None:
            self.guard.open_control()

    def prepare(self) -> None:
        """Create directories owned by the daemon's account and check the binary (before anything runs)."""
        user = self.cfg.tailscaled_user
        if user is not None:
            entry = pwd.getpwnam(user)
            self.uid = entry.pw_uid
        for directory in (self.state_dir, self.socket_path.parent):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if user is not None:
                os.chown(directory, entry.pw_uid, entry.pw_gid)
        if user is not None:
            # Relative to directory descriptors and never through a symlink, so that the
            # account cannot swap a directory for a link to /etc halfway through.
            # The lock and the assertion signing keys stay tsnsrv's: tailscaled's account
            # must not read the keys.
            kept = {self.state_dir / LOCK_FILE, assertion_key_dir(self.cfg)}
            for path, dirnames, filenames, dir_fd in os.fwalk(self.state_dir, follow_symlinks=False):
                dirnames[:] = [name for name in dirnames if Path(path, name) not in kept]
                for name in dirnames + [name for name in filenames if Path(path, name) not in kept]:
                    os.chown(name, entry.pw_uid, entry.pw_gid, dir_fd=dir_fd, follow_symlinks=False)

    def argv(self) -> list[str]:
        binary = shutil.which(self.cfg.tailscaled_path) or self.cfg.tailscaled_path
        args = [binary, "--tun=userspace-networking", f"--statedir={self.state_dir}",
                f"--socket={self.socket_path}", "--port=0"]
        if self.cfg.ephemeral:
            args.append("--state=mem:")  # registers as ephemeral; certificates still go to statedir
        if not self.cfg.tailscaled_log_upload:
            args.append("--no-logs-no-support")
        return args

    def environment(self, death_fd: int) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in WITHHELD_ENV}
        env["TS_LOGS_DIR"] = str(self.state_dir)
        env["TS_PARENT_DEATH_FD"] = str(death_fd)
        return env

    async def start(self) -> None:
        if self.socket_path.exists():
            self.socket_path.unlink()
        self._close_death_pipe()  # the last one's, if its exit was noticed without waiting for it
        death_read, self._death_pipe_write = os.pipe()
        parent_channel, child_channel = socket.socketpair()
        wrapper = [sys.executable, "-m", "tsnsrv.confine", "--notify-fd", str(child_channel.fileno())]
        if self.cfg.tailscaled_user is not None:
            wrapper += ["--user", self.cfg.tailscaled_user]
        try:
            self.process = await asyncio.create_subprocess_exec(
                *wrapper, "--", *self.argv(), env=self.environment(death_read),
                pass_fds=(death_read, child_channel.fileno()), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        finally:
            os.close(death_read)
            child_channel.close()
        self._log_task = asyncio.create_task(self._forward_logs(self.process))
        await self._start_guard(parent_channel)
        await self._wait_for_localapi()
        log.info("tailscaled started (pid %d, %s)", self.process.pid,
                 "loopback guarded" if self.confined else "NOT confined")

    async def _start_guard(self, channel: socket.socket) -> None:
        try:
            listener = await asyncio.to_thread(receive_listener, channel, STARTUP_TIMEOUT)
        except ConfinementUnavailable as exc:
            self.confined = False
            if not self.cfg.allow_unconfined_tailscaled:
                raise TailscaledStartError(
                    f"the loopback guard cannot confine tailscaled here ({exc}), and without it tailnet peers "
                    "could reach every port on this host's 127.0.0.1. Run tsnsrv under systemd attached to a "
                    "tailscaled unit with IPAddressDeny=localhost (the NixOS module does), or accept the risk "
                    "with --allow-unconfined-tailscaled") from None
            log.error(UNCONFINED_WARNING, exc)
            return
        finally:
            channel.close()
        if self.guard is not None:
            self.guard.stop()
        self.guard = LoopbackGuard(listener, self.loopback)
        self.confined = True

    async def _wait_for_localapi(self) -> None:
        api = LocalAPI(self.socket_path)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT
        try:
            while True:
                if self.process is not None and self.process.returncode is not None:
                    await asyncio.gather(self._log_task, return_exceptions=True)
                    output = "\n    ".join(self.recent_output) or "(nothing)"
                    raise TailscaledStartError(f"tailscaled exited with status {self.process.returncode} during "
                                               f"start-up; its last output:\n    {output}")
                try:
                    await api.status()
                    return
                except (TailscaledUnreachable, LocalAPIError):
                    if loop.time() > deadline:
                        raise TailscaledStartError(f"tailscaled's LocalAPI at {self.socket_path} did not answer "
                                                   f"within {STARTUP_TIMEOUT:.0f}s") from None
                    await asyncio.sleep(0.05)
        finally:
            await api.close()

    async def _forward_logs(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        level = logging.INFO if self.cfg.tailscaled_verbose else logging.DEBUG
        async for raw in process.stdout:
            line = LOG_TIMESTAMP.sub("", raw.decode(errors="replace").rstrip())
            if line:
                self.recent_output.append(line)
                daemon_log.log(level, "%s", line)

    async def wait_exit(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        if self._log_task is not None:
            await asyncio.gather(self._log_task, return_exceptions=True)
        self._close_death_pipe()
        return code

    def _close_death_pipe(self) -> None:
        if self._death_pipe_write is not None:
            os.close(self._death_pipe_write)
            self._death_pipe_write = None

    async def stop(self) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("tailscaled did not stop within %.0fs; killing it", STOP_TIMEOUT)
                process.kill()
                await process.wait()
        if self._log_task is not None:
            await asyncio.gather(self._log_task, return_exceptions=True)
        self._close_death_pipe()
        if self.guard is not None:
            self.guard.stop()
            self.guard = None
