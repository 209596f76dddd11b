"""Where credentials come from (tsnsrv.auth): key files, environment, systemd credentials,
and OAuth client secrets with their attributes. (Minting over HTTP is end-to-end.)"""

from __future__ import annotations

import pytest

from tsnsrv import auth
from tsnsrv.auth import (AuthKeyError, Credential, OAuthSecret, OAuthUnavailable, auth_key_for_login,
                         find_credential)
from tsnsrv.config import load


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("TS_AUTHKEY", "TS_AUTH_KEY", "CREDENTIALS_DIRECTORY", "TS_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


def cfg(**extra):
    return load({"name": "books", "toURL": "http://127.0.0.1:8083", **extra})


def test_key_file_wins_and_is_stripped(tmp_path, monkeypatch):
    key = tmp_path / "key"
    key.write_text("  tskey-auth-abc\n")
    monkeypatch.setenv("TS_AUTHKEY", "tskey-auth-env")
    assert find_credential(cfg(authKeyPath=str(key))) == Credential("tskey-auth-abc", str(key))


@pytest.mark.parametrize("var", ["TS_AUTHKEY", "TS_AUTH_KEY"])
def test_environment_variables(monkeypatch, var):
    monkeypatch.setenv(var, " tskey-auth-env ")
    assert find_credential(cfg()) == Credential("tskey-auth-env", f"${var}")


def test_blank_environment_is_ignored_and_systemd_credential_used(tmp_path, monkeypatch):
    monkeypatch.setenv("TS_AUTHKEY", "   ")
    (tmp_path / "authKey").write_text("tskey-client-xyz\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    credential = find_credential(cfg())
    assert credential == Credential("tskey-client-xyz", str(tmp_path / "authKey"))
    assert credential.is_oauth_secret


def test_no_credential_means_interactive_login(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # without an authKey file
    assert find_credential(cfg()) is None


def test_empty_and_missing_key_files(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AuthKeyError, match="is empty"):
        find_credential(cfg(authKeyPath=str(tmp_path / "empty")))
    with pytest.raises(AuthKeyError, match="cannot read the auth key file .*missing: No such file"):
        find_credential(cfg(authKeyPath=str(tmp_path / "missing")))


def test_oauth_secret_attributes():
    secret = OAuthSecret.parse("tskey-client-k-s?ephemeral=false&preauthorized=TRUE&baseURL=https://api.example/",
                               ephemeral_default=True)
    assert secret == OAuthSecret("tskey-client-k-s", ephemeral=False, preauthorized=True,
                                 base_url="https://api.example")


def test_oauth_secret_defaults(monkeypatch):
    assert OAuthSecret.parse("tskey-client-k-s", ephemeral_default=True) == OAuthSecret(
        "tskey-client-k-s", True, False, auth.DEFAULT_API)
    monkeypatch.setenv("TS_BASE_URL", "http://127.0.0.1:9999/")
    assert OAuthSecret.parse("tskey-client-k-s?ephemeral=", ephemeral_default=False).base_url == \
        "http://127.0.0.1:9999"


@pytest.mark.parametrize(("text", "message"), [
    ("tskey-client-k?color=red", "unknown OAuth secret attribute\\(s\\) color"),
    ("tskey-client-k?ephemeral=maybe", 'ephemeral="maybe" is not true or false'),
])
def test_bad_oauth_secret_attributes(text, message):
    with pytest.raises(AuthKeyError, match=message):
        OAuthSecret.parse(text, ephemeral_default=False)


@pytest.mark.asyncio
async def test_plain_auth_key_is_used_as_is(monkeypatch):
    monkeypatch.setenv("TS_AUTHKEY", "tskey-auth-plain")
    assert await auth_key_for_login(cfg()) == "tskey-auth-plain"


@pytest.mark.asyncio
async def test_no_key_means_none():
    assert await auth_key_for_login(cfg()) is None


@pytest.mark.asyncio
async def test_oauth_secret_without_tags_is_refused_before_any_request(monkeypatch):
    monkeypatch.setenv("TS_AUTHKEY", "tskey-client-k-s?baseURL=http://127.0.0.1:9")
    with pytest.raises(AuthKeyError, match="needs tags"):
        await auth_key_for_login(cfg())


async def oauth_api(status: int):
    """A stand-in for the OAuth token endpoint that answers every request with `status`."""
    from aiohttp import web

    async def refuse(_request):
        return web.Response(status=status, text="nope")
    app = web.Application()
    app.router.add_post("/api/v2/oauth/token", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest.mark.asyncio
@pytest.mark.parametrize("status, error", [(401, AuthKeyError), (403, AuthKeyError), (503, OAuthUnavailable),
                                           (429, OAuthUnavailable)])
async def test_oauth_refusals_are_configuration_errors_and_outages_are_not(monkeypatch, status, error):
    runner, port = await oauth_api(status)
    try:
        monkeypatch.setenv("TS_AUTHKEY", f"tskey-client-k-s?baseURL=http://127.0.0.1:{port}")
        with pytest.raises(error, match=f"HTTP {status}"):
            await auth_key_for_login(cfg(tags=["tag:books"]))
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_an_unreachable_oauth_api_is_worth_a_retry(monkeypatch):
    monkeypatch.setenv("TS_AUTHKEY", "tskey-client-k-s?baseURL=http://127.0.0.1:9")  # discard: nothing listens
    with pytest.raises(OAuthUnavailable, match="OAuth exchange with http://127.0.0.1:9 failed"):
        await auth_key_for_login(cfg(tags=["tag:books"]))
