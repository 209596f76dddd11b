"""TLS for the front listener: the node's *.ts.net certificate from the LocalAPI, or files.

Certificates are renewed (or re-read, for files that ACME rewrites) in the
background and swapped in for new connections; open connections keep the context
they started with.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs

log = logging.getLogger(__name__)

# Ask tailscaled for a certificate valid at least this long; it renews when less is left.
MIN_VALIDITY = dt.timedelta(days=14)
CHECK_INTERVAL = 3600.0


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


def certificate_not_after(pem: bytes) -> dt.datetime:
    """Expiry of the first certificate in a PEM chain (X.509 validity.notAfter)."""
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
        not_before_end = _der_element(der, validity)[2]
        tag, start, end = _der_element(der, not_before_end)
        stamp = der[start:end].decode("ascii")
        layout = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"  # UTCTime or GeneralizedTime
        return dt.datetime.strptime(stamp, layout).replace(tzinfo=dt.timezone.utc)
    except (IndexError, ValueError) as exc:
        raise CertificateError(f"cannot read the certificate's expiry: {exc}") from None


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
    not_after: dt.datetime
    source: str


CertificateLoader = Callable[[], Awaitable[tuple[bytes, bytes, str]]]  # -> cert PEM, key PEM, description


class CertificateKeeper:
    """Keeps a current server context and calls `on_change` whenever it is replaced."""

    def __init__(self, load: CertificateLoader, on_change: Callable[[LoadedCertificate], None]):
        self._load = load
        self._on_change = on_change
        self.current: LoadedCertificate | None = None
        self._fingerprint: bytes = b""

    async def refresh(self) -> LoadedCertificate:
        cert_pem, key_pem, source = await self._load()
        if self.current is not None and cert_pem == self._fingerprint:
            return self.current
        loaded = LoadedCertificate(server_context(cert_pem, key_pem), certificate_not_after(cert_pem), source)
        self._fingerprint = cert_pem
        self.current = loaded
        log.info("serving TLS certificate from %s, valid until %s", source, loaded.not_after.isoformat())
        self._on_change(loaded)
        return loaded

    async def run(self, interval: float = CHECK_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep serving the old certificate, and say so
                log.warning("certificate renewal failed, still serving the current one: %s", exc)


def file_loader(cert_file: Path, key_file: Path) -> CertificateLoader:
    async def load() -> tuple[bytes, bytes, str]:
        try:
            return cert_file.read_bytes(), key_file.read_bytes(), str(cert_file)
        except OSError as exc:
            raise CertificateError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return load


def localapi_loader(cert_pair: Callable[[str, int], Awaitable[tuple[bytes, bytes]]],
                    domain: Callable[[], str]) -> CertificateLoader:
    async def load() -> tuple[bytes, bytes, str]:
        name = domain()
        key_pem, cert_pem = await cert_pair(name, int(MIN_VALIDITY.total_seconds()))
        return cert_pem, key_pem, f"tailscaled (certificate for {name})"
    return load
