"""The OAuth client-credentials exchange with Tailscale's API: an OAuth client secret
becomes a single-use auth key carrying the configured tags.

Imported only when a service logs in with an OAuth secret.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from .auth import AuthKeyError, OAuthSecret, OAuthUnavailable


async def _post(session: aiohttp.ClientSession, url: str, what: str, **request: Any) -> Any:
    async with session.post(url, **request) as response:
        body = await response.read()
        if response.status >= 300:
            raise _http_failure(what, response.status, body.decode(errors="replace"))
        return json.loads(body)


async def mint(secret: OAuthSecret, tags: list[str], timeout: float) -> str:
    token_url = f"{secret.base_url}/api/v2/oauth/token"
    keys_url = f"{secret.base_url}/api/v2/tailnet/-/keys"
    capabilities = {"devices": {"create": {"reusable": False, "ephemeral": secret.ephemeral,
                                           "preauthorized": secret.preauthorized, "tags": tags}}}
    try:
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
            token = (await _post(session, token_url, f"OAuth token request to {token_url}",
                                 data={"grant_type": "client_credentials"},
                                 headers={"Authorization": aiohttp.encode_basic_auth("tsnsrv", secret.secret)},
                                 ))["access_token"]
            answer = await _post(session, keys_url, f"creating an auth key at {keys_url}",
                                 json={"capabilities": capabilities}, headers={"Authorization": f"Bearer {token}"})
            return answer["key"]
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise OAuthUnavailable(f"OAuth exchange with {secret.base_url} failed: {exc!r}") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise AuthKeyError(f"OAuth exchange with {secret.base_url} gave an unexpected answer: {exc!r}") from None


def _http_failure(what: str, status: int, body: str) -> Exception:
    """A refusal (4xx: wrong secret, tags it may not use) is the configuration's fault."""
    message = f"{what} failed: HTTP {status}: {body[:200]}"
    return OAuthUnavailable(message) if status >= 500 or status == 429 else AuthKeyError(message)
