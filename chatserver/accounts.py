"""Accounts: credentials, revoked tokens, failed-login counters, the signing
key. This module alone owns the tables of migration 0007.

Passwords are hashed with Argon2id (argon2-cffi's defaults) in a worker
thread: a hash takes tens of milliseconds of CPU, which would stall every
socket if done on the event loop. A hash made with older parameters is
replaced at the next successful sign-in.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from .config import Settings

PASSWORD_MIN_BYTES = 10
PASSWORD_MAX_BYTES = 256  # Argon2 takes any length; this bounds the work a request costs
SECRET_NAME = "jwt_hs256"

_meta = sa.MetaData()
# Tokens checked per query when a process checks its sockets' tokens.
SWEEP_CHUNK = 500
accounts_table = sa.Table(
    "accounts",
    _meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("password_hash", sa.String(255), nullable=False),
    sa.Column("is_admin", sa.Boolean, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("tokens_after", sa.Float, nullable=False),
    sa.Column("banned_until", sa.Float, nullable=True),
)
revoked_table = sa.Table(
    "revoked_tokens",
    _meta,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("expires", sa.Float, nullable=False),
)
failures_table = sa.Table(
    "login_failures",
    _meta,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("window_start", sa.Float, nullable=False),
)
secrets_table = sa.Table(
    "server_secrets",
    _meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)

_hasher = PasswordHasher()
# Argon2id's defaults take 64 MiB and tens of milliseconds a hash: a burst of
# sign-ins must queue, not run 30 at once in the thread pool.
HASHES_AT_ONCE = 4
# Verified against when the name is unknown, so that a wrong name costs the
# same time as a wrong password (no telling which names exist by timing).
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


class PasswordBad(ValueError):
    pass


def check_password(raw: object) -> str:
    if not isinstance(raw, str):
        raise PasswordBad("the password must be a string")
    try:
        size = len(raw.encode("utf-8"))
    except UnicodeEncodeError:
        raise PasswordBad("the password is not valid Unicode") from None
    if not PASSWORD_MIN_BYTES <= size <= PASSWORD_MAX_BYTES:
        raise PasswordBad(f"the password must be {PASSWORD_MIN_BYTES} to {PASSWORD_MAX_BYTES} bytes (UTF-8)")
    return raw


@dataclass(frozen=True)
class Account:
    name: str
    is_admin: bool
    tokens_after: float
    banned_until: float | None

    def banned(self, now: float) -> bool:
        return self.banned_until is not None and self.banned_until > now


def _account(row: sa.Row | None) -> Account | None:
    if row is None:
        return None
    return Account(row.name, bool(row.is_admin), row.tokens_after, row.banned_until)


class Accounts:
    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self._hashing = asyncio.Semaphore(HASHES_AT_ONCE)

    async def _hash(self, password: str) -> str:
        async with self._hashing:
            return await asyncio.to_thread(_hasher.hash, password)

    async def _verify(self, stored: str, password: str) -> None:
        async with self._hashing:
            await asyncio.to_thread(_hasher.verify, stored, password)

    # -- the signing key -----------------------------------------------------
    async def signing_key(self) -> str:
        """CHAT_SECRET_KEY, or the key generated into the database by the
        first process that needed one (every process on that database then
        shares it)."""
        if self.settings.secret_key:
            return self.settings.secret_key
        async with self.engine.begin() as conn:
            value = await conn.scalar(sa.select(secrets_table.c.value).where(secrets_table.c.name == SECRET_NAME))
        if value is not None:
            return value
        try:
            async with self.engine.begin() as conn:
                await conn.execute(secrets_table.insert().values(name=SECRET_NAME, value=secrets.token_urlsafe(48)))
        except IntegrityError:
            pass  # another process generated it first: use that one
        async with self.engine.begin() as conn:
            stored = await conn.scalar(sa.select(secrets_table.c.value).where(secrets_table.c.name == SECRET_NAME))
        if not isinstance(stored, str):
            raise RuntimeError("the signing key could not be stored nor read")
        return stored

    # -- accounts --------------------------------------------------------------
    async def get(self, name: str) -> Account | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(accounts_table).where(accounts_table.c.name == name))).first()
        return _account(row)

    async def create(self, name: str, password: str) -> Account:
        """Insert the account; IntegrityError if the name is taken. The
        first account is made admin."""
        password_hash = await self._hash(password)
        now = time.time()
        async with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Registrations one at a time, so two on an empty table do not
                # both count none (SQLite: the writer engine's BEGIN IMMEDIATE
                # already serializes them). Registering is rare; sign-ins and
                # token checks only read and are not held up.
                await conn.exec_driver_sql("LOCK TABLE accounts IN SHARE ROW EXCLUSIVE MODE")
            first = await conn.scalar(sa.select(sa.func.count()).select_from(accounts_table)) == 0
            await conn.execute(
                accounts_table.insert().values(
                    name=name, password_hash=password_hash, is_admin=first, created=now, tokens_after=0.0
                )
            )
        return Account(name, first, 0.0, None)

    async def remove(self, name: str) -> None:
        """Undo a create whose AccountCreated event could not be stored."""
        async with self.engine.begin() as conn:
            await conn.execute(accounts_table.delete().where(accounts_table.c.name == name))

    async def verify(self, name: str, password: str) -> Account | None:
        """The account if the password is right (rehashing it if argon2's
        parameters changed since), else None."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(accounts_table).where(accounts_table.c.name == name))).first()
        stored = row.password_hash if row is not None else _DUMMY_HASH
        try:
            await self._verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if _hasher.check_needs_rehash(stored):
            await self._set_hash(name, password, revoke_tokens=False)
        return _account(row)

    async def change_password(self, name: str, new: str) -> None:
        await self._set_hash(name, new, revoke_tokens=True)

    async def _set_hash(self, name: str, password: str, *, revoke_tokens: bool) -> None:
        password_hash = await self._hash(password)
        values: dict[str, object] = {"password_hash": password_hash}
        if revoke_tokens:
            # Every token issued so far (on any device) stops working
            # (tokens carry iat to the millisecond).
            values["tokens_after"] = time.time()
        async with self.engine.begin() as conn:
            await conn.execute(accounts_table.update().where(accounts_table.c.name == name).values(**values))

    async def make_admin(self, name: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                accounts_table.update().where(accounts_table.c.name == name).values(is_admin=True)
            )
        return result.rowcount == 1

    async def ban(self, name: str, until: float) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(accounts_table.update().where(accounts_table.c.name == name).values(banned_until=until))

    # -- revoked tokens ----------------------------------------------------------
    async def revoke(self, jti: str, expires: float) -> None:
        now = time.time()
        async with self.engine.begin() as conn:
            # Rows of tokens that have expired anyway are no longer needed.
            await conn.execute(revoked_table.delete().where(revoked_table.c.expires < now))
            exists = await conn.scalar(sa.select(revoked_table.c.jti).where(revoked_table.c.jti == jti))
            if exists is None:
                await conn.execute(revoked_table.insert().values(jti=jti, expires=expires))

    async def no_longer_valid(self, tokens: list[tuple[str, str, float]]) -> set[str]:
        """Of these tokens (jti, account name, issued at), the jtis revoked
        since, or issued before their account's last password change, or of
        an account that is gone. Read in chunks, so a process's every socket
        can be checked at once."""
        invalid: set[str] = set()
        async with self.engine.connect() as conn:
            for start in range(0, len(tokens), SWEEP_CHUNK):
                chunk = tokens[start : start + SWEEP_CHUNK]
                jtis = [jti for jti, _name, _issued in chunk]
                names = sorted({name for _jti, name, _issued in chunk})
                revoked = await conn.execute(sa.select(revoked_table.c.jti).where(revoked_table.c.jti.in_(jtis)))
                invalid.update(jti for (jti,) in revoked)
                rows = await conn.execute(
                    sa.select(accounts_table.c.name, accounts_table.c.tokens_after).where(accounts_table.c.name.in_(names))
                )
                after = {name: tokens_after for name, tokens_after in rows}
                invalid.update(jti for jti, name, issued in chunk if name not in after or issued < after[name])
        return invalid

    async def is_revoked(self, jti: str) -> bool:
        async with self.engine.connect() as conn:
            return await conn.scalar(sa.select(revoked_table.c.jti).where(revoked_table.c.jti == jti)) is not None

    # -- brute force -------------------------------------------------------------
    def _limits(self, name: str, address: str) -> list[tuple[str, int]]:
        s = self.settings
        return [(f"account:{name}", s.login_failures_per_account), (f"address:{address}", s.login_failures_per_address)]

    async def attempt(self, name: str, address: str) -> int:
        """Count a sign-in attempt as a failure before the password is
        checked (so that a thousand guesses sent at once are counted before
        any is verified), and say how many seconds until sign-in may be
        tried again for this name or from this address (0: go ahead).
        Kept in the database: a restart gives an attacker no fresh budget."""
        return await self._count(self._limits(name, address), self.settings.login_failure_window)

    async def registering(self, address: str) -> int:
        """Count a registration from ``address`` before its password is
        hashed; seconds until it may register again (0: go ahead)."""
        s = self.settings
        return await self._count([(f"register:{address}", s.registrations_per_address)], s.registration_window)

    async def _count(self, limits: list[tuple[str, int]], window: int) -> int:
        try:
            return await self._count_once(limits, window)
        except IntegrityError:
            # A concurrent attempt inserted the same key first: count on it.
            return await self._count_once(limits, window)

    async def _count_once(self, limits: list[tuple[str, int]], window: int) -> int:
        now = time.time()
        wait = 0.0
        key_col = failures_table.c.key
        async with self.engine.begin() as conn:
            for key, limit in limits:
                # Updates first: on PostgreSQL each takes the row's lock, so
                # concurrent attempts count one after another.
                fresh = await conn.execute(
                    failures_table.update()
                    .where(key_col == key, failures_table.c.window_start + window <= now)
                    .values(failures=1, window_start=now)
                )
                if fresh.rowcount == 0:
                    more = await conn.execute(
                        failures_table.update().where(key_col == key).values(failures=failures_table.c.failures + 1)
                    )
                    if more.rowcount == 0:
                        await conn.execute(failures_table.insert().values(key=key, failures=1, window_start=now))
                row = (await conn.execute(sa.select(failures_table).where(key_col == key))).one()
                if row.failures > limit:
                    wait = max(wait, row.window_start + window - now)
        return int(wait) + 1 if wait > 0 else 0

    async def succeeded(self, name: str, address: str) -> None:
        """The password was right: the attempt was no failure. The account's
        count starts again; the address's loses this one attempt only (one
        address guessing at many accounts stays limited)."""
        async with self.engine.begin() as conn:
            await conn.execute(failures_table.delete().where(failures_table.c.key == f"account:{name}"))
            await conn.execute(
                failures_table.update()
                .where(failures_table.c.key == f"address:{address}", failures_table.c.failures > 0)
                .values(failures=failures_table.c.failures - 1)
            )
