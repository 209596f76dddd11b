"""Where a service keeps its state and its sockets.

Every service name gets its own directories, so two services can never share a node
identity (the Go tsnsrv's issue #62). Under systemd the unit's StateDirectory and
RuntimeDirectory are used; otherwise the XDG base directories of the user, or
/var/lib and /run for root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .config import ServiceConfig

# AF_UNIX socket paths are limited to 107 bytes on Linux.
MAX_SOCKET_PATH = 107


def _first(env_value: str | None) -> Path | None:
    # systemd joins several directories with ":"; the first is this unit's own.
    return Path(env_value.split(":")[0]) if env_value else None


def state_dir(cfg: ServiceConfig) -> Path:
    if cfg.state_dir is not None:
        return cfg.state_dir
    if systemd_dir := _first(os.environ.get("STATE_DIRECTORY")):
        return systemd_dir / cfg.name
    if os.geteuid() == 0:
        return Path("/var/lib/tsnsrv") / cfg.name
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "tsnsrv" / cfg.name


# The private signing keys of identity assertions, by default. tsnsrv keeps it as its own
# inside a state directory that may otherwise belong to tailscaled's account.
ASSERTION_KEY_DIR = "assertion-keys"


def assertion_key_dir(cfg: ServiceConfig) -> Path:
    return cfg.assertion_key_dir or state_dir(cfg) / ASSERTION_KEY_DIR


def runtime_base() -> Path:
    """The directory under which every service of this user has its runtime directory."""
    if os.geteuid() == 0:
        return Path("/run/tsnsrv")
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "tsnsrv"
    return Path(f"/tmp/tsnsrv-{os.geteuid()}")


def unsafe_shared_runtime_base() -> str | None:
    """Why the /tmp fallback runtime directory cannot be trusted, if it is in use and cannot.

    Its name is predictable, so another local user may have made it first (world-writable,
    or a symlink) to swap tailscaled's socket for their own and be handed the auth key."""
    base = runtime_base()
    if os.environ.get("RUNTIME_DIRECTORY") or base.parent != Path("/tmp"):
        return None
    return private_directory_problem(base)


def private_directory_problem(directory: Path) -> str | None:
    """Create `directory` (0700) unless it exists; say why it is not ours alone, if it is not."""
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create {directory}: {exc.strerror}"
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory but a link or file someone else may control"
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        return (f"{directory} belongs to uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}; it must be "
                "yours and private (0700). Set XDG_RUNTIME_DIR, or remove that directory")
    return None


def runtime_dir(cfg: ServiceConfig) -> Path:
    if systemd_dir := _first(os.environ.get("RUNTIME_DIRECTORY")):
        return systemd_dir
    return runtime_base() / cfg.name


def control_socket(cfg: ServiceConfig) -> Path:
    return cfg.control_socket or runtime_dir(cfg) / "control.sock"


# Where NixOS puts them: root's runtime directory, the units' runtime directories, and
# the state volumes of virtualisation.oci-sidecars.tsnsrv's containers.
SYSTEM_CONTROL_SOCKETS = [(Path("/run/tsnsrv"), "*/control.sock"), (Path("/run"), "tsnsrv-*/control.sock"),
                          (Path("/var/lib"), "podman-*/control.sock"), (Path("/var/lib"), "docker-*/control.sock")]


def control_sockets_on_this_machine() -> list[Path]:
    """Control sockets of every service `tsnsrv status` can see: ours, root's, NixOS units' and sidecars'."""
    patterns = [(runtime_base(), "*/control.sock"), *SYSTEM_CONTROL_SOCKETS]
    found: set[Path] = set()
    for base, pattern in patterns:
        try:
            found.update(path for path in base.glob(pattern) if path.is_socket())
        except OSError:
            continue
    return sorted(found)
