"""Signed identity assertions: who a request comes from, in a form the upstream can verify.

The X-Tailscale-* headers are believable only because of where a request came from, and
an upstream on 127.0.0.1 cannot tell tsnsrv from any other local process. With
assertions on, every request from a known tailnet identity also carries
`X-Tailscale-Identity-Assertion`: a compact JWS (RFC 7515), EdDSA over Ed25519
(RFC 8037), signed with a key only this service's proxy holds, whose public half the
upstream reads from a JWKS (RFC 7517). Funnel requests and clients whois cannot name
carry none (see docs/identity-assertions.md for why).

Signing is PyJWT's over `cryptography`'s Ed25519 (the most used Python JOSE library;
EdDSA and JWK support, no protocol code of ours). One signature costs about 45 µs, so
an assertion that is not bound to its request is made once per identity and reused
until shortly before it expires; a bound one (`htm`/`htu` claims, as DPoP's in RFC 9449)
is signed per request.

Keys: each signs for `assertionKeyRotation`; its successor is published in the JWKS a
whole rotation period before it takes over, so verifiers that reload the JWKS that often
(or on an unknown `kid`) never meet a key they do not know; a retired key stays
published until the last assertion it signed has expired. The private keys live in a
directory only the proxy's account may enter, never in what tailscaled's account owns.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from .access import Identity
from .config import ServiceConfig

log = logging.getLogger(__name__)

HEADER = "X-Tailscale-Identity-Assertion"
KEYS_FILE = "keys.json"
# Published beyond a key's last assertion's expiry, for verifiers whose clocks lag ours.
CLOCK_SKEW_MARGIN = 60.0
MAX_CACHED_IDENTITIES = 4096
RETRY_AFTER_WRITE_FAILURE = 30.0

Clock = Callable[[], float]


class AssertionSetupError(Exception):
    """The key directory or the JWKS file cannot be used; `key` names the option."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# --- keys ------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@attrs.frozen
class SigningKey:
    """One Ed25519 key and its schedule (wall-clock seconds): it signs from `signs_from`
    until `signs_until` and is in the JWKS until `published_until`."""

    private: Ed25519PrivateKey = attrs.field(repr=False)
    signs_from: float
    signs_until: float
    published_until: float
    kid: str = attrs.field(init=False)

    @kid.default
    def _thumbprint(self) -> str:
        # RFC 7638: the SHA-256 of the required public members in lexical order.
        canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": self.public_jwk_x()},
                               separators=(",", ":"), sort_keys=True)
        return _b64url(hashlib.sha256(canonical.encode()).digest())

    def public_jwk_x(self) -> str:
        return OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)["x"]

    def public_jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "Ed25519", "x": self.public_jwk_x(), "kid": self.kid, "alg": "EdDSA",
                "use": "sig"}

    def record(self) -> dict[str, Any]:
        return {"jwk": OKPAlgorithm.to_jwk(self.private, as_dict=True), "signsFrom": self.signs_from,
                "signsUntil": self.signs_until, "publishedUntil": self.published_until}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SigningKey:
        private = OKPAlgorithm.from_jwk(record["jwk"])
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError("not an Ed25519 private key")
        return cls(private, float(record["signsFrom"]), float(record["signsUntil"]),
                   float(record["publishedUntil"]))

    @classmethod
    def generate(cls, signs_from: float, signs_until: float, lifetime: float) -> SigningKey:
        return cls(Ed25519PrivateKey.generate(), signs_from, signs_until, signs_until + lifetime + CLOCK_SKEW_MARGIN)


def schedule(keys: list[SigningKey], now: float, rotation: float, lifetime: float) -> list[SigningKey]:
    """The keys to hold at `now`: those still published, a key signing now, and its
    successor (published ahead). Pure, so that rotation is testable without waiting."""
    kept = [key for key in keys if key.published_until > now]
    # A retired key covers the longest assertion lifetime any run gave it.
    kept = [attrs.evolve(key, published_until=max(key.published_until, key.signs_until + lifetime +
                                                   CLOCK_SKEW_MARGIN)) for key in kept]
    signing = [key for key in kept if key.signs_from <= now < key.signs_until]
    if signing:
        current = max(signing, key=lambda key: key.signs_from)
    else:
        current = SigningKey.generate(now, now + rotation, lifetime)
        kept.append(current)
    if not any(key.signs_from >= current.signs_until for key in kept):
        kept.append(SigningKey.generate(current.signs_until, current.signs_until + rotation, lifetime))
    return sorted(kept, key=lambda key: key.signs_from)


