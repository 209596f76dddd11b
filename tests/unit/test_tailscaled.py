"""The spawned tailscaled's command line, environment and state-directory lock
(tsnsrv.tailscaled); nothing is started here."""

from __future__ import annotations

import os
import pwd

import pytest

from tsnsrv.config import load
from tsnsrv.tailscaled import SpawnedTailscaled, StateDirLock, TailscaledStartError


def daemon(tmp_path, **extra) -> SpawnedTailscaled:
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083",
                "tailscaledPath": str(tmp_path / "bin" / "tailscaled"), **extra})
    return SpawnedTailscaled(cfg, tmp_path / "state", tmp_path / "run" / "tailscaled.sock", set())


def test_argv_is_userspace_offline_and_per_service(tmp_path):
    assert daemon(tmp_path).argv() == [
        str(tmp_path / "bin" / "tailscaled"), "--tun=userspace-networking", f"--statedir={tmp_path / 'state'}",
        f"--socket={tmp_path / 'run' / 'tailscaled.sock'}", "--port=0", "--no-logs-no-support"]


def test_argv_for_ephemeral_nodes_and_log_upload(tmp_path):
    argv = daemon(tmp_path, ephemeral=True, tailscaledLogUpload=True).argv()
    assert "--state=mem:" in argv
    assert "--no-logs-no-support" not in argv


def test_environment_drops_auth_keys_and_sets_logs_dir_and_death_fd(tmp_path, monkeypatch):
    monkeypatch.setenv("TS_AUTHKEY", "tskey-auth-secret")
    monkeypatch.setenv("TS_AUTH_KEY", "tskey-auth-secret")
    monkeypatch.setenv("UNRELATED", "kept")
    env = daemon(tmp_path).environment(death_fd=7)
    assert "TS_AUTHKEY" not in env and "TS_AUTH_KEY" not in env
    assert "tskey-auth-secret" not in env.values()
    assert env["TS_LOGS_DIR"] == str(tmp_path / "state")
    assert env["TS_PARENT_DEATH_FD"] == "7"
    assert env["UNRELATED"] == "kept"


def test_state_dir_lock_admits_one_holder(tmp_path):
    first = StateDirLock(tmp_path)
    first.acquire()
    try:
        assert (tmp_path / "tsnsrv.lock").read_text() == str(os.getpid())
        with pytest.raises(TailscaledStartError, match=f"in use by tsnsrv pid {os.getpid()}; each service needs"):
            StateDirLock(tmp_path).acquire()
    finally:
        os.close(first._fd)
    second = StateDirLock(tmp_path)
    second.acquire()  # free again once the holder is gone
    os.close(second._fd)


@pytest.mark.parametrize("plant", ["symlink", "hardlink"])
def test_the_lock_never_writes_through_what_the_daemons_account_planted(tmp_path, plant):
    victim = tmp_path / "victim"
    victim.write_text("important root data\n")
    state = tmp_path / "state"
    state.mkdir()
    if plant == "symlink":
        (state / "tsnsrv.lock").symlink_to(victim)
    else:
        os.link(victim, state / "tsnsrv.lock")
    with pytest.raises(TailscaledStartError):
        StateDirLock(state).acquire()
    assert victim.read_text() == "important root data\n"


def test_preparing_the_state_dir_hands_it_over_without_following_links(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("handing the state directory to another account needs root")
    nobody = pwd.getpwnam("nobody")
    outside = tmp_path / "outside"
    outside.write_text("not the daemon's\n")
    state = tmp_path / "state"
    (state / "sub").mkdir(parents=True)
    (state / "sub" / "file").write_text("x")
    (state / "link").symlink_to(outside)
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083", "tailscaledUser": "nobody"})
    SpawnedTailscaled(cfg, state, tmp_path / "run" / "s.sock", set()).prepare()
    assert (state / "sub" / "file").stat().st_uid == nobody.pw_uid
    assert os.lstat(state / "link").st_uid == nobody.pw_uid
    assert outside.stat().st_uid == os.geteuid()


@pytest.mark.parametrize("key_dir", [None, "signing"])
def test_preparing_the_state_dir_keeps_the_lock_and_the_assertion_keys_from_the_daemons_account(tmp_path, key_dir):
    if os.geteuid() != 0:
        pytest.skip("handing the state directory to another account needs root")
    state = tmp_path / "state"
    keys = state / (key_dir or "assertion-keys")
    keys.mkdir(parents=True, mode=0o700)
    (keys / "keys.json").write_text("{}")
    (state / "tsnsrv.lock").write_text("1")
    (state / "tailscaled.state").write_text("{}")
    extra = {"assertionKeyDir": str(keys)} if key_dir else {}
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083", "tailscaledUser": "nobody", "stateDir": str(state),
                **extra})
    SpawnedTailscaled(cfg, state, tmp_path / "run" / "s.sock", set()).prepare()
    assert (state / "tailscaled.state").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert {path.stat().st_uid for path in (keys, keys / "keys.json", state / "tsnsrv.lock")} == {os.geteuid()}


@pytest.mark.asyncio
@pytest.mark.parametrize("allowed", [False, True])
async def test_without_the_loopback_guard_tailscaled_runs_only_when_allowed(monkeypatch, tmp_path, allowed):
    import socket

    from tsnsrv import tailscaled as module
    from tsnsrv.confine import ConfinementUnavailable

    def unavailable(_channel, _timeout):
        raise ConfinementUnavailable("seccomp user notification not supported")
    monkeypatch.setattr(module, "receive_listener", unavailable)
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083", "allowUnconfinedTailscaled": allowed})
    daemon = SpawnedTailscaled(cfg, tmp_path, tmp_path / "s.sock", set())
    parent, child = socket.socketpair()
    child.close()
    if allowed:
        await daemon._start_guard(parent)
        assert daemon.confined is False
    else:
        with pytest.raises(TailscaledStartError, match="--allow-unconfined-tailscaled"):
            await daemon._start_guard(parent)


@pytest.mark.asyncio
async def test_a_restart_after_an_unnoticed_exit_leaves_no_pipe_behind(monkeypatch, tmp_path):
    # tailscaled killed and reaped before tsnsrv waited for it: its start must not leak the
    # old process's pipes (the soak run saw one more fd after every such restart).
    import asyncio
    import sys

    from tsnsrv import tailscaled as module

    def pipes() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
            except FileNotFoundError:
                pass  # the directory listing's own fd, closed by now
        return count

    real_exec = asyncio.create_subprocess_exec

    async def stand_in(*_argv, **options):  # the wrapper and tailscaled: a process that lives until killed
        return await real_exec(sys.executable, "-c", "import time; time.sleep(60)", **options)

    async def nothing(*_args) -> None: ...
    monkeypatch.setattr(module.asyncio, "create_subprocess_exec", stand_in)
    monkeypatch.setattr(SpawnedTailscaled, "_start_guard", nothing)
    monkeypatch.setattr(SpawnedTailscaled, "_wait_for_localapi", nothing)
    cfg = load({"name": "books", "toURL": "http://127.0.0.1:8083"})
    daemon = SpawnedTailscaled(cfg, tmp_path, tmp_path / "s.sock", set())
    before = pipes()
    for _ in range(3):
        await daemon.start()
        daemon.process.kill()
        await daemon.process.wait()  # reaped, as asyncio does when it dies, without wait_exit
        await asyncio.gather(daemon._log_task)
    await daemon.start()
    try:
        assert pipes() - before == 2  # the running one's: its output, and the pipe it dies with tsnsrv by
    finally:
        await daemon.stop()
