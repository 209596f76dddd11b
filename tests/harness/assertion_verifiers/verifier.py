"""An upstream that believes only what it can verify: tsnsrv's signed identity
assertion, checked with PyJWT against the service's published keys (JWKS).

    verifier.py PORT JWKS_FILE AUDIENCE ISSUER [bound]

Answers 200 with the identity it verified (and the assertion and its key id, so that
tests can replay it), or 401 with why it refused. Whatever identity headers a request
carries are ignored. The `verify` function is the Python example of
docs/identity-assertions.md (tests/unit/test_docs.py keeps the two the same).
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, JWKS_FILE, AUDIENCE, ISSUER = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
BOUND = sys.argv[5:] == ["bound"]

# docs:begin
import jwt  # PyJWT, with cryptography for EdDSA


def verify(assertion: str, method: str, target: str) -> dict:
    """The identity tsnsrv vouches for; raises jwt.InvalidTokenError if none."""
    with open(JWKS_FILE) as file:  # read anew: keys rotate
        keys = {key.key_id: key for key in jwt.PyJWKSet.from_json(file.read()).keys}
    key = keys.get(jwt.get_unverified_header(assertion).get("kid"))
    if key is None:
        raise jwt.InvalidTokenError("signed with a key this service does not publish")
    claims = jwt.decode(assertion, key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER,
                        options={"require": ["sub", "iat", "exp"]})
    if BOUND and (claims.get("htm"), claims.get("htu")) != (method, target):
        raise jwt.InvalidTokenError("made for another request")
    return claims
# docs:end


class Handler(BaseHTTPRequestHandler):
    def answer(self) -> None:
        assertion = self.headers.get("X-Tailscale-Identity-Assertion")
        try:
            if assertion is None:
                raise jwt.InvalidTokenError("no assertion")
            claims = verify(assertion, self.command, self.path)
        except jwt.InvalidTokenError as exc:
            self.reply(401, {"refused": f"{type(exc).__name__}: {exc}"})
            return
        identity = {key: claims[key] for key in ("sub", "login", "name", "node", "node_id", "tags")}
        self.reply(200, {"identity": identity, "kid": jwt.get_unverified_header(assertion)["kid"],
                         "assertion": assertion})

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = answer
    protocol_version = "HTTP/1.1"


ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
