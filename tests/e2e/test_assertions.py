"""Signed identity assertions over the real tailnet (docs/identity-assertions.md).

Three real upstreams verify tsnsrv's assertion, each with its ecosystem's usual JOSE
library (PyJWT, Node's jose, Go's go-jose; tests/harness/assertion_upstreams.py), once
for a service that binds assertions to their requests and once for one that does not.
Each must accept what tsnsrv asserts for real tailnet clients, and refuse what a local
process can forge by calling the upstream directly: forged identity headers with no
assertion, a self-signed assertion, a real one replayed after it expired, one of
another service, and a bound one replayed to another request. The keys rotate every
few seconds throughout, as they do, much more slowly, in production.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.assertion_upstreams import HEADER, LANGUAGES, VerifyingUpstream
from harness.processes import free_port, wait_for
from harness.tailnet import offline_env
from harness.tsnsrv import TAILSCALED_TEST_USER, Tsnsrv, get_unix, tsnsrv_command

# Short enough to see expiry and several key rotations within a test.
LIFETIME, ROTATION = 4, 4
MODES = [pytest.param(language, bound, id=f"{language}-{'bound' if bound else 'unbound'}")
         for language in LANGUAGES for bound in (False, True)]
FORGED_HEADERS = {"X-Tailscale-User": "userid:1", "X-Tailscale-User-LoginName": "alice",
                  "X-Tailscale-User-DisplayName": "alice", "X-Tailscale-Node-Name": "laptop",
                  "Tailscale-User-Login": "alice"}


@attrs.define
class Stack:
    """A tsnsrv service with assertions on, in front of one verifying upstream."""

    service: Tsnsrv
    verifier: VerifyingUpstream
    jwks_file: Path
    bound: bool


@pytest.fixture(scope="module")
def stacks(module_tsnsrv, service_root: Path) -> Iterator[Callable[[str, bool], Stack]]:
    started: dict[tuple[str, bool], Stack] = {}

    def stack(language: str, bound: bool) -> Stack:
        if (language, bound) not in started:
            workdir = Path(tempfile.mkdtemp(prefix=f"assert-{language}-", dir=service_root))
            workdir.chmod(0o711)
            public = workdir / "public"
            public.mkdir(mode=0o755)
            name = f"asserted-{language}-{'bound' if bound else 'unbound'}"
            port = free_port()
            flags = ["--assertions", "--assertion-jwks-file", str(public / "jwks.json"),
                     "--assertion-lifetime", str(LIFETIME), "--assertion-key-rotation", str(ROTATION)]
            service = module_tsnsrv(name, f"http://127.0.0.1:{port}", *flags,
                                    *(["--assertion-bind-request"] if bound else []), workdir=workdir)
            issuer = service.health()["node"]["url"].rstrip("/")
            verifier = VerifyingUpstream(language, workdir, port).start(public / "jwks.json", name, issuer, bound)
            started[language, bound] = Stack(service, verifier, public / "jwks.json", bound)
        return started[language, bound]

    yield stack
    for each in started.values():
        each.verifier.stop()


def through_tsnsrv(client: Any, stack: Stack, path: str = "/whoami", headers: tuple[str, ...] = ()) -> dict:
    """What the verifier answers a tailnet client's request through tsnsrv."""
    result = client.curl(*[arg for header in headers for arg in ("-H", header)], f"http://{stack.service.ip}{path}")
    body = json.loads(result.stdout)
    assert "identity" in body, body
    return body


def claims_of(assertion: str) -> dict:
    return jwt.decode(assertion, options={"verify_signature": False})


# --- what tsnsrv asserts is accepted ------------------------------------------------


@pytest.mark.parametrize("language,bound", MODES)
def test_every_client_is_verified_as_who_it_is(stacks, language, bound, laptop, bob_phone, ci_runner):
    stack = stacks(language, bound)

    alice = through_tsnsrv(laptop, stack)["identity"]
    bob = through_tsnsrv(bob_phone, stack)["identity"]
    ci = through_tsnsrv(ci_runner, stack)["identity"]

    assert (alice["login"], alice["node"], alice["tags"]) == ("alice", "laptop", [])
    assert re.fullmatch(r"userid:\d+", alice["sub"]) and re.fullmatch(r"nodeid:\d+", alice["node_id"])
    assert (bob["login"], bob["node"]) == ("bob", "phone")
    assert bob["sub"] != alice["sub"]
    assert (ci["login"], ci["name"], ci["node"], ci["tags"]) == \
           ("tagged-devices", "Tagged Devices", "ci-runner", ["tag:ci"])


