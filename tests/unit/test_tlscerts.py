"""TLS certificates for the front listener (tsnsrv.tlscerts), with real certificates from trustme.

Proves the hand-written DER validity reader against `cryptography`, that the server
context really serves the certificate (an in-memory TLS handshake), when tsnsrv asks
tailscaled to renew (two thirds into the lifetime, for any lifetime), and how the
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
    CertificateError,
    CertificateKeeper,
    CertificateUnavailable,
    FileCertificates,
    LoadedCertificate,
    TailscaleCertificates,
    certificate_validity,
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


# --- validity -----------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def test_validity_of_a_utctime_certificate(ca, key_type):
    start, expiry = dt.datetime(2030, 6, 1, 1, 2, 3, tzinfo=UTC), dt.datetime(2031, 6, 1, 12, 34, 56, tzinfo=UTC)
    cert_pem, _ = pem_pair(issue(ca, expiry, key_type, not_before=start))
    assert certificate_validity(cert_pem) == (start, expiry)


def not_after(pem: bytes) -> dt.datetime:
    return certificate_validity(pem)[1]


def test_not_after_beyond_2049_is_generalized_time(ca):
    expiry = dt.datetime(2061, 2, 3, 4, 5, 6, tzinfo=UTC)
    cert_pem, _ = pem_pair(issue(ca, expiry))
    assert not_after(cert_pem) == expiry


def test_not_after_of_a_chain_is_the_first_certificate(ca):
    leaf = issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC))
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems) + ca.cert_pem.bytes()
    assert not_after(chain) == dt.datetime(2030, 1, 1, tzinfo=UTC)


def test_not_after_of_a_key_then_cert_bundle(ca):
    leaf = issue(ca, dt.datetime(2029, 9, 9, tzinfo=UTC))
    assert not_after(leaf.private_key_and_cert_chain_pem.bytes()) == dt.datetime(2029, 9, 9, tzinfo=UTC)


@settings(max_examples=15)
@given(st.datetimes(min_value=dt.datetime(2021, 1, 1), max_value=dt.datetime(2099, 12, 31)))
def test_validity_agrees_with_cryptography(expiry):
    leaf = trustme.CA().issue_cert(HOST, not_after=expiry.replace(microsecond=0, tzinfo=UTC))
    cert_pem = leaf.cert_chain_pems[0].bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert certificate_validity(cert_pem) == (cert.not_valid_before_utc, cert.not_valid_after_utc)


@pytest.mark.parametrize("pem", [
    b"",
    b"not a certificate",
    b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(b"\x30\x82\x01") + b"\n-----END CERTIFICATE-----\n",
])
def test_unreadable_certificates_raise_certificate_error(pem):
    with pytest.raises(CertificateError, match="cannot read the certificate's validity"):
        not_after(pem)


def test_truncated_certificate_raises_certificate_error(ca):
    cert_pem, _ = pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC)))
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    truncated = b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(der[:120]) + b"\n-----END CERTIFICATE-----\n"
    with pytest.raises(CertificateError):
        not_after(truncated)


def test_garbled_not_after_raises_certificate_error(ca):
    expiry = dt.datetime(2031, 6, 1, 12, 34, 56, tzinfo=UTC)
    cert_pem, _ = pem_pair(issue(ca, expiry))
    der = base64.b64decode("".join(cert_pem.decode().splitlines()[1:-1]))
    stamp = b"310601123456Z"
    assert der.count(stamp) == 1
    garbled = der.replace(stamp, b"99X9XX123456Z")
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(garbled) + b"\n-----END CERTIFICATE-----\n"
    with pytest.raises(CertificateError):
        not_after(pem)


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


# --- when tsnsrv asks tailscaled to renew ---------------------------------------------------


def loaded(ca: trustme.CA, not_before: dt.datetime, not_after: dt.datetime) -> LoadedCertificate:
    cert_pem, key_pem = pem_pair(issue(ca, not_after, not_before=not_before))
    return LoadedCertificate(server_context(cert_pem, key_pem), not_before, not_after, "test", cert_pem)


class LocalAPICerts:
    """tailscaled's cert endpoint: records each (domain, min_validity) and answers with `pair`."""

    def __init__(self, pair: tuple[bytes, bytes]):
        self.pair = pair
        self.asked: list[tuple[str, int]] = []
        self.error: Exception | None = None

    async def __call__(self, domain: str, min_validity: int) -> tuple[bytes, bytes]:
        self.asked.append((domain, min_validity))
        if self.error is not None:
            raise self.error
        cert_pem, key_pem = self.pair
        return key_pem, cert_pem


