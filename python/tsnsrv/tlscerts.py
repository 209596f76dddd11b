"""TLS for the front listener: the node's certificate from tailscaled (LocalAPI), or files.

Certificates are renewed (or re-read, for files that ACME rewrites) in the background
and swapped in for new connections; open connections keep the context they started
with.

When to renew. tailscaled's LocalAPI hands out its cached certificate, and renews it
first (synchronously) when it is asked for `min_validity` longer than what is left.
Asking for a fixed 14 days, as tsnsrv did, makes every call issue a new certificate once
certificates are shorter than that (public CAs are moving to 6-day certificates), until
the CA's rate limits refuse. So tsnsrv renews once two thirds of the certificate's
lifetime have passed -- the rule Let's Encrypt recommends and tailscaled's own background
renewal falls back to -- by asking for a third of the lifetime (plus a second) then.
Before that point it asks without `min_validity`, which returns the cached certificate
(or one tailscaled renewed by itself: asked that way, it renews in the background once
the window the CA's renewal information suggests has come, for Let's Encrypt's 6-day
certificates halfway through), so a restart never waits for the CA while a valid
certificate is cached. It looks at least every hour and again just after the renewal
point; a failed renewal is retried after a tenth of the time left (between 5 s and an
hour), serving the current certificate meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import math
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import attrs

log = logging.getLogger(__name__)

RENEW_AFTER = 2 / 3         # of the certificate's lifetime
CHECK_INTERVAL = 3600.0     # longest wait between asking tailscaled
FILE_CHECK_INTERVAL = 300.0  # re-read certificate files this often (besides SIGHUP)
RETRY_FRACTION = 0.1        # after a failed renewal, wait this fraction of the time left
RETRY_MIN, RETRY_MAX = 5.0, 3600.0
RENEWAL_SLACK = 1.0         # seconds past the renewal point, so that tailscaled sees less than asked for left


class CertificateError(Exception):
    pass


def _der_element(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at offset."""
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[offset:offset + count], "big")
        offset += count
    return tag, offset, offset + length


def certificate_validity(pem: bytes) -> tuple[dt.datetime, dt.datetime]:
    """(notBefore, notAfter) of the first certificate in a PEM chain (X.509 validity)."""
    text = pem.decode("ascii", errors="replace")
    try:
        body = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
        der = base64.b64decode("".join(body.split()))
        _, cert_start, _ = _der_element(der, 0)           # Certificate
        _, position, _ = _der_element(der, cert_start)    # tbsCertificate
        if der[position] == 0xA0:                         # [0] version
            position = _der_element(der, position)[2]
        for _ in range(3):                                # serialNumber, signature, issuer
            position = _der_element(der, position)[2]
        _, validity, _ = _der_element(der, position)
        not_before = _der_time(der, validity)
        not_after = _der_time(der, _der_element(der, validity)[2])
        return not_before, not_after
    except (IndexError, ValueError) as exc:
        raise CertificateError(f"cannot read the certificate's validity: {exc}") from None


def _der_time(der: bytes, offset: int) -> dt.datetime:
    tag, start, end = _der_element(der, offset)
    stamp = der[start:end].decode("ascii")
    layout = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"  # UTCTime or GeneralizedTime
    return dt.datetime.strptime(stamp, layout).replace(tzinfo=dt.timezone.utc)


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS server context from PEM bytes (via a private temporary file: ssl loads from paths only)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    with tempfile.TemporaryDirectory(prefix="tsnsrv-cert-") as directory:
        path = Path(directory) / "pair.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem + b"\n" + cert_pem)
        try:
            context.load_cert_chain(path)
        except ssl.SSLError as exc:
            raise CertificateError(f"certificate and key do not load: {exc}") from None
    return context


@attrs.define
class LoadedCertificate:
    context: ssl.SSLContext
    not_before: dt.datetime
    not_after: dt.datetime
    source: str
    cert_pem: bytes

    @property
    def renew_at(self) -> dt.datetime:
        return self.not_before + (self.not_after - self.not_before) * RENEW_AFTER

    def retry_delay(self, now: dt.datetime) -> float:
        """Seconds to wait after a failed renewal: a tenth of the time left, within bounds."""
        left = (self.not_after - now).total_seconds()
        return min(RETRY_MAX, max(RETRY_MIN, left * RETRY_FRACTION))


class CertificateUnavailable(Exception):
    """tailscaled could not get a certificate now (the CA is unreachable or refused); worth retrying."""


