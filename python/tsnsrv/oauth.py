"""The OAuth client-credentials exchange with Tailscale's API: an OAuth client secret
becomes a single-use auth key carrying the configured tags.

Imported only when a service logs in with an OAuth secret: the standard library's HTTP
client (in a thread, once per login) is all it needs, and nobody else pays for it.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .auth import AuthKeyError, OAuthSecret, OAuthUnavailable


def _post(url: str, what: str, body: bytes, headers: dict[str, str], timeout: float) -> Any:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise _http_failure(what, exc.code, exc.read().decode(errors="replace")) from None


def mint_in_thread(secret: OAuthSecret, tags: list[str], timeout: float) -> str:
    token_url = f"{secret.base_url}/api/v2/oauth/token"
    keys_url = f"{secret.base_url}/api/v2/tailnet/-/keys"
    basic = base64.b64encode(f"tsnsrv:{secret.secret}".encode()).decode()
    try:
        token = _post(token_url, f"OAuth token request to {token_url}",
                      urllib.parse.urlencode({"grant_type": "client_credentials"}).encode(),
                      {"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"},
                      timeout)["access_token"]
        capabilities = {"devices": {"create": {"reusable": False, "ephemeral": secret.ephemeral,
                                               "preauthorized": secret.preauthorized, "tags": tags}}}
        answer = _post(keys_url, f"creating an auth key at {keys_url}", json.dumps({"capabilities": capabilities}).encode(),
                       {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, timeout)
        return answer["key"]
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise OAuthUnavailable(f"OAuth exchange with {secret.base_url} failed: {exc!r}") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise AuthKeyError(f"OAuth exchange with {secret.base_url} gave an unexpected answer: {exc!r}") from None


def _http_failure(what: str, status: int, body: str) -> Exception:
    """A refusal (4xx: wrong secret, tags it may not use) is the configuration's fault."""
    message = f"{what} failed: HTTP {status}: {body[:200]}"
    return OAuthUnavailable(message) if status >= 500 or status == 429 else AuthKeyError(message)
