"""Where the node's credentials come from: an auth key, or an OAuth client secret.

An OAuth client secret (`tskey-client-...[?ephemeral=&preauthorized=&baseURL=]`) is
exchanged for a single-use auth key with the configured tags, exactly as `tailscale
up` does, however the secret was supplied (the Go tsnsrv only did it for files: its
issue #237).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import parse_qs

import attrs

from .config import ServiceConfig

DEFAULT_API = "https://api.tailscale.com"
OAUTH_PREFIX = "tskey-client-"
ENV_VARS = ("TS_AUTHKEY", "TS_AUTH_KEY")


class AuthKeyError(Exception):
    """The credential cannot work as given: fix the configuration (exit status 2)."""


class OAuthUnavailable(Exception):
    """The OAuth API could not be reached or failed on its side: worth retrying (exit status 1)."""


@attrs.frozen
class Credential:
    secret: str
    source: str  # for messages: where it was read from

    @property
    def is_oauth_secret(self) -> bool:
        return self.secret.startswith(OAUTH_PREFIX)


def find_credential(cfg: ServiceConfig) -> Credential | None:
    """The configured key file, else $TS_AUTHKEY, else the systemd credential "authKey"."""
    if cfg.auth_key_path is not None:
        return Credential(_read_key_file(cfg.auth_key_path), str(cfg.auth_key_path))
    for var in ENV_VARS:
        if os.environ.get(var, "").strip():
            return Credential(os.environ[var].strip(), f"${var}")
    credentials_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials_dir and (Path(credentials_dir) / "authKey").is_file():
        path = Path(credentials_dir) / "authKey"
        return Credential(_read_key_file(path), str(path))
    return None


def _read_key_file(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise AuthKeyError(f"cannot read the auth key file {path}: {exc.strerror}") from None
    if not key:
        raise AuthKeyError(f"the auth key file {path} is empty")
    return key


@attrs.frozen
class OAuthSecret:
    secret: str
    ephemeral: bool
    preauthorized: bool
    base_url: str

    @classmethod
    def parse(cls, text: str, ephemeral_default: bool) -> OAuthSecret:
        secret, _, query = text.partition("?")
        attributes = parse_qs(query, keep_blank_values=True)
        unknown = set(attributes) - {"ephemeral", "preauthorized", "baseURL"}
        if unknown:
            raise AuthKeyError(f"unknown OAuth secret attribute(s) {', '.join(sorted(unknown))}; "
                               "known: ephemeral, preauthorized, baseURL")

        def flag(name: str, default: bool) -> bool:
            value = attributes.get(name, [""])[-1]
            if value == "":
                return default
            if value.lower() in ("true", "1", "t"):
                return True
            if value.lower() in ("false", "0", "f"):
                return False
            raise AuthKeyError(f'OAuth secret attribute {name}="{value}" is not true or false')

        base = attributes.get("baseURL", [""])[-1] or os.environ.get("TS_BASE_URL") or DEFAULT_API
        return cls(secret, flag("ephemeral", ephemeral_default), flag("preauthorized", False), base.rstrip("/"))


async def mint_auth_key(secret: OAuthSecret, tags: list[str], timeout: float = 30) -> str:
    """Exchange an OAuth client secret for a single-use auth key carrying `tags`."""
    if not tags:
        raise AuthKeyError("an OAuth client secret needs tags to create a key with; set tags (--tag tag:NAME)")
    from .oauth import mint  # only with an OAuth secret (oauth.py imports this module)

    return await mint(secret, tags, timeout)


async def auth_key_for_login(cfg: ServiceConfig) -> str | None:
    """The auth key to log in with now, minting one from an OAuth secret; None means interactive login."""
    credential = find_credential(cfg)
    if credential is None:
        return None
    if credential.is_oauth_secret:
        return await mint_auth_key(OAuthSecret.parse(credential.secret, cfg.ephemeral), cfg.tags)
    return credential.secret
