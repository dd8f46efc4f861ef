"""Accounts mode (issue 13): registration, sign-in, signed tokens on the
Socket.IO handshake, expiry and revocation, brute-force limits, kick and
ban, resume bound to the account, TLS; and open mode left as it was.

Real servers on loopback, real aiohttp and python-socketio clients."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import socketio
from sqlalchemy import text

from chatserver.accounts import Accounts
from chatserver.database import create_engine
from tests.support import (
    ROOT,
    Client,
    InProcessServer,
    ServerProcess,
    log_of,
    migrated_sqlite,
    running_server,
    settings_for,
)

PASSWORD = "correct horse battery"


@pytest.fixture
async def accounts_server(db_url: str) -> AsyncIterator[InProcessServer]:
    async with running_server(settings_for(db_url, auth_mode="accounts")) as server:
        yield server


async def api(server_url: str, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http:
        async with http.request(method, server_url + path, json=body, headers=headers) as resp:
            data = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, data, resp.headers


async def register(url: str, name: str, password: str = PASSWORD) -> None:
    status, data, _ = await api(url, "POST", "/api/accounts", {"name": name, "password": password})
    assert status == 201, data


async def sign_in(url: str, name: str, password: str = PASSWORD) -> str:
    status, data, _ = await api(url, "POST", "/api/sessions", {"name": name, "password": password})
    assert status == 200, data
    assert data["name"] == name and data["expiresIn"] > 0
    return data["token"]


async def refused_handshake(url: str, auth: Any) -> dict[str, Any]:
    """The connect_error data of a handshake the server refuses."""
    client = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    client.on("connect_error", lambda data: errors.append(data))
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(url, transports=["websocket"], auth=auth, wait_timeout=10)
    assert errors, "no connect_error"
    # The Socket.IO CONNECT_ERROR packet: {message, data}; a JS client sees
    # err.message and err.data = {message, code}.
    packet = errors[0]
    assert packet["message"] and packet["data"]["message"] == packet["message"]
    return packet["data"]


async def signed_in_client(url: str, name: str, token: str | None = None, **auth: Any) -> Client:
    token = token or await sign_in(url, name)
    return await Client(url).connect(auth={"token": token, **auth})


def forge(claims: dict[str, Any], key: str = "x" * 40) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


def alg_none(claims: dict[str, Any]) -> str:
    def part(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


# -- open mode ---------------------------------------------------------------------------
async def test_open_mode_is_as_before(server: InProcessServer) -> None:
    status, data, _ = await api(server.url, "GET", "/api/auth/mode")
    assert (status, data) == (200, {"mode": "open"})
    # A seed client: no auth, types a name, chats.
    c = await Client(server.url).connect()
    try:
        await c.login("seedy")
        await c.emit("chat", "hello")
        await c.wait_for(lambda: any(m["message"] == "hello" for m in c.events("chat")))
        # No accounts here, and nobody may moderate.
        status, data, _ = await api(server.url, "POST", "/api/accounts", {"name": "someone", "password": PASSWORD})
        assert status == 404 and data["error"] == "not_available"
        ack = await c.call("kick", {"name": "seedy"})
        assert ack["ok"] is False and ack["error"] == "not_allowed"
    finally:
        await c.disconnect()


# -- register, sign in -------------------------------------------------------------------
async def test_register_sign_in_and_chat_as_the_account(accounts_server: InProcessServer, db_url: str) -> None:
    url = accounts_server.url
    assert (await api(url, "GET", "/api/auth/mode"))[1] == {"mode": "accounts"}
    await register(url, "alice")
    status, data, _ = await api(url, "POST", "/api/accounts", {"name": "alice", "password": PASSWORD})
    assert status == 409 and data["error"] == "name_taken"
    status, data, _ = await api(url, "POST", "/api/accounts", {"name": "bob", "password": "short"})
    assert status == 400 and data["error"] == "password_bad"
    status, data, _ = await api(url, "POST", "/api/accounts", {"name": "bob", "password": "x" * 257})
    assert status == 400 and data["error"] == "password_bad"
    status, data, _ = await api(url, "POST", "/api/accounts", {"name": "b\u200bob", "password": PASSWORD})
    assert status == 400 and data["error"] == "name_bad"

    # Without a token, the handshake is refused with a code.
    assert (await refused_handshake(url, None))["code"] == "auth_required"

    token = await sign_in(url, "alice")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) == {"sub", "iat", "exp", "jti"} and claims["sub"] == "alice"
    assert claims["exp"] == int(claims["iat"]) + 15 * 60  # iat to the millisecond, exp whole seconds
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    c = await signed_in_client(url, "alice", token)
    try:
        # Whatever name is typed, the login is the account's.
        ack = await c.call("login", "mallory")
        assert ack["ok"] and ack["name"] == "alice"
        await c.wait_for(lambda: "alice" in c.events("userJoined"))
    finally:
        await c.disconnect()
    events = await log_of(db_url)
    created = [e for e in events if e.type == "AccountCreated"]
    assert [(e.stream, e.version, e.event.name) for e in created] == [("account-alice", 1, "alice")]
    # The password is nowhere in the log.
    assert not any(PASSWORD in repr(e.event) for e in events)


async def test_wrong_password_and_unknown_name(accounts_server: InProcessServer) -> None:
    url = accounts_server.url
    await register(url, "alice")
    for body in ({"name": "alice", "password": "wrong password"}, {"name": "nobody", "password": PASSWORD}):
        status, data, _ = await api(url, "POST", "/api/sessions", body)
        assert status == 401 and data["error"] == "bad_credentials"


async def test_change_password_revokes_old_tokens(accounts_server: InProcessServer) -> None:
    url = accounts_server.url
    await register(url, "alice")
    token = await sign_in(url, "alice")
    status, data, _ = await api(url, "POST", "/api/password", {"old": "not it at all", "new": "a new password"}, token)
    assert status == 401, data
    # No pause between the sign-in and the change, nor after it: a token
    # issued in the same second as the change is revoked if it came before
    # it (measured: it was not, when iat had whole seconds), and the sign-in
    # right after it works.
    status, _, _ = await api(url, "POST", "/api/password", {"old": PASSWORD, "new": "a new password"}, token)
    assert status == 204
    assert (await refused_handshake(url, {"token": token}))["code"] == "invalid_token"
    status, _, _ = await api(url, "POST", "/api/sessions", {"name": "alice", "password": PASSWORD})
    assert status == 401
    new = await sign_in(url, "alice", "a new password")
    c = await signed_in_client(url, "alice", new)
    await c.disconnect()


# -- tokens ------------------------------------------------------------------------------
async def test_forged_and_alg_none_tokens_are_refused(accounts_server: InProcessServer) -> None:
    url = accounts_server.url
    await register(url, "alice")
    now = int(time.time())
    claims = {"sub": "alice", "iat": now, "exp": now + 600, "jti": "abc"}
    for token, why in (
        (forge(claims), "signed with another key"),
        (alg_none(claims), "alg none"),
        (alg_none(claims)[:-1] + "." + "x", "alg none with junk signature"),
        ("not.a.token", "garbage"),
    ):
        data = await refused_handshake(url, {"token": token})
        assert data["code"] == "invalid_token", why
        status, body, _ = await api(url, "POST", "/api/sessions/refresh", token=token)
        assert status == 401 and body["error"] == "invalid_token", why
    # A real token with its payload changed (sub) no longer verifies.
    real = await sign_in(url, "alice")
    head, payload, sig = real.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered["sub"] = "admin"
    body = base64.urlsafe_b64encode(json.dumps(tampered).encode()).rstrip(b"=").decode()
    assert (await refused_handshake(url, {"token": f"{head}.{body}.{sig}"}))["code"] == "invalid_token"


async def test_expired_token_refused_and_session_ends_at_expiry(db_url: str) -> None:
    async with running_server(settings_for(db_url, auth_mode="accounts", token_ttl=2)) as server:
        await register(server.url, "alice")
        token = await sign_in(server.url, "alice")
        c = await signed_in_client(server.url, "alice", token)
        try:
            await c.login("alice")
            started = time.monotonic()
            await c.wait_for(lambda: any(e["code"] == "token_expired" for e in c.events("protocolError")), timeout=6)
            # At expiry, not at some later sweep.
            assert time.monotonic() - started < 3.5
            await c.wait_for(lambda: not c.sio.connected, timeout=5)
        finally:
            if c.sio.connected:
                await c.disconnect()
        assert (await refused_handshake(server.url, {"token": token}))["code"] == "expired_token"
        # Refresh needs a still-valid token.
        status, data, _ = await api(server.url, "POST", "/api/sessions/refresh", token=token)
        assert status == 401 and data["error"] == "expired_token"
        events = await log_of(db_url)
        assert any(e.type == "UserLeft" and e.event.name == "alice" for e in events)


async def test_reauth_keeps_a_live_session_past_the_first_token(db_url: str) -> None:
    async with running_server(settings_for(db_url, auth_mode="accounts", token_ttl=3)) as server:
        await register(server.url, "alice")
        await register(server.url, "bob")
        first = await sign_in(server.url, "alice")
        c = await signed_in_client(server.url, "alice", first)
        try:
            await c.login("alice")
            bob = await sign_in(server.url, "bob")
            assert (await c.call("reauth", {"token": bob}))["error"] == "not_allowed"
            assert (await c.call("reauth", {"token": forge({"sub": "alice"})}))["error"] == "bad_payload"
            await asyncio.sleep(1.5)
            status, data, _ = await api(server.url, "POST", "/api/sessions/refresh", token=first)
            assert status == 200
            ack = await c.call("reauth", {"token": data["token"]})
            assert ack["ok"] and 0 < ack["expiresIn"] <= 3
            # Past the first token's expiry the socket is still there...
            await asyncio.sleep(2.0)
            assert c.sio.connected
            assert [e["code"] for e in c.events("protocolError")] == ["not_allowed", "bad_payload"]
            # ...and it ends at the second's.
            await c.wait_for(lambda: any(e["code"] == "token_expired" for e in c.events("protocolError")), timeout=5)
        finally:
            if c.sio.connected:
                await c.disconnect()


async def test_refresh_and_revoke(accounts_server: InProcessServer) -> None:
    url = accounts_server.url
    await register(url, "alice")
    token = await sign_in(url, "alice")
    status, data, _ = await api(url, "POST", "/api/sessions/refresh", token=token)
    assert status == 200 and data["expiresIn"] == 15 * 60
    fresh = data["token"]
    assert fresh != token
    c = await signed_in_client(url, "alice", token)
    try:
        await c.login("alice")
        status, _, _ = await api(url, "DELETE", "/api/sessions", token=token)
        assert status == 204
        # The socket that used it ends now.
        await c.wait_for(lambda: any(e["code"] == "token_revoked" for e in c.events("protocolError")))
        await c.wait_for(lambda: not c.sio.connected)
    finally:
        if c.sio.connected:
            await c.disconnect()
    assert (await refused_handshake(url, {"token": token}))["code"] == "invalid_token"
    status, _, _ = await api(url, "DELETE", "/api/sessions", token=token)
    assert status == 401
    # The refreshed token is its own and still works.
    c2 = await signed_in_client(url, "alice", fresh)
    await c2.disconnect()


# -- brute force -------------------------------------------------------------------------
async def test_failed_sign_ins_are_limited_per_account_and_survive_a_restart(tmp_path: Path) -> None:
    url_db = migrated_sqlite(tmp_path)
    env = {"CHAT_AUTH": "accounts", "CHAT_LOGIN_FAILURES_PER_ACCOUNT": "3", "CHAT_LOGIN_FAILURE_WINDOW": "60"}
    server = ServerProcess(url_db, **env).start()
    try:
        await register(server.url, "alice")
        for _ in range(3):
            status, _, _ = await api(server.url, "POST", "/api/sessions", {"name": "alice", "password": "wrong one!"})
            assert status == 401
        status, data, headers = await api(server.url, "POST", "/api/sessions", {"name": "alice", "password": PASSWORD})
        # Limited even with the right password: the attacker learns nothing more.
        assert status == 429 and data["error"] == "rate_limited"
        assert 0 < int(headers["Retry-After"]) <= 60
        server.terminate()
        server = ServerProcess(url_db, port=server.port, **env).start()
        status, _, headers = await api(server.url, "POST", "/api/sessions", {"name": "alice", "password": PASSWORD})
        assert status == 429 and int(headers["Retry-After"]) > 0
    finally:
        server.kill()


async def test_failed_sign_ins_are_limited_per_address(db_url: str) -> None:
    settings = settings_for(db_url, auth_mode="accounts", login_failures_per_address=4)
    async with running_server(settings) as server:
        await register(server.url, "alice")
        # Successful sign-ins are no failures: they leave the address's budget as it was.
        for _ in range(5):
            await sign_in(server.url, "alice")
        # One address trying many names.
        statuses = []
        for i in range(6):
            status, _, _ = await api(server.url, "POST", "/api/sessions", {"name": f"user{i}", "password": PASSWORD})
            statuses.append(status)
        assert statuses == [401] * 4 + [429] * 2


async def test_a_burst_of_guesses_is_counted_before_any_is_checked(db_url: str) -> None:
    settings = settings_for(db_url, auth_mode="accounts", login_failures_per_account=3)
    async with running_server(settings) as server:
        await register(server.url, "alice")
        body = {"name": "alice", "password": "guess number"}
        answers = await asyncio.gather(*(api(server.url, "POST", "/api/sessions", body) for _ in range(12)))
        statuses = sorted(status for status, _, _ in answers)
        # Sent at once, the guesses still get only the limit's worth of checks.
        assert statuses == [401] * 3 + [429] * 9


# -- resume ------------------------------------------------------------------------------
async def test_resume_is_bound_to_the_account(accounts_server: InProcessServer) -> None:
    url = accounts_server.url
    await register(url, "alice")
    await register(url, "bob")
    alice_token = await sign_in(url, "alice")
    a = await signed_in_client(url, "alice", alice_token)
    await a.login("alice")
    welcome = a.events("welcome")[0]
    resume_token, last = welcome["resumeToken"], welcome["position"]
    await a.sio.eio.disconnect(abort=True)  # a dropped connection, not a sign-out
    # Bob cannot take alice's session with her resume token.
    b = await signed_in_client(url, "bob", None, resumeToken=resume_token, lastPosition=last)
    try:
        await b.wait_event("resumeFailed")
        assert b.events("resumeFailed")[0]["code"] == "invalid_token"
    finally:
        await b.disconnect()
    # Alice can, with her access token.
    a2 = await signed_in_client(url, "alice", alice_token, resumeToken=resume_token, lastPosition=last)
    try:
        w = (await a2.wait_event("welcome"))[0]
        assert w["resumed"] is True and w["name"] == "alice"
    finally:
        await a2.disconnect()


# -- moderation --------------------------------------------------------------------------
async def test_kick_and_ban(accounts_server: InProcessServer, db_url: str, tmp_path: Path) -> None:
    url = accounts_server.url
    await register(url, "admin")  # the first account is admin
    await register(url, "troll")
    admin = await signed_in_client(url, "admin")
    troll_token = await sign_in(url, "troll")
    troll = await signed_in_client(url, "troll", troll_token)
    try:
        await admin.login("admin")
        await troll.login("troll")
        ack = await troll.call("kick", {"name": "admin"})
        assert ack["ok"] is False and ack["error"] == "not_allowed"
        ack = await admin.call("kick", {"name": "nobody"})
        assert ack["ok"] is False and ack["error"] == "no_such_user"

        ack = await admin.call("kick", {"name": "troll"})
        assert ack["ok"] is True and ack["name"] == "troll"
        await troll.wait_for(lambda: any(e["code"] == "kicked" for e in troll.events("protocolError")))
        await troll.wait_for(lambda: not troll.sio.connected)
        await admin.wait_for(lambda: "troll" in admin.events("userLeft"))

        # Kicked, not banned: back in with the same token.
        troll = await signed_in_client(url, "troll", troll_token)
        await troll.login("troll")
        ack = await admin.call("ban", {"name": "troll", "seconds": 3600})
        assert ack["ok"] is True and ack["until"].endswith("Z")
        await troll.wait_for(lambda: any(e["code"] == "banned" for e in troll.events("protocolError")))
        await troll.wait_for(lambda: not troll.sio.connected)
        assert (await refused_handshake(url, {"token": troll_token}))["code"] == "banned"
        status, data, _ = await api(url, "POST", "/api/sessions", {"name": "troll", "password": PASSWORD})
        assert status == 403 and data["error"] == "banned"
        ack = await admin.call("ban", {"name": "troll", "seconds": 0})
        assert ack["ok"] is False and ack["error"] == "bad_payload"
    finally:
        for c in (admin, troll):
            if c.sio.connected:
                await c.disconnect()
    events = await log_of(db_url)
    moderation = [(e.stream, e.type, e.event.name, e.event.by) for e in events if e.type in ("UserKicked", "UserBanned")]
    assert moderation == [("account-troll", "UserKicked", "troll", "admin"), ("account-troll", "UserBanned", "troll", "admin")]
    # chat-replay shows both.
    out = subprocess.run(
        [sys.executable, "-m", "chatserver.replay", "--format", "text"],
        cwd=ROOT, env={"CHAT_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin", "NO_COLOR": "1"},
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "* troll was kicked by admin" in out.stdout
    assert "* troll was banned by admin for 3600 s (until " in out.stdout
    assert "* account troll created" in out.stdout


async def test_make_admin_cli(tmp_path: Path) -> None:
    url_db = migrated_sqlite(tmp_path)
    async with running_server(settings_for(url_db, auth_mode="accounts")) as server:
        await register(server.url, "first")
        await register(server.url, "second")
        second = await signed_in_client(server.url, "second")
        try:
            await second.login("second")
            assert (await second.call("kick", {"name": "first"}))["error"] == "not_allowed"
            env = {"CHAT_DATABASE_URL": url_db, "PATH": "/usr/bin:/bin"}
            cli = [sys.executable, "-m", "chatserver", "make-admin"]
            done = await asyncio.to_thread(subprocess.run, [*cli, "second"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            missing = await asyncio.to_thread(subprocess.run, [*cli, "nobody"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            assert missing.returncode == 1 and "nobody" in missing.stderr
            assert (await second.call("kick", {"name": "first"}))["ok"] is True
        finally:
            await second.disconnect()


# -- TLS ---------------------------------------------------------------------------------
def throwaway_certificate(directory: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_tls_https_and_wss_with_a_throwaway_certificate(tmp_path: Path) -> None:
    cert, key = throwaway_certificate(tmp_path)
    server = ServerProcess(
        migrated_sqlite(tmp_path), CHAT_AUTH="accounts", CHAT_TLS_CERT=str(cert), CHAT_TLS_KEY=str(key)
    ).start()
    url = f"https://127.0.0.1:{server.port}"
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as http:
            async with http.get(url + "/api/auth/mode") as resp:
                assert resp.status == 200 and await resp.json() == {"mode": "accounts"}
            async with http.post(url + "/api/accounts", json={"name": "alice", "password": PASSWORD}) as resp:
                assert resp.status == 201
            async with http.post(url + "/api/sessions", json={"name": "alice", "password": PASSWORD}) as resp:
                token = (await resp.json())["token"]
            sio = socketio.AsyncClient(reconnection=False, http_session=http)
            await sio.connect(url, transports=["websocket"], auth={"token": token}, wait_timeout=10)
            try:
                ack = await sio.call("login", "alice", timeout=10)
                assert ack["ok"] and ack["name"] == "alice"
            finally:
                await sio.disconnect()
        # Plain HTTP on the TLS port is not served; an untrusted client is refused.
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get(url + "/api/auth/mode")
    finally:
        server.kill()


def test_check_validates_the_accounts_settings_and_hides_the_key(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "CHAT_DATABASE_URL": migrated_sqlite(tmp_path),
        "CHAT_AUTH": "sometimes",
        "CHAT_SECRET_KEY": "k" * 40,
        "CHAT_TLS_CERT": str(tmp_path / "missing.pem"),
    }
    done = subprocess.run([sys.executable, "-m", "chatserver", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "k" * 40 not in done.stdout + done.stderr
    assert "CHAT_AUTH must be open or accounts" in done.stdout
    assert "CHAT_TLS_CERT and CHAT_TLS_KEY go together" in done.stdout


@pytest.mark.postgres
async def test_accounts_on_postgresql(pg_url: str) -> None:
    settings = settings_for(pg_url, auth_mode="accounts", login_failures_per_account=3)
    async with running_server(settings) as server:
        await register(server.url, "alice")
        await register(server.url, "bob")
        body = {"name": "bob", "password": "guess number"}
        answers = await asyncio.gather(*(api(server.url, "POST", "/api/sessions", body) for _ in range(10)))
        # Concurrent transactions on one counter row still count every guess.
        assert sorted(status for status, _, _ in answers) == [401] * 3 + [429] * 7
        admin = await signed_in_client(server.url, "alice")
        try:
            assert (await admin.call("login", "alice"))["name"] == "alice"
            ack = await admin.call("ban", {"name": "bob", "seconds": 60})
            assert ack["ok"], ack
        finally:
            await admin.disconnect()
    kinds = [(e.stream, e.version, e.type) for e in await log_of(pg_url) if e.stream.startswith("account-")]
    assert kinds == [("account-alice", 1, "AccountCreated"), ("account-bob", 1, "AccountCreated"), ("account-bob", 2, "UserBanned")]



@pytest.mark.postgres
async def test_registrations_racing_on_a_fresh_database_make_one_admin(pg_url: str) -> None:
    # "The first account registered is an admin": two registrations whose
    # transactions run together on an empty database must not both count
    # zero accounts. A third connection holds the accounts table until both
    # have started, so they do run together (measured: both were admins).
    engine = create_engine(pg_url, writer=True)
    accounts = Accounts(settings_for(pg_url, auth_mode="accounts"), engine)
    try:
        async with engine.connect() as holder:
            await holder.execute(text("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE"))
            racing = [asyncio.create_task(accounts.create(name, PASSWORD)) for name in ("ann", "bob")]
            await asyncio.sleep(1.0)  # both hashed their password and wait on the table
            assert not any(task.done() for task in racing)
            await holder.rollback()
        created = await asyncio.gather(*racing)
        assert sorted(a.is_admin for a in created) == [False, True]
        stored = [await accounts.get(name) for name in ("ann", "bob")]
        assert sorted(a is not None and a.is_admin for a in stored) == [False, True]
    finally:
        await engine.dispose()


async def test_registrations_from_one_address_are_limited(db_url: str) -> None:
    # Each registration costs a password hash: one address may not make the
    # server hash without bound (and starve everyone's sign-ins of hashing).
    settings = settings_for(db_url, auth_mode="accounts", registrations_per_address=3)
    async with running_server(settings) as server:
        for i in range(3):
            await register(server.url, f"reg{i}")
        status, data, headers = await api(server.url, "POST", "/api/accounts", {"name": "reg3", "password": PASSWORD})
        assert status == 429 and data["error"] == "rate_limited", data
        assert int(headers["Retry-After"]) > 0
        status, _, _ = await api(server.url, "POST", "/api/sessions", {"name": "reg3", "password": PASSWORD})
        assert status == 401  # not created
        await sign_in(server.url, "reg0")  # the accounts made stay usable
    assert [e.event.name for e in await log_of(db_url) if e.type == "AccountCreated"] == ["reg0", "reg1", "reg2"]


@pytest.mark.postgres
async def test_a_sign_out_or_password_change_on_one_process_ends_sockets_on_another(pg_url: str) -> None:
    # The request is served by process A; the token's sockets are on B. B
    # finds them revoked in the database at its next check of its sockets.
    env = {"CHAT_AUTH": "accounts", "CHAT_REVOCATION_SWEEP": "0.5"}
    a = await asyncio.to_thread(ServerProcess(pg_url, CHAT_NODE_ID="a", **env).start)
    b = await asyncio.to_thread(ServerProcess(pg_url, CHAT_NODE_ID="b", **env).start)
    clients: list[Client] = []
    try:
        for name in ("ann", "bob", "cat"):
            await register(a.url, name)
        tokens = {name: await sign_in(a.url, name) for name in ("ann", "bob", "cat")}
        for name in ("ann", "bob", "cat"):
            clients.append(await signed_in_client(b.url, name, tokens[name]))
            await clients[-1].login(name)
        ann, bob, cat = clients

        def revoked(client: Client) -> bool:
            return any(e.get("code") == "token_revoked" for e in client.events("protocolError"))

        status, _, _ = await api(a.url, "DELETE", "/api/sessions", token=tokens["ann"])
        assert status == 204
        await ann.wait_for(lambda: revoked(ann), timeout=10)
        status, _, _ = await api(
            a.url, "POST", "/api/password", {"old": PASSWORD, "new": "another good password"}, token=tokens["bob"]
        )
        assert status == 204
        await bob.wait_for(lambda: revoked(bob), timeout=10)
        await cat.wait_for(lambda: {"ann", "bob"} <= set(cat.events("userLeft")), timeout=10)
        assert not revoked(cat)  # the others' sockets go on
        assert (await cat.call("chat", "still here"))["ok"]
    finally:
        for client in clients:
            await client.disconnect()
        for proc in (a, b):
            await asyncio.to_thread(proc.terminate)
