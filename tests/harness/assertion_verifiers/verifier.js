// An upstream that believes only what it can verify: tsnsrv's signed identity assertion,
// checked with jose (npm) against the service's published keys (JWKS).
//
//     node verifier.js PORT JWKS_FILE AUDIENCE ISSUER [bound]
//
// Answers 200 with the identity it verified (and the assertion and its key id, so that
// tests can replay it), or 401 with why it refused. Whatever identity headers a request
// carries are ignored. The `verify` function is the Node example of
// docs/identity-assertions.md (tests/unit/test_docs.py keeps the two the same).
import { createServer } from "node:http";

const [PORT, JWKS_FILE, AUDIENCE, ISSUER, mode] = process.argv.slice(2);
const BOUND = mode === "bound";

// docs:begin
import { readFileSync } from "node:fs";
import { createLocalJWKSet, jwtVerify } from "jose";

// The identity tsnsrv vouches for; throws if none.
async function verify(assertion, method, target) {
  const keys = createLocalJWKSet(JSON.parse(readFileSync(JWKS_FILE, "utf8"))); // read anew: keys rotate
  const { payload } = await jwtVerify(assertion, keys, {
    algorithms: ["EdDSA"], audience: AUDIENCE, issuer: ISSUER, requiredClaims: ["sub", "iat", "exp"],
  });
  if (BOUND && (payload.htm !== method || payload.htu !== target)) {
    throw new Error("made for another request");
  }
  return payload;
}
// docs:end

function reply(res, status, body) {
  const data = JSON.stringify(body) + "\n";
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(data) });
  res.end(data);
}

createServer(async (req, res) => {
  const assertion = req.headers["x-tailscale-identity-assertion"];
  try {
    if (assertion === undefined) throw new Error("no assertion");
    const claims = await verify(assertion, req.method, req.url);
    const { sub, login, name, node, node_id, tags } = claims;
    const kid = JSON.parse(Buffer.from(assertion.split(".")[0], "base64url")).kid;
    reply(res, 200, { identity: { sub, login, name, node, node_id, tags }, kid, assertion });
  } catch (error) {
    reply(res, 401, { refused: `${error.code || error.name}: ${error.message}` });
  }
}).listen(Number(PORT), "127.0.0.1");
