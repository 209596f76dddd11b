"""TLS certificates for the front listener (tsnsrv.tlscerts), with real certificates from trustme.

Proves the hand-written DER notAfter reader against `cryptography`, that the server
context really serves the certificate (an in-memory TLS handshake), and how the
CertificateKeeper swaps certificates and survives failed renewals.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from tsnsrv import tlscerts
from tsnsrv.tlscerts import (
    MIN_VALIDITY,
    CertificateError,
    CertificateKeeper,
    LoadedCertificate,
    certificate_not_after,
    file_loader,
    localapi_loader,
    server_context,
)

UTC = dt.timezone.utc
HOST = "books.tail1234.ts.net"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def issue(ca: trustme.CA, not_after: dt.datetime, key_type=trustme.KeyType.ECDSA,
          not_before: dt.datetime | None = None) -> trustme.LeafCert:
    return ca.issue_cert(HOST, not_before=not_before or dt.datetime(2020, 1, 1, tzinfo=UTC), not_after=not_after,
                         key_type=key_type)


def pem_pair(leaf: trustme.LeafCert) -> tuple[bytes, bytes]:
    return leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes()


# --- notAfter --------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def test_not_after_of_a_utctime_certificate(ca, key_type):
    expiry = dt.datetime(2031, 6, 1, 12, 34, 56, tzinfo=UTC)
    cert_pem, _ = pem_pair(issue(ca, expiry, key_type))
    assert certificate_not_after(cert_pem) == expiry


def test_not_after_beyond_2049_is_generalized_time(ca):
    expiry = dt.datetime(2061, 2, 3, 4, 5, 6, tzinfo=UTC)
    cert_pem, _ = pem_pair(issue(ca, expiry))
    assert certificate_not_after(cert_pem) == expiry


def test_not_after_of_a_chain_is_the_first_certificate(ca):
    leaf = issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC))
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + ca.cert_pem.bytes()
    assert certificate_not_after(chain) == dt.datetime(2030, 1, 1, tzinfo=UTC)


def test_not_after_of_a_key_then_cert_bundle(ca):
    leaf = issue(ca, dt.datetime(2029, 9, 9, tzinfo=UTC))
    assert certificate_not_after(leaf.private_key_and_cert_chain_pem.bytes()) == dt.datetime(2029, 9, 9, tzinfo=UTC)


@settings(max_examples=15)
@given(st.datetimes(min_value=dt.datetime(2021, 1, 1), max_value=dt.datetime(2099, 12, 31)))
def test_not_after_agrees_with_cryptography(expiry):
    leaf = trustme.CA().issue_cert(HOST, not_after=expiry.replace(microsecond=0, tzinfo=UTC))
    cert_pem = leaf.cert_chain_pems[0].bytes()
    assert certificate_not_after(cert_pem) == x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


@pytest.mark.parametrize("pem", [
    b"",
    b"not a certificate",
    b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(b"\x30\x82\x01") + b"\n-----END CERTIFICATE-----\n",
])
def test_unreadable_certificates_raise_certificate_error(pem):
    with pytest.raises(CertificateError, match="cannot read the certificate's expiry"):
        certificate_not_after(pem)


def test_truncated_certificate_raises_certificate_error(ca):
    cert_pem, _ = pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC)))
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    truncated = b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(der[:120]) + b"\n-----END CERTIFICATE-----\n"
    with pytest.raises(CertificateError):
        certificate_not_after(truncated)


def test_garbled_not_after_raises_certificate_error(ca):
    expiry = dt.datetime(2031, 6, 1, 12, 34, 56, tzinfo=UTC)
    cert_pem, _ = pem_pair(issue(ca, expiry))
    der = base64.b64decode("".join(cert_pem.decode().splitlines()[1:-1]))
    stamp = b"310601123456Z"
    assert der.count(stamp) == 1
    garbled = der.replace(stamp, b"99X9XX123456Z")
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(garbled) + b"\n-----END CERTIFICATE-----\n"
    with pytest.raises(CertificateError):
        certificate_not_after(pem)


# --- the server context ---------------------------------------------------------------


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> ssl.SSLObject:
    """A TLS handshake in memory; returns the client's side."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side, out, peer_in in (("client", client_side, c_out, s_in), ("server", server_side, s_out, c_in)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return client_side
    raise AssertionError("handshake did not finish")


def test_server_context_serves_the_certificate(ca):
    cert_pem, key_pem = pem_pair(issue(ca, dt.datetime(2040, 1, 1, tzinfo=UTC)))
    server = server_context(cert_pem, key_pem)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.set_alpn_protocols(["h2", "http/1.1"])
    side = handshake(server, client, HOST)
    assert side.selected_alpn_protocol() == "http/1.1"
    assert side.getpeercert()["subjectAltName"] == (("DNS", HOST),)