class CertificateSource(Protocol):
    async def fetch(self, current: LoadedCertificate | None, now: dt.datetime) -> tuple[bytes, bytes, str]:
        """The certificate chain and key PEM to serve next, and where they came from."""

    def next_check(self, current: LoadedCertificate, now: dt.datetime) -> float:
        """Seconds until the source should be asked again."""


@attrs.frozen
class FileCertificates:
    """The operator's certificate files (e.g. from NixOS's security.acme), re-read periodically."""

    cert_file: Path
    key_file: Path

    async def fetch(self, current: LoadedCertificate | None, now: dt.datetime) -> tuple[bytes, bytes, str]:
        try:
            return self.cert_file.read_bytes(), self.key_file.read_bytes(), str(self.cert_file)
        except OSError as exc:
            raise CertificateError(f"cannot read {exc.filename}: {exc.strerror}") from None

    def next_check(self, current: LoadedCertificate, now: dt.datetime) -> float:
        return FILE_CHECK_INTERVAL


CertPair = Callable[[str, int], Awaitable[tuple[bytes, bytes]]]  # (domain, min_validity s) -> key PEM, cert PEM


@attrs.frozen
class TailscaleCertificates:
    """The node's certificate from tailscaled, renewed at two thirds of its lifetime (see above)."""

    cert_pair: CertPair
    domain: Callable[[], str]
    unavailable: tuple[type[Exception], ...] = ()  # the LocalAPI's "could not get one" errors

    async def fetch(self, current: LoadedCertificate | None, now: dt.datetime) -> tuple[bytes, bytes, str]:
        name = self.domain()
        renewing = current if current is not None and now >= current.renew_at else None
        # Past the renewal point, ask for more than is left: tailscaled then renews before answering.
        min_validity = 0 if renewing is None else \
            math.ceil((renewing.not_after - renewing.renew_at).total_seconds() + RENEWAL_SLACK)
        try:
            key_pem, cert_pem = await self.cert_pair(name, min_validity)
        except self.unavailable as exc:
            raise CertificateUnavailable(f"tailscaled could not get a certificate for {name}: {exc}") from None
        if renewing is not None and cert_pem == renewing.cert_pem:
            raise CertificateUnavailable(f"tailscaled did not renew the certificate for {name}, valid until "
                                         f"{renewing.not_after.isoformat()}")
        return cert_pem, key_pem, f"tailscaled (certificate for {name})"

    def next_check(self, current: LoadedCertificate, now: dt.datetime) -> float:
        until_renewal = (current.renew_at - now).total_seconds() + RENEWAL_SLACK
        return min(CHECK_INTERVAL, max(0.0, until_renewal))


class CertificateKeeper:
    """Keeps a current server context from `source`; calls `on_change` whenever it is
    replaced and `on_problem` with what went wrong (None once it works again)."""

    def __init__(self, source: CertificateSource, on_change: Callable[[LoadedCertificate], None],
                 on_problem: Callable[[str | None], None] = lambda problem: None):
        self.source = source
        self._on_change = on_change
        self._on_problem = on_problem
        self.current: LoadedCertificate | None = None

    async def refresh(self) -> LoadedCertificate:
        try:
            loaded = await self._refresh()
        except (CertificateError, CertificateUnavailable) as exc:
            self._on_problem(str(exc))
            raise
        self._on_problem(None)
        return loaded

    async def _refresh(self) -> LoadedCertificate:
        cert_pem, key_pem, source = await self.source.fetch(self.current, _now())
        if self.current is not None and cert_pem == self.current.cert_pem:
            return self.current
        not_before, not_after = certificate_validity(cert_pem)
        loaded = LoadedCertificate(server_context(cert_pem, key_pem), not_before, not_after, source, cert_pem)
        self.current = loaded
        log.info("serving TLS certificate from %s, valid until %s", source, not_after.isoformat())
        self._on_change(loaded)
        return loaded

    async def run(self) -> None:
        """Refresh from now on, as the source says; failures keep the current certificate."""
        assert self.current is not None, "refresh() once before run()"
        delay = self.source.next_check(self.current, _now())
        while True:
            await asyncio.sleep(delay)
            try:
                current = await self.refresh()
                delay = self.source.next_check(current, _now())
            except Exception as exc:  # noqa: BLE001 - keep serving the old certificate, and say so
                delay = self.current.retry_delay(_now())
                log.warning("certificate renewal failed, still serving the one valid until %s; retrying in %.0fs: "
                            "%s", self.current.not_after.isoformat(), delay, exc)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
