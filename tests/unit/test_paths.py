"""Where a service keeps its state and sockets (tsnsrv.paths): per name, never shared."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsnsrv import paths
from tsnsrv.config import load

names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


def cfg(name: str = "books", **extra):
    return load({"name": name, "toURL": "http://127.0.0.1:8083", **extra})


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A clean environment as an unprivileged user (uid 1000) with HOME in tmp_path."""
    for var in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "XDG_STATE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    return monkeypatch


def test_explicit_state_dir_wins(env):
    env.setenv("STATE_DIRECTORY", "/var/lib/unit")
    assert paths.state_dir(cfg(stateDir="/srv/books")) == Path("/srv/books")


def test_systemd_state_directory_gets_a_subdirectory_per_name(env):
    env.setenv("STATE_DIRECTORY", "/var/lib/tsnsrv-books:/var/lib/other")
    assert paths.state_dir(cfg("books")) == Path("/var/lib/tsnsrv-books/books")


def test_xdg_state_home(env):
    env.setenv("XDG_STATE_HOME", "/home/u/.state")
    assert paths.state_dir(cfg("books")) == Path("/home/u/.state/tsnsrv/books")


def test_default_is_under_home(env, tmp_path):
    assert paths.state_dir(cfg("books")) == tmp_path / "home" / ".local" / "state" / "tsnsrv" / "books"


def test_root_uses_var_lib(env):
    env.setattr(paths.os, "geteuid", lambda: 0)
    env.setenv("XDG_STATE_HOME", "/ignored")
    assert paths.state_dir(cfg("books")) == Path("/var/lib/tsnsrv/books")


@given(a=names, b=names, mode=st.sampled_from(["systemd", "xdg", "home", "root"]))
def test_two_names_never_share_a_state_dir(a, b, mode):
    with pytest.MonkeyPatch.context() as mp:
        for var in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
            mp.delenv(var, raising=False)
        mp.setenv("HOME", "/home/unit")
        mp.setattr(paths.os, "geteuid", lambda: 0 if mode == "root" else 1000)
        if mode == "systemd":
            mp.setenv("STATE_DIRECTORY", "/var/lib/tsnsrv")
        elif mode == "xdg":
            mp.setenv("XDG_STATE_HOME", "/home/unit/.xdg")
        same = paths.state_dir(cfg(a)) == paths.state_dir(cfg(b))
    assert same == (a == b)


def test_runtime_base(env, tmp_path):
    assert paths.runtime_base() == Path("/tmp/tsnsrv-1000")
    env.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert paths.runtime_base() == Path("/run/user/1000/tsnsrv")
    env.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.runtime_base() == Path("/run/tsnsrv")


def test_runtime_dir_and_control_socket(env):
    env.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert paths.runtime_dir(cfg("books")) == Path("/run/user/1000/tsnsrv/books")
    assert paths.control_socket(cfg("books")) == Path("/run/user/1000/tsnsrv/books/control.sock")
    assert paths.control_socket(cfg("books", controlSocket="/x/c.sock")) == Path("/x/c.sock")
    env.setenv("RUNTIME_DIRECTORY", "/run/tsnsrv-books:/run/more")
    assert paths.runtime_dir(cfg("books")) == Path("/run/tsnsrv-books")


def test_control_sockets_on_this_machine_finds_only_sockets(env, tmp_path):
    base = tmp_path / "rt"
    env.setattr(paths, "runtime_base", lambda: base)
    # A sidecar's state volume (virtualisation.oci-sidecars.tsnsrv), beside an app's own state.
    env.setattr(paths, "SYSTEM_CONTROL_SOCKETS", [(tmp_path / "var-lib", "podman-*/control.sock")])
    (tmp_path / "var-lib" / "podman-books-tailnet").mkdir(parents=True)
    (tmp_path / "var-lib" / "calibre").mkdir()
    (base / "books").mkdir(parents=True)
    (base / "decoy").mkdir()
    (base / "decoy" / "control.sock").write_text("not a socket")
    listeners = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    try:
        for listener, path in zip(listeners, [base / "books", tmp_path / "var-lib" / "podman-books-tailnet",
                                              tmp_path / "var-lib" / "calibre"]):
            listener.bind(str(path / "control.sock"))
        found = paths.control_sockets_on_this_machine()
    finally:
        for listener in listeners:
            listener.close()
    assert base / "books" / "control.sock" in found
    assert tmp_path / "var-lib" / "podman-books-tailnet" / "control.sock" in found
    assert tmp_path / "var-lib" / "calibre" / "control.sock" not in found
    assert base / "decoy" / "control.sock" not in found
    assert found == sorted(found)


def test_a_private_directory_is_made_0700_and_accepted(tmp_path):
    assert paths.private_directory_problem(tmp_path / "rt") is None
    assert (tmp_path / "rt").stat().st_mode & 0o777 == 0o700


def test_a_directory_someone_else_could_write_is_refused(tmp_path):
    shared = tmp_path / "rt"
    shared.mkdir()
    shared.chmod(0o777)
    assert "must be yours and private (0700)" in paths.private_directory_problem(shared)


def test_a_symlink_planted_in_place_of_the_directory_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "rt").symlink_to(tmp_path / "elsewhere")
    assert "not a directory but a link" in paths.private_directory_problem(tmp_path / "rt")