class Refused(Exception):
    pass


def tailscale_source(api: LocalAPICerts) -> TailscaleCertificates:
    return TailscaleCertificates(api, lambda: HOST, unavailable=(Refused,))


@pytest.mark.parametrize("lifetime", [dt.timedelta(days=90), dt.timedelta(days=6), dt.timedelta(seconds=60)])
@pytest.mark.asyncio
async def test_renewal_is_asked_for_two_thirds_into_any_lifetime(ca, lifetime):
    start = dt.datetime(2030, 1, 1, tzinfo=UTC)
    current = loaded(ca, start, start + lifetime)
    api = LocalAPICerts(pem_pair(issue(ca, start + 2 * lifetime, not_before=start + lifetime / 2)))
    source = tailscale_source(api)
    renew_at = start + lifetime * 2 / 3

    before = renew_at - dt.timedelta(seconds=2)
    await source.fetch(current, before)
    assert source.next_check(current, before) == pytest.approx(min(3.0, tlscerts.CHECK_INTERVAL))
    await source.fetch(current, renew_at + dt.timedelta(seconds=1))
    # before the renewal point: whatever tailscaled holds; after it: more than is left, so it renews
    third = int((start + lifetime - renew_at).total_seconds())
    assert api.asked == [(HOST, 0), (HOST, third + 1)]
    assert source.next_check(current, renew_at + dt.timedelta(seconds=5)) == 0.0


@pytest.mark.asyncio
async def test_the_first_certificate_is_whatever_tailscaled_holds(ca):
    api = LocalAPICerts(pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC))))
    cert_pem, key_pem, source = await tailscale_source(api).fetch(None, dt.datetime(2029, 1, 1, tzinfo=UTC))
    assert api.asked == [(HOST, 0)]
    assert (cert_pem, key_pem) == api.pair and source == f"tailscaled (certificate for {HOST})"


@pytest.mark.asyncio
async def test_a_long_lived_certificate_is_checked_hourly(ca):
    start = dt.datetime(2030, 1, 1, tzinfo=UTC)
    current = loaded(ca, start, start + dt.timedelta(days=90))
    assert tailscale_source(LocalAPICerts((b"", b""))).next_check(current, start) == tlscerts.CHECK_INTERVAL


@pytest.mark.asyncio
async def test_the_same_certificate_after_the_renewal_point_is_a_failed_renewal(ca):
    start = dt.datetime(2030, 1, 1, tzinfo=UTC)
    current = loaded(ca, start, start + dt.timedelta(days=6))
    source = tailscale_source(LocalAPICerts((current.cert_pem, b"KEY")))
    with pytest.raises(CertificateUnavailable, match="did not renew"):
        await source.fetch(current, start + dt.timedelta(days=5))
    assert (await source.fetch(current, start + dt.timedelta(days=1)))[0] == current.cert_pem