def test_server_context_refuses_a_key_of_another_certificate(ca):
    cert_pem, _ = pem_pair(issue(ca, dt.datetime(2040, 1, 1, tzinfo=UTC)))
    _, other_key = pem_pair(issue(ca, dt.datetime(2040, 1, 1, tzinfo=UTC)))
    with pytest.raises(CertificateError, match="certificate and key do not load"):
        server_context(cert_pem, other_key)


# --- the keeper -----------------------------------------------------------------------


class Loader:
    def __init__(self, *pairs: tuple[bytes, bytes]):
        self.pairs = list(pairs)
        self.calls = 0
        self.error: Exception | None = None

    async def __call__(self) -> tuple[bytes, bytes, str]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        cert_pem, key_pem = self.pairs[min(self.calls, len(self.pairs)) - 1]
        return cert_pem, key_pem, f"load #{self.calls}"


@pytest.mark.asyncio
async def test_keeper_swaps_only_when_the_certificate_changes(ca):
    first = pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC)))
    renewed = pem_pair(issue(ca, dt.datetime(2030, 4, 1, tzinfo=UTC)))
    loader, changes = Loader(first, first, renewed), []
    keeper = CertificateKeeper(loader, changes.append)
    one = await keeper.refresh()
    assert isinstance(one, LoadedCertificate) and one.source == "load #1"
    assert one.not_after == dt.datetime(2030, 1, 1, tzinfo=UTC)
    assert await keeper.refresh() is one
    two = await keeper.refresh()
    assert two.not_after == dt.datetime(2030, 4, 1, tzinfo=UTC)
    assert changes == [one, two] and keeper.current is two


@pytest.mark.asyncio
async def test_keeper_loads_an_expired_certificate_and_reports_its_expiry(ca):
    # Expiry is tailscaled's to renew (min_validity); the keeper reports it for /health and metrics.
    expired = issue(ca, dt.datetime(2021, 1, 1, tzinfo=UTC), not_before=dt.datetime(2020, 1, 1, tzinfo=UTC))
    keeper = CertificateKeeper(Loader(pem_pair(expired)), lambda loaded: None)
    loaded = await keeper.refresh()
    assert loaded.not_after < dt.datetime.now(UTC)


@pytest.mark.asyncio
async def test_keeper_keeps_the_current_certificate_when_renewal_fails(ca):
    loader = Loader(pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC))))
    changes: list[LoadedCertificate] = []
    keeper = CertificateKeeper(loader, changes.append)
    current = await keeper.refresh()
    loader.error = CertificateError("tailscaled said no")
    with pytest.raises(CertificateError):
        await keeper.refresh()
    assert keeper.current is current and changes == [current]

    task = asyncio.create_task(keeper.run(interval=0))
    while loader.calls < 5:
        await asyncio.sleep(0)
    assert not task.done()  # failures are logged, the loop goes on
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert keeper.current is current and changes == [current]


@pytest.mark.asyncio
async def test_keeper_refuses_a_pair_that_does_not_load(ca):
    cert_pem, _ = pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC)))
    keeper = CertificateKeeper(Loader((cert_pem, b"garbage")), lambda loaded: None)
    with pytest.raises(CertificateError):
        await keeper.refresh()
    assert keeper.current is None


# --- loaders ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_file_loader_reads_both_files(ca, tmp_path):
    cert_pem, key_pem = pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC)))
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    load = file_loader(tmp_path / "cert.pem", tmp_path / "key.pem")
    assert await load() == (cert_pem, key_pem, str(tmp_path / "cert.pem"))


@pytest.mark.asyncio
async def test_file_loader_names_the_missing_file(tmp_path):
    (tmp_path / "cert.pem").write_bytes(b"x")
    load = file_loader(tmp_path / "cert.pem", tmp_path / "key.pem")
    with pytest.raises(CertificateError, match=f"cannot read {tmp_path / 'key.pem'}: No such file"):
        await load()


@pytest.mark.asyncio
async def test_localapi_loader_asks_for_fourteen_days_of_validity():
    calls = []

    async def cert_pair(domain: str, min_validity: int) -> tuple[bytes, bytes]:
        calls.append((domain, min_validity))
        return b"KEY", b"CERT"

    load = localapi_loader(cert_pair, lambda: HOST)
    assert await load() == (b"CERT", b"KEY", f"tailscaled (certificate for {HOST})")
    assert calls == [(HOST, 14 * 24 * 3600)]
    assert MIN_VALIDITY == dt.timedelta(days=14)
    assert tlscerts.CHECK_INTERVAL == 3600.0
