"""Signed access tokens (JWT, HS256 only) and the accounts HTTP routes.

Routes (JSON in and out; errors ``{error, message}``):

- ``GET /api/auth/mode``            -> ``{mode}``
- ``POST /api/accounts``            ``{name, password}`` -> 201 ``{name}``
- ``POST /api/sessions``            ``{name, password}`` -> ``{token, expiresIn, name, admin}``
- ``POST /api/sessions/refresh``    Bearer token -> ``{token, expiresIn}``
- ``DELETE /api/sessions``          Bearer token -> 204 (revoked)
- ``POST /api/password``            Bearer token, ``{old, new}`` -> 204

Tokens travel in the ``Authorization`` header and the Socket.IO handshake's
``auth``, never in a cookie: a cookie would be sent by the browser on any
site's request (CSRF), a header only by our own script.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
import orjson
from aiohttp import web
from sqlalchemy.exc import IntegrityError

from . import domain
from .accounts import Account, Accounts, PasswordBad, check_password
from .config import Settings
from .events import AccountCreated, NewEvent, account_stream
from .store import ConcurrencyError

log = logging.getLogger(__name__)

ALGORITHMS = ["HS256"]  # fixed: a token naming any other algorithm (or none) is refused
REQUIRED_CLAIMS = ["sub", "iat", "exp", "jti"]
MAX_BODY = 4096  # bytes of a JSON request body here


class TokenRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Claims:
    name: str
    jti: str
    issued: float  # seconds, to the millisecond (whole seconds in older tokens)
    expires: int


class Tokens:
    """Issues and checks access tokens against the accounts table."""

    def __init__(self, settings: Settings, accounts: Accounts, key: str) -> None:
        self.settings = settings
        self.accounts = accounts
        self._key = key

    def issue(self, name: str) -> tuple[str, int]:
        now = time.time()
        ttl = self.settings.token_ttl
        # iat to the millisecond (a NumericDate may have a fraction): a
        # password change revokes what was issued before it, even within
        # the same second, and not what is issued after it.
        claims = {"sub": name, "iat": round(now, 3), "exp": int(now) + ttl, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self._key, algorithm="HS256"), ttl

    def decode(self, token: object) -> Claims:
        """The claims of a well-signed, unexpired token (no database)."""
        if not isinstance(token, str) or not token or len(token) > 4096:
            raise TokenRefused("auth_required", "sign in first: the handshake needs auth {token}")
        try:
            claims = jwt.decode(token, self._key, algorithms=ALGORITHMS, options={"require": REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError:
            raise TokenRefused("expired_token", "the token has expired; sign in again or refresh it") from None
        except jwt.PyJWTError:
            raise TokenRefused("invalid_token", "the token is not valid") from None
        sub, jti, iat, exp = claims["sub"], claims["jti"], claims["iat"], claims["exp"]
        if not (
            isinstance(sub, str)
            and isinstance(jti, str)
            and isinstance(iat, int | float)
            and not isinstance(iat, bool)
            and isinstance(exp, int)
        ):
            raise TokenRefused("invalid_token", "the token is not valid")
        return Claims(sub, jti, iat, exp)

    async def check(self, token: object) -> tuple[Claims, Account]:
        """Decode, then look up what the signature cannot say: revoked, the
        account gone or its password changed since, banned."""
        claims = self.decode(token)
        account = await self.accounts.get(claims.name)
        if account is None or claims.issued < account.tokens_after or await self.accounts.is_revoked(claims.jti):
            raise TokenRefused("invalid_token", "the token was revoked; sign in again")
        if account.banned(time.time()):
            raise TokenRefused("banned", f"{claims.name} is banned")
        return claims, account


def _error(status: type[web.HTTPException], code: str, message: str, **headers: str) -> web.HTTPException:
    body = orjson.dumps({"error": code, "message": message}).decode()
    return status(text=body, content_type="application/json", headers=headers)


async def _json(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _error(web.HTTPBadRequest, "bad_payload", "the request is too large")
    body = await request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise _error(web.HTTPBadRequest, "bad_payload", "the request is too large")
    try:
        data = orjson.loads(body)
    except ValueError:
        raise _error(web.HTTPBadRequest, "bad_payload", "the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise _error(web.HTTPBadRequest, "bad_payload", "the body must be a JSON object")
    return data


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _error(web.HTTPUnauthorized, "auth_required", "send Authorization: Bearer <token>")
    return token.strip()


AUTH_KEY = web.AppKey("auth", object)


class AuthRoutes:
    """The HTTP side. ``submit`` appends events to the log (the service's
    writer); ``revoked`` tells the sockets a token was revoked or a
    password changed, so that sockets using it end now."""

    def __init__(
        self,
        settings: Settings,
        accounts: Accounts,
        tokens: Tokens,
        submit: Callable[[list[NewEvent]], Awaitable[Any]],
        revoked: Callable[[str | None, str | None], None],
    ) -> None:
        self.settings = settings
        self.accounts = accounts
        self.tokens = tokens
        self.submit = submit
        self.revoked = revoked

    def _require_accounts(self) -> None:
        if self.settings.auth_mode != "accounts":
            raise _error(web.HTTPNotFound, "not_available", "the server runs in open mode: there are no accounts")

    async def register(self, request: web.Request) -> web.Response:
        self._require_accounts()
        data = await _json(request)
        try:
            name = domain.check_name(data.get("name"))
            password = check_password(data.get("password"))
        except domain.NameBad as exc:
            raise _error(web.HTTPBadRequest, "name_bad", exc.message) from None
        except PasswordBad as exc:
            raise _error(web.HTTPBadRequest, "password_bad", str(exc)) from None
        wait = await self.accounts.registering(request.remote or "unknown")
        if wait:
            raise _error(
                web.HTTPTooManyRequests, "rate_limited", f"too many registrations; try again in {wait} s",
                **{"Retry-After": str(wait)},
            )
        try:
            await self.accounts.create(name, password)
        except IntegrityError:
            raise _error(web.HTTPConflict, "name_taken", f"{name} is taken") from None
        try:
            # Version 1 of the account's stream: the log says the name is taken.
            await self.submit([NewEvent(account_stream(name), 1, AccountCreated(name), uuid.uuid4().hex)])
        except ConcurrencyError:
            # In the log from an earlier life of this database: the name is taken.
            await self.accounts.remove(name)
            raise _error(web.HTTPConflict, "name_taken", f"{name} is taken") from None
        except Exception:
            await self.accounts.remove(name)
            raise
        return web.json_response({"name": name}, status=201)

    async def sign_in(self, request: web.Request) -> web.Response:
        self._require_accounts()
        data = await _json(request)
        name, password = data.get("name"), data.get("password")
        address = request.remote or "unknown"
        if not isinstance(name, str) or not isinstance(password, str):
            raise _error(web.HTTPBadRequest, "bad_payload", "send {name, password}")
        try:
            name = domain.check_name(name)
        except domain.NameBad:
            raise _error(web.HTTPUnauthorized, "bad_credentials", "wrong name or password") from None
        wait = await self.accounts.attempt(name, address)
        if wait:
            raise _error(
                web.HTTPTooManyRequests, "rate_limited", f"too many failed sign-ins; try again in {wait} s",
                **{"Retry-After": str(wait)},
            )
        if len(password.encode("utf-8", "replace")) > 256:
            account = None  # longer than any password we accept: not hashed at all
        else:
            account = await self.accounts.verify(name, password)
        if account is None:
            raise _error(web.HTTPUnauthorized, "bad_credentials", "wrong name or password")
        await self.accounts.succeeded(name, address)
        if account.banned(time.time()):
            raise _error(web.HTTPForbidden, "banned", f"{name} is banned")
        token, ttl = self.tokens.issue(name)
        return web.json_response({"token": token, "expiresIn": ttl, "name": name, "admin": account.is_admin})

    async def _checked(self, request: web.Request) -> tuple[Any, Account]:
        self._require_accounts()
        try:
            return await self.tokens.check(_bearer(request))
        except TokenRefused as exc:
            raise _error(web.HTTPUnauthorized, exc.code, exc.message) from None

    async def refresh(self, request: web.Request) -> web.Response:
        claims, _account = await self._checked(request)
        token, ttl = self.tokens.issue(claims.name)
        return web.json_response({"token": token, "expiresIn": ttl})

    async def sign_out(self, request: web.Request) -> web.Response:
        claims, _account = await self._checked(request)
        await self.accounts.revoke(claims.jti, claims.expires)
        self.revoked(claims.jti, None)
        return web.Response(status=204)

    async def change_password(self, request: web.Request) -> web.Response:
        claims, _account = await self._checked(request)
        data = await _json(request)
        old = data.get("old")
        try:
            new = check_password(data.get("new"))
        except PasswordBad as exc:
            raise _error(web.HTTPBadRequest, "password_bad", str(exc)) from None
        if not isinstance(old, str) or await self.accounts.verify(claims.name, old) is None:
            raise _error(web.HTTPUnauthorized, "bad_credentials", "the old password is wrong")
        await self.accounts.change_password(claims.name, new)
        # Every token of the account, this one included, stops working.
        self.revoked(None, claims.name)
        return web.Response(status=204)


def setup_auth_routes(app: web.Application, settings: Settings) -> None:
    """Registered before the index fallback; the handlers reach the live
    ``AuthRoutes`` (made at start, when the database is there)."""

    async def mode(_request: web.Request) -> web.Response:
        return web.json_response({"mode": settings.auth_mode})

    def live(method: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            if settings.auth_mode != "accounts":
                raise _error(web.HTTPNotFound, "not_available", "the server runs in open mode: there are no accounts")
            routes = app.get(AUTH_KEY)
            if not isinstance(routes, AuthRoutes):
                raise _error(web.HTTPServiceUnavailable, "server_error", "starting; try again")
            return await getattr(routes, method)(request)

        return handler

    app.router.add_get("/api/auth/mode", mode)
    app.router.add_post("/api/accounts", live("register"))
    app.router.add_post("/api/sessions", live("sign_in"))
    app.router.add_post("/api/sessions/refresh", live("refresh"))
    app.router.add_delete("/api/sessions", live("sign_out"))
    app.router.add_post("/api/password", live("change_password"))