@pytest.mark.asyncio
async def test_tailscaled_failing_to_get_one_is_unavailable_not_fatal(ca):
    api = LocalAPICerts((b"", b""))
    api.error = Refused("HTTP 500: acme: urn:ietf:params:acme:error:rejectedIdentifier")
    with pytest.raises(CertificateUnavailable, match=f"could not get a certificate for {HOST}: .*rejectedIdentifier"):
        await tailscale_source(api).fetch(None, dt.datetime(2030, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(("left", "delay"), [(dt.timedelta(days=30), 3600.0), (dt.timedelta(hours=2), 720.0),
                                             (dt.timedelta(seconds=20), 5.0), (-dt.timedelta(hours=1), 5.0)])
def test_a_failed_renewal_is_retried_after_a_tenth_of_the_time_left(ca, left, delay):
    now = dt.datetime(2030, 1, 1, tzinfo=UTC)
    current = loaded(ca, now - dt.timedelta(days=1), now + left)
    assert current.retry_delay(now) == delay


# --- the keeper -----------------------------------------------------------------------


class Source:
    """A certificate source that hands out `pairs` in turn (the last one again and again)."""

    def __init__(self, *pairs: tuple[bytes, bytes], check_every: float = 3600.0):
        self.pairs = list(pairs)
        self.calls = 0
        self.error: Exception | None = None
        self.check_every = check_every
        self.seen: list[LoadedCertificate | None] = []

    async def fetch(self, current, now) -> tuple[bytes, bytes, str]:
        self.calls += 1
        self.seen.append(current)
        if self.error is not None:
            raise self.error
        cert_pem, key_pem = self.pairs[min(self.calls, len(self.pairs)) - 1]
        return cert_pem, key_pem, f"load #{self.calls}"

    def next_check(self, current, now) -> float:
        return self.check_every


@pytest.mark.asyncio
async def test_keeper_swaps_only_when_the_certificate_changes(ca):
    first = pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC)))
    renewed = pem_pair(issue(ca, dt.datetime(2030, 4, 1, tzinfo=UTC)))
    source, changes = Source(first, first, renewed), []
    keeper = CertificateKeeper(source, changes.append)
    one = await keeper.refresh()
    assert isinstance(one, LoadedCertificate) and one.source == "load #1"
    assert one.not_after == dt.datetime(2030, 1, 1, tzinfo=UTC)
    assert await keeper.refresh() is one
    two = await keeper.refresh()
    assert two.not_after == dt.datetime(2030, 4, 1, tzinfo=UTC)
    assert changes == [one, two] and keeper.current is two
    assert source.seen == [None, one, one], "the source decides from the certificate being served"


@pytest.mark.asyncio
async def test_keeper_loads_an_expired_certificate_and_reports_its_expiry(ca):
    # Renewal is tailscaled's to do when asked; the keeper reports the expiry for /health and metrics.
    expired = issue(ca, dt.datetime(2021, 1, 1, tzinfo=UTC), not_before=dt.datetime(2020, 1, 1, tzinfo=UTC))
    keeper = CertificateKeeper(Source(pem_pair(expired)), lambda loaded: None)
    current = await keeper.refresh()
    assert current.not_after < dt.datetime.now(UTC)


@pytest.mark.asyncio
async def test_keeper_keeps_the_current_certificate_when_renewal_fails(ca, monkeypatch):
    source = Source(pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC))), check_every=0)
    changes: list[LoadedCertificate] = []
    problems: list[str | None] = []
    keeper = CertificateKeeper(source, changes.append, problems.append)
    current = await keeper.refresh()
    source.error = CertificateUnavailable("tailscaled said no")
    with pytest.raises(CertificateUnavailable):
        await keeper.refresh()
    assert keeper.current is current and changes == [current]
    assert problems == [None, "tailscaled said no"]

    monkeypatch.setattr(tlscerts, "RETRY_MIN", 0.0)
    monkeypatch.setattr(LoadedCertificate, "retry_delay", lambda self, now: 0.0)
    task = asyncio.create_task(keeper.run())
    while source.calls < 5:
        await asyncio.sleep(0)
    assert not task.done()  # failures are logged, the loop goes on
    source.error = None
    while problems[-1] is not None:
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert keeper.current is current and changes == [current]


@pytest.mark.asyncio
async def test_keeper_refuses_a_pair_that_does_not_load(ca):
    cert_pem, _ = pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC)))
    keeper = CertificateKeeper(Source((cert_pem, b"garbage")), lambda loaded: None)
    with pytest.raises(CertificateError):
        await keeper.refresh()
    assert keeper.current is None


# --- certificate files ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_certificate_files_are_read_both_and_rechecked_every_five_minutes(ca, tmp_path):
    cert_pem, key_pem = pem_pair(issue(ca, dt.datetime(2030, 1, 1, tzinfo=UTC)))
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    files = FileCertificates(tmp_path / "cert.pem", tmp_path / "key.pem")
    now = dt.datetime.now(UTC)
    assert await files.fetch(None, now) == (cert_pem, key_pem, str(tmp_path / "cert.pem"))
    assert files.next_check(loaded(ca, now, now + dt.timedelta(minutes=1)), now) == 300.0


@pytest.mark.asyncio
async def test_certificate_files_name_the_missing_file(tmp_path):
    (tmp_path / "cert.pem").write_bytes(b"x")
    files = FileCertificates(tmp_path / "cert.pem", tmp_path / "key.pem")
    with pytest.raises(CertificateError, match=f"cannot read {tmp_path / 'key.pem'}: No such file"):
        await files.fetch(None, dt.datetime.now(UTC))