@pytest.mark.parametrize("language,bound", MODES)
def test_a_client_cannot_bring_an_assertion_of_its_own(stacks, language, bound, laptop, ci_runner):
    stack = stacks(language, bound)
    stolen = through_tsnsrv(ci_runner, stack)["assertion"]  # genuine, for another client

    seen = through_tsnsrv(laptop, stack, headers=(f"{HEADER}: {stolen}",
                                                  f"{HEADER.replace('-', '_')}: {stolen}"))

    assert seen["identity"]["login"] == "alice"
    assert seen["assertion"] != stolen


# --- what a local process can forge is refused -------------------------------------------


@pytest.mark.parametrize("language,bound", MODES)
def test_forged_identity_headers_without_an_assertion_are_refused(stacks, language, bound):
    status, body = stacks(language, bound).verifier.call("/whoami", headers=FORGED_HEADERS)

    assert status == 401, body
    assert "no assertion" in body["refused"]


@pytest.mark.parametrize("language,bound", MODES)
def test_a_self_signed_assertion_is_refused(stacks, language, bound, laptop):
    stack = stacks(language, bound)
    genuine = through_tsnsrv(laptop, stack)["assertion"]
    claims = {**claims_of(genuine), "iat": int(time.time()), "exp": int(time.time()) + LIFETIME,
              "htm": "GET", "htu": "/whoami"}
    own_key = Ed25519PrivateKey.generate()

    for kid in (jwt.get_unverified_header(genuine)["kid"], "mallory"):
        forged = jwt.encode(claims, own_key, algorithm="EdDSA", headers={"kid": kid})
        status, body = stack.verifier.call("/whoami", headers={**FORGED_HEADERS, HEADER: forged})
        assert status == 401, (kid, body)


@pytest.mark.parametrize("language,bound", MODES)
def test_an_assertion_replayed_after_it_expired_is_refused(stacks, language, bound, laptop):
    stack = stacks(language, bound)
    captured = through_tsnsrv(laptop, stack)["assertion"]
    replay = {**FORGED_HEADERS, HEADER: captured}
    fresh_status, fresh = stack.verifier.call("/whoami", headers=replay)
    expires = claims_of(captured)["exp"]

    wait_for(lambda: time.time() > expires + 1, LIFETIME + 5, "the captured assertion to expire")
    status, body = stack.verifier.call("/whoami", headers=replay)

    assert fresh_status == 200, fresh  # the replay itself works while the assertion lives
    assert status == 401, body
    assert "expired" in body["refused"].lower()


@pytest.mark.parametrize("language,bound", MODES)
def test_an_assertion_of_another_service_is_refused(stacks, language, bound, laptop):
    other_language = LANGUAGES[(LANGUAGES.index(language) + 1) % len(LANGUAGES)]
    # Genuine, and accepted by its own service's verifier.
    foreign = through_tsnsrv(laptop, stacks(other_language, bound))["assertion"]

    status, body = stacks(language, bound).verifier.call("/whoami", headers={**FORGED_HEADERS, HEADER: foreign})

    assert status == 401, body


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_bound_assertion_replayed_to_another_request_is_refused(stacks, language, laptop):
    stack = stacks(language, True)
    captured = through_tsnsrv(laptop, stack, path="/books/1?format=epub")["assertion"]
    replay = {**FORGED_HEADERS, HEADER: captured}

    same_status, same = stack.verifier.call("/books/1?format=epub", headers=replay)
    elsewhere = [stack.verifier.call(path, method=method, headers=replay)
                 for method, path in (("GET", "/admin"), ("GET", "/books/1"), ("DELETE", "/books/1?format=epub"))]

    # Within its life, the same request is accepted again: binding is not single use.
    assert same_status == 200, same
    for status, body in elsewhere:
        assert status == 401, body
        assert "another request" in body["refused"]


# --- the keys ----------------------------------------------------------------------


