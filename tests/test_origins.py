"""CHAT_ALLOWED_ORIGINS: a page from another origin cannot open a Socket.IO
connection (polling handshake or WebSocket), the server's own origin and the
listed ones can, and clients that send no Origin (non-browser) are not
affected. Origins here are header values only: nothing is sent anywhere but
127.0.0.1."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from chatserver.config import Settings
from chatserver.origins import OriginPolicy
from tests.support import Client, InProcessServer, running_server, settings_for

EVIL = "http://evil.example"
FRONT = "https://front.example"


def no_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [(r.name, r.getMessage()) for r in bad]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def polling_handshake(session: aiohttp.ClientSession, url: str, origin: str | None) -> tuple[int, str, str | None]:
    headers = {"Origin": origin} if origin else {}
    base = f"{url}/socket.io/?EIO=4&transport=polling"
    async with session.get(base, headers=headers) as resp:
        status, body, allow = resp.status, await resp.text(), resp.headers.get("Access-Control-Allow-Origin")
    if status == 200:
        # Close the session, or the server's shutdown waits for it.
        sid = json.loads(body[1:])["sid"]
        async with session.post(f"{base}&sid={sid}", data="1", headers=headers) as resp:
            assert resp.status == 200
    return status, body, allow


async def websocket_handshake(session: aiohttp.ClientSession, url: str, origin: str | None) -> int:
    headers = {"Origin": origin} if origin else {}
    try:
        ws = await session.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket", headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    try:
        opened = await ws.receive_str(timeout=5)
        assert opened.startswith("0{")
    finally:
        await ws.close()
    return 101


async def test_default_is_same_origin_only(
    server: InProcessServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    own = server.url  # http://127.0.0.1:<port>, what a page served here sends
    status, body, allow = await polling_handshake(session, server.url, own)
    assert status == 200 and body.startswith("0{") and allow == own
    assert (await polling_handshake(session, server.url, None))[0] == 200
    status, body, allow = await polling_handshake(session, server.url, EVIL)
    assert status == 400 and "not an accepted origin" in body and allow is None
    assert await websocket_handshake(session, server.url, EVIL) == 400
    assert await websocket_handshake(session, server.url, own) == 101
    assert await websocket_handshake(session, server.url, None) == 101
    # A CORS preflight from the foreign page is refused too.
    async with session.options(
        f"{server.url}/socket.io/?EIO=4&transport=polling",
        headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"},
    ) as resp:
        assert resp.status == 400
    no_errors(caplog)


async def test_listed_origins_are_allowed_besides_the_own(
    db_url: str, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(settings_for(db_url, allowed_origins=(FRONT,))) as srv:
        status, _, allow = await polling_handshake(session, srv.url, FRONT)
        assert status == 200 and allow == FRONT
        assert await websocket_handshake(session, srv.url, FRONT) == 101
        assert (await polling_handshake(session, srv.url, srv.url))[0] == 200
        assert (await polling_handshake(session, srv.url, EVIL))[0] == 400
        assert await websocket_handshake(session, srv.url, EVIL) == 400
        # Same scheme and host but another port is another origin.
        assert (await polling_handshake(session, srv.url, FRONT + ":8443"))[0] == 400
        # A library client (no Origin header) still works.
        client = await Client(srv.url).connect()
        try:
            await client.login("lib")
        finally:
            await client.disconnect()
    no_errors(caplog)


async def test_star_allows_any_origin(db_url: str, session: aiohttp.ClientSession) -> None:
    async with running_server(settings_for(db_url, allowed_origins=("*",))) as srv:
        assert (await polling_handshake(session, srv.url, EVIL))[0] == 200
        assert await websocket_handshake(session, srv.url, EVIL) == 101


def test_setting_is_parsed_and_checked() -> None:
    assert Settings.from_env({}).allowed_origins == ()
    env = {"CHAT_ALLOWED_ORIGINS": " https://a.example, http://b.example:8080 ,"}
    assert Settings.from_env(env).allowed_origins == ("https://a.example", "http://b.example:8080")
    for bad in ("a.example", "https://a.example/", "https://a.example/chat"):
        with pytest.raises(SystemExit, match="CHAT_ALLOWED_ORIGINS"):
            Settings.from_env({"CHAT_ALLOWED_ORIGINS": bad})


def test_policy_follows_forwarded_headers_like_engineio() -> None:
    policy = OriginPolicy(())
    behind_proxy = {
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "10.0.0.5:8080",
        "HTTP_X_FORWARDED_PROTO": "https",
        "HTTP_X_FORWARDED_HOST": "chat.example",
    }
    assert policy("https://chat.example", behind_proxy)
    assert policy("http://10.0.0.5:8080", behind_proxy)
    assert not policy(EVIL, behind_proxy)
    assert policy(None, behind_proxy)