def current_key(keys: list[SigningKey], now: float) -> SigningKey:
    return max((key for key in keys if key.signs_from <= now), key=lambda key: key.signs_from)


def next_change(keys: list[SigningKey], now: float) -> float:
    """When `schedule` will next hand over or drop a key."""
    return min([current_key(keys, now).signs_until, *(key.published_until for key in keys)])


def jwks(keys: list[SigningKey], now: float) -> dict[str, list[dict[str, str]]]:
    """The JWK Set: the signing key first, then its successor, then retired ones."""
    current = current_key(keys, now)
    ordered = [current] + [key for key in keys if key.signs_from > now] + \
              [key for key in reversed(keys) if key.signs_from < current.signs_from]
    return {"keys": [key.public_jwk() for key in ordered]}


class KeyDirectory:
    """The private keys' directory: the proxy's account's alone (checked, not assumed:
    in spawn mode it may sit in a state directory tailscaled's account owns, which could
    plant a directory or a link of its own there). Every access goes through one
    descriptor of the checked directory."""

    def __init__(self, path: Path, follow_symlinks: bool):
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
            self._fd = os.open(path, flags)
        except OSError as exc:
            raise AssertionSetupError("assertionKeyDir", f"cannot create or open {path}: {exc.strerror}") from None
        info = os.fstat(self._fd)
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
            os.close(self._fd)
            raise AssertionSetupError(
                "assertionKeyDir", f"{path} belongs to uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}; "
                f"it must be uid {os.geteuid()}'s (this process) and private (0700). Remove it and tsnsrv makes it")

    def load(self) -> list[SigningKey]:
        try:
            fd = os.open(KEYS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fd)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise AssertionSetupError("assertionKeyDir", f"cannot open {self.path / KEYS_FILE}: {exc.strerror}") \
                from None
        with os.fdopen(fd, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
                raise AssertionSetupError("assertionKeyDir", f"{self.path / KEYS_FILE} is not a plain file of this "
                                                             "process's own; remove it")
            try:
                return [SigningKey.from_record(record) for record in json.load(file)["keys"]]
            except (ValueError, KeyError, TypeError, jwt.InvalidKeyError) as exc:
                raise AssertionSetupError("assertionKeyDir", f"{self.path / KEYS_FILE} is not a key file tsnsrv "
                                                             f"wrote ({exc}); remove it") from None

    def save(self, keys: list[SigningKey]) -> None:
        data = json.dumps({"keys": [key.record() for key in keys]}, indent=1).encode()
        _replace_file(self._fd, KEYS_FILE, data, 0o600)

    def close(self) -> None:
        os.close(self._fd)


def _replace_file(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Write `name` in the directory as a whole: readers see the old or the new content."""
    temporary = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # whatever the umask (NixOS units run with 0077)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def write_jwks_file(path: Path, data: bytes) -> None:
    """The public keys, readable by everyone (they are public; what matters is that only
    we can replace them, which the directory's permissions decide)."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _replace_file(dir_fd, path.name, data, 0o644)
    finally:
        os.close(dir_fd)


# --- signing ---------------------------------------------------------------------


def identity_claims(identity: Identity) -> dict[str, Any]:
    """What the assertion says about the client, spelled as the X-Tailscale-* headers spell it."""
    return {"sub": f"userid:{identity.user_id}", "login": identity.login_name, "name": identity.display_name,
            "node": identity.node_name, "node_id": f"nodeid:{identity.node_id}", "tags": list(identity.node_tags)}


def _cache_key(identity: Identity) -> tuple:
    return (identity.user_id, identity.login_name, identity.display_name, identity.node_id, identity.node_name,
            identity.node_tags)


class Asserter:
    """Makes the assertion header of each request and keeps the keys current."""

    def __init__(self, cfg: ServiceConfig, directory: KeyDirectory, clock: Clock = time.time):
        self.audience = cfg.assertion_audience or cfg.name
        self.lifetime = cfg.assertion_lifetime
        self.rotation = cfg.assertion_key_rotation
        self.bind_request = cfg.assertion_bind_request
        self.jwks_file = cfg.assertion_jwks_file
        self.issuer = ""
        self._clock = clock
        self._directory = directory
        # Reused while at least this much of an unbound assertion's life is left.
        self._reuse_margin = max(1.0, min(10.0, self.lifetime / 2))
        self._cache: OrderedDict[tuple, tuple[str, float]] = OrderedDict()
        now = clock()
        self.keys = schedule(directory.load(), now, self.rotation, self.lifetime)
        self._apply(now)
        self._persist()

    # The request path ------------------------------------------------------------

    def headers(self, identity: Identity | None, method: str, target: str) -> list[tuple[str, str]]:
        """The assertion header for a request (none without a tailnet identity).

        `target` is the request target as the upstream receives it (path and query)."""
        if identity is None:
            return []
        now = self._clock()
        if self.bind_request:
            token, _expires = self._sign({**identity_claims(identity), "htm": method, "htu": target}, now)
            return [(HEADER, token)]
        key = _cache_key(identity)
        cached = self._cache.get(key)
        if cached is not None and now < cached[1]:
            self._cache.move_to_end(key)
            return [(HEADER, cached[0])]
        token, expires = self._sign(identity_claims(identity), now)
        self._cache[key] = (token, expires - self._reuse_margin)
        self._cache.move_to_end(key)
        if len(self._cache) > MAX_CACHED_IDENTITIES:
            self._cache.popitem(last=False)
        return [(HEADER, token)]

    def _sign(self, claims: dict[str, Any], now: float) -> tuple[str, int]:
        """A compact JWS of `claims`, and when it expires."""
        issued = int(now)
        expires = int(issued + self.lifetime)
        payload = {"iss": self.issuer, "aud": self.audience, **claims, "iat": issued, "exp": expires,
                   "jti": secrets.token_urlsafe(12)}
        token = jwt.encode(payload, self._signing.private, algorithm="EdDSA", headers={"kid": self._signing.kid})
        return token, expires

    def set_issuer(self, url: str) -> None:
        """The service's URL (known once the node is up); assertions made for another are dropped."""
        issuer = url.rstrip("/")
        if issuer != self.issuer:
            self.issuer = issuer
            self._cache.clear()

    # Keys ------------------------------------------------------------------------

    @property
    def jwks_bytes(self) -> bytes:
        return self._jwks

    def _apply(self, now: float) -> None:
        self._signing = current_key(self.keys, now)
        self._jwks = json.dumps(jwks(self.keys, now), indent=1).encode() + b"\n"
        self._cache.clear()

    def _persist(self) -> None:
        """Keys first, then the JWKS: a key is never published without being kept."""
        try:
            self._directory.save(self.keys)
        except OSError as exc:
            raise AssertionSetupError("assertionKeyDir", f"cannot write {self._directory.path / KEYS_FILE}: "
                                                         f"{exc.strerror}") from None
        if self.jwks_file is not None:
            try:
                write_jwks_file(self.jwks_file, self._jwks)
            except OSError as exc:
                raise AssertionSetupError("assertionJwksFile", f"cannot write {self.jwks_file}: {exc.strerror}") \
                    from None

    async def keep_keys_current(self) -> None:
        """Hand over to the next key when its time comes, and drop keys nobody can need."""
        while True:
            now = self._clock()
            await asyncio.sleep(max(0.0, next_change(self.keys, now) - now))
            try:
                self.renew(self._clock())
            except AssertionSetupError as exc:
                log.error("identity assertions: cannot store the next keys (%s); signing with the current one, "
                          "retrying in %gs", exc, RETRY_AFTER_WRITE_FAILURE)
                await asyncio.sleep(RETRY_AFTER_WRITE_FAILURE)

    def renew(self, now: float) -> None:
        """Bring the keys, the JWKS file and the signing key to what `schedule` says for
        `now`; if they cannot be stored, nothing changes (what is published stays valid)."""
        renewed = schedule(self.keys, now, self.rotation, self.lifetime)
        if renewed == self.keys:
            return
        previous = self.keys, self._signing, self._jwks
        self.keys = renewed
        self._apply(now)
        try:
            self._persist()
        except AssertionSetupError:
            self.keys, self._signing, self._jwks = previous
            raise
        if self._signing.kid != previous[1].kid:
            published = {key.kid: _when(key.published_until) for key in self.keys}
            log.info("identity assertions: key %s signs now (until %s); %s stays published until %s",
                     self._signing.kid, _when(self._signing.signs_until), previous[1].kid,
                     published.get(previous[1].kid, "now"))

    def describe(self) -> str:
        upcoming = [key for key in self.keys if key.signs_from > self._signing.signs_from]
        where = f"; JWKS in {self.jwks_file}" if self.jwks_file else ""
        return (f"identity assertions for audience {self.audience!r}, signed with key {self._signing.kid} until "
                f"{_when(self._signing.signs_until)} (next: {upcoming[0].kid if upcoming else '-'}){where}")


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