def test_keys_rotate_while_requests_flow_and_every_request_verifies(stacks, laptop):
    all_stacks = [stacks(language, bound) for language in LANGUAGES for bound in (False, True)]
    kids: dict[str, set[str]] = {stack.service.name: set() for stack in all_stacks}
    answers = 0
    deadline = time.monotonic() + 2 * ROTATION + 1
    while time.monotonic() < deadline:
        for stack in all_stacks:
            urls = [f"http://{stack.service.ip}/flow/{n}" for n in range(5)]
            result = laptop.curl(*urls)
            for line in result.stdout.decode().splitlines():
                body = json.loads(line)
                assert "identity" in body, (stack.service.name, body)
                kids[stack.service.name].add(body["kid"])
                answers += 1

    assert answers > 60
    assert all(len(seen) >= 2 for seen in kids.values()), kids  # each saw at least one handover


def test_the_public_keys_are_published_alike_and_the_private_ones_kept_from_tailscaleds_account(stacks):
    stack = stacks("python", False)
    service = stack.service

    def published_alike() -> list[str] | None:
        from_file = json.loads(stack.jwks_file.read_text())
        status, served = get_unix(service.control_socket, "/jwks.json")
        printed = subprocess.run([tsnsrv_command(), "jwks", "--socket", str(service.control_socket)],
                                 capture_output=True, check=True).stdout
        alike = status == 200 and from_file == json.loads(served) == json.loads(printed)
        return from_file["keys"] if alike else None  # else a rotation came between: ask again

    published = wait_for(published_alike, 10, "the file, the control socket and `tsnsrv jwks` to agree")
    keys_dir = service.dir / "state" / "assertion-keys"
    private = json.loads((keys_dir / "keys.json").read_text())["keys"]

    assert len(published) >= 2  # the signing key and its successor
    assert {record["jwk"]["x"] for record in private} >= {key["x"] for key in published}
    assert all("d" in record["jwk"] for record in private) and not any("d" in key for key in published)
    as_tailscaleds_account = subprocess.run(["cat", str(keys_dir / "keys.json")], user=TAILSCALED_TEST_USER,
                                            capture_output=True, text=True)
    assert as_tailscaleds_account.returncode != 0
    assert "Permission denied" in as_tailscaleds_account.stderr
    assert (service.dir / "state" / "tailscaled.state").stat().st_uid != keys_dir.stat().st_uid


@pytest.mark.parametrize("case", ["no such directory", "tailscaled's directory", "a key directory planted there"])
def test_keys_or_a_jwks_where_they_are_not_safe_refuse_the_start_naming_the_option(case, service_dir, bin_dir):
    state = service_dir / "state"
    daemon_account = pwd.getpwnam(TAILSCALED_TEST_USER)
    if case == "no such directory":
        flags, expected = ["--assertion-jwks-file", str(service_dir / "nowhere" / "jwks.json")], \
            ("--assertion-jwks-file (assertionJwksFile)", "is not an existing directory")
    elif case == "tailscaled's directory":
        state.mkdir()
        os.chown(state, daemon_account.pw_uid, daemon_account.pw_gid)
        flags, expected = ["--assertion-jwks-file", str(state / "jwks.json")], \
            ("--assertion-jwks-file (assertionJwksFile)", f"belongs to {TAILSCALED_TEST_USER}")
    else:  # what tailscaled's account could do in the state directory it owns
        (state / "assertion-keys").mkdir(parents=True, mode=0o700)
        os.chown(state / "assertion-keys", daemon_account.pw_uid, daemon_account.pw_gid)
        flags, expected = [], ("--assertion-key-dir (assertionKeyDir)", f"belongs to uid {daemon_account.pw_uid}")

    result = subprocess.run([tsnsrv_command(), "--name", "refused", "--state-dir", str(state),
                             "--control-socket", str(service_dir / "control.sock"),
                             "--tailscaled", str(bin_dir / "tailscaled"), "--tailscaled-user", TAILSCALED_TEST_USER,
                             "--plaintext", "--assertions", *flags, "http://127.0.0.1:9"],
                            capture_output=True, text=True, timeout=60, env=offline_env())

    assert result.returncode == 2, result.stderr
    problem = next(line for line in result.stderr.splitlines() if line.startswith("  - "))
    assert all(part in problem for part in expected), result.stderr
    assert not (state / "tailscaled.state").exists() and not (service_dir / "control.sock").exists()
