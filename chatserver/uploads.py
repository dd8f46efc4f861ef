"""Images and files: upload tokens, the HTTP routes, the upload table,
thumbnails and the cleanup of uploads never posted.

An upload is a row in ``uploads`` (its id, owner, name, sniffed type, size,
content hash, image size and thumbnail hash) and a blob in the blob store
(``blobs.py``). It belongs to its uploader until a chat posts it; the
chat's event carries its metadata, and the writer marks the row posted (its
position and conversation) in the same transaction, so a file is either
unposted (the uploader's alone, removed after ``CHAT_UPLOAD_UNPOSTED_TTL``)
or posted where the log says (seen by whoever may see that conversation).

HTTP requests are authorized by an upload token, issued to a logged-in
socket (``uploadToken``) and stored hashed in ``upload_tokens``: any process
sharing the database accepts it, for as long as the log shows the session
it was issued to online and at most ``CHAT_UPLOAD_TOKEN_TTL`` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import BodyPartReader, web
from PIL import Image, ImageOps
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import domain
from .blobs import BlobStore
from .config import Settings
from .events import LOBBY_SCOPE, MessagePosted, PrivateMessageSent, StoredEvent, scope_of
from .sniff import SAFE_INLINE, SAMPLE_BYTES, sniff
from .store import COMMAND_ID_MAX, SCOPE_MAX, metadata

log = logging.getLogger(__name__)

NAME_MAX = 255  # characters of a file's name
TYPE_MAX = 100
CHUNK = 256 * 1024  # bytes read from the request and written at a time
# Multipart framing around the one file part: a request longer than the
# file limit by more than this is refused before it is read.
MULTIPART_SLACK = 16 * 1024
THUMB_SIZE = (320, 320)
THUMBNAILED = frozenset({"JPEG", "PNG", "GIF", "WEBP"})  # Pillow's format names
HOUR = 3600.0
# An upload older than its TTL less this is no longer posted: the cleanup
# may be removing it at that very moment.
POST_MARGIN = 60.0
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_BEARER = re.compile(r"Bearer\s+(\S+)", re.IGNORECASE)

uploads_table = sa.Table(
    "uploads",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("name", sa.String(NAME_MAX), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(TYPE_MAX), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("width", sa.Integer, nullable=True),
    sa.Column("height", sa.Integer, nullable=True),
    sa.Column("thumb_sha256", sa.String(64), nullable=True),
    sa.Column("thumb_type", sa.String(32), nullable=True),
    sa.Column("created", sa.Float, nullable=False),  # seconds since the epoch
    # Set when a chat posts it, in the chat's transaction.
    sa.Column("posted_position", sa.BigInteger, nullable=True),
    sa.Column("scope", sa.String(SCOPE_MAX), nullable=True),
    sa.Column("command_id", sa.String(COMMAND_ID_MAX), nullable=True),
    sa.Index("ix_uploads_owner_created", "owner", "created"),
    sa.Index("ix_uploads_sha256", "sha256"),
    sa.Index("ix_uploads_thumb_sha256", "thumb_sha256"),
    sa.Index("ix_uploads_unposted", "posted_position", "created"),
)

upload_tokens_table = sa.Table(
    "upload_tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("session", sa.String(64), nullable=False),
    sa.Column("expires", sa.Float, nullable=False),
    sa.Index("ix_upload_tokens_expires", "expires"),
)

# Compiled once (the SQLite writer thread caches statements by identity).
_MARK_POSTED = (
    uploads_table.update()
    .where(uploads_table.c.id == sa.bindparam("u_id"), uploads_table.c.posted_position.is_(None))
    .values(
        posted_position=sa.bindparam("u_position"),
        scope=sa.bindparam("u_scope"),
        command_id=sa.bindparam("u_command"),
    )
)


async def mark_posted(conn: AsyncConnection, stored: list[StoredEvent]) -> None:
    """In the append's transaction: the uploads a chat carries are posted to
    its conversation (once: the first chat to carry one wins, and commands
    refuse a second)."""
    rows = [
        {"u_id": a["id"], "u_position": s.position, "u_scope": scope_of(s.event), "u_command": s.command_id}
        for s in stored
        if isinstance(s.event, MessagePosted | PrivateMessageSent) and s.event.attachments
        for a in s.event.attachments
    ]
    if rows:
        await conn.execute(_MARK_POSTED, rows)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def clean_name(raw: str | None) -> str:
    """A file's name as others will see it: the last path segment, no
    control, format or bidi characters (a right-to-left override could make
    ``gnp.exe`` read as ``exe.png``), at most ``NAME_MAX`` characters."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = name.encode("utf-8", "replace").decode("utf-8")
    name = "".join(ch if ch.isprintable() else "_" for ch in name).strip(" .")
    return name[:NAME_MAX] or "file"


class TooManyPixels(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ImageInfo:
    width: int
    height: int
    thumb: bytes | None
    thumb_type: str | None


def inspect_image(path: Path, max_pixels: int) -> ImageInfo | None:
    """Width and height as shown (EXIF orientation applied) and a thumbnail
    of at most 320x320 with no metadata; None if Pillow cannot read it.
    Runs in a thread: decoding takes a while. Refuses (``TooManyPixels``)
    an image larger than ``max_pixels`` before decoding a pixel of it."""
    try:
        with Image.open(path) as im:
            width, height = im.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise TooManyPixels(f"{width}x{height}")
            if im.format not in THUMBNAILED:
                return None
            # JPEG can decode at a fraction of its size: enough for a thumbnail.
            im.draft("RGB", (THUMB_SIZE[0] * 2, THUMB_SIZE[1] * 2))
            shown = ImageOps.exif_transpose(im)
            if shown.size != im.size and (shown.width, shown.height) == (im.height, im.width):
                width, height = height, width
            shown.thumbnail(THUMB_SIZE)
            alpha = shown.mode in ("RGBA", "LA", "PA") or "transparency" in shown.info
            clean = shown.convert("RGBA" if alpha else "RGB")
            # A new image's pixels only: no EXIF (location), ICC or text chunks.
            clean = Image.frombytes(clean.mode, clean.size, clean.tobytes())
            out = BytesIO()
            if alpha:
                clean.save(out, "PNG", optimize=True)
                return ImageInfo(width, height, out.getvalue(), "image/png")
            clean.save(out, "JPEG", quality=85)
            return ImageInfo(width, height, out.getvalue(), "image/jpeg")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixels(str(exc)) from None
    except TooManyPixels:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Not an image after all, or a broken one: a file without a thumbnail.
        log.info("no thumbnail for an upload: %s", exc)
        return None


class ApiError(web.HTTPException):
    """A refusal with the JSON body ``{error, message}`` the API answers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        super().__init__(text=json.dumps({"error": code, "message": message}), content_type="application/json", headers=headers)


def _error(status: int, code: str, message: str, **headers: str) -> web.HTTPException:
    return ApiError(status, code, message, headers or None)


def content_disposition(kind: str, name: str) -> str:
    quoted = urllib.parse.quote(name, safe="")
    # An ASCII fallback for old clients, and the exact name as RFC 5987 has it.
    fallback = "".join(ch if ch.isascii() and ch.isalnum() or ch in "._-" else "_" for ch in name) or "file"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quoted}"


class Uploads:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        blobs: BlobStore,
        session_of: Callable[[str], str | None],
        may_see: Callable[[str, str], bool],
    ) -> None:
        """``session_of(name)``: the session the log shows ``name`` online
        under (None: offline); ``may_see(name, scope)``: whether ``name`` may
        see that conversation now."""
        self.settings = settings
        self.engine = engine
        self.blobs = blobs
        self.session_of = session_of
        self.may_see = may_see
        # Bytes being received per user (counted against the hourly budget).
        self._receiving: dict[str, int] = {}
        # Upload ids submitted in a chat not yet committed -> its command id.
        self._posting: dict[str, str] = {}
        # Serializes what adds a reference to a blob with the cleanup that
        # removes unreferenced blobs (within this process; see README).
        self._blob_lock = asyncio.Lock()
        # Bomb checks use the same bound as Pillow's own (which it applies
        # in Image.open: a warning past it, an error past twice it).
        Image.MAX_IMAGE_PIXELS = settings.upload_max_pixels

    # -- tokens --------------------------------------------------------------------
    async def issue_token(self, name: str, session: str) -> dict[str, Any]:
        token = secrets.token_urlsafe(32)
        ttl = self.settings.upload_token_ttl
        async with self.engine.begin() as conn:
            await conn.execute(
                upload_tokens_table.insert(),
                {"token_hash": hash_token(token), "name": name, "session": session, "expires": time.time() + ttl},
            )
        return {"token": token, "expiresIn": ttl}

    async def authenticate(self, request: web.Request) -> str:
        """The user a request's token was issued to, or 401."""
        header = request.headers.get("Authorization", "")
        match = _BEARER.fullmatch(header.strip()) if header else None
        token = match.group(1) if match else request.query.get("token", "")
        if not token or len(token) > 200:
            raise _error(401, "unauthorized", "an upload token is needed (uploadToken)")
        t = upload_tokens_table
        async with self.engine.connect() as conn:
            row = (await conn.execute(sa.select(t).where(t.c.token_hash == hash_token(token)))).first()
        if row is None or row.expires < time.time() or self.session_of(row.name) != row.session:
            raise _error(401, "unauthorized", "the upload token is unknown, expired or its session ended")
        return row.name

    # -- upload --------------------------------------------------------------------
    async def _usage(self, name: str) -> tuple[int, float]:
        """Bytes ``name`` uploaded in the last hour, and when the oldest of
        them leaves that hour."""
        t = uploads_table
        now = time.time()
        async with self.engine.connect() as conn:
            used, oldest = (
                await conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(t.c.size), 0), sa.func.min(t.c.created)).where(
                        t.c.owner == name, t.c.created > now - HOUR
                    )
                )
            ).one()
        return int(used) + self._receiving.get(name, 0), (oldest + HOUR - now) if oldest is not None else 1.0

    def _rate_limited(self, retry_after: float) -> web.HTTPException:
        return _error(
            429,
            "rate_limited",
            f"at most {self.settings.upload_bytes_per_hour} bytes an hour",
            **{"Retry-After": str(max(1, math.ceil(retry_after)))},
        )

    async def upload(self, request: web.Request) -> web.Response:
        name = await self.authenticate(request)
        limit = self.settings.upload_max_bytes
        if request.content_type != "multipart/form-data":
            raise _error(400, "bad_request", "send multipart/form-data with one part named file")
        if request.content_length is not None and request.content_length > limit + MULTIPART_SLACK:
            raise _error(413, "too_large", f"a file may have at most {limit} bytes")
        used, retry_after = await self._usage(name)
        budget = self.settings.upload_bytes_per_hour - used
        if budget <= 0:
            raise self._rate_limited(retry_after)
        try:
            reader = await request.multipart()
            part = await reader.next()
        except (ValueError, AssertionError) as exc:
            raise _error(400, "bad_request", f"not a multipart body: {exc}") from None
        if not isinstance(part, BodyPartReader) or part.name != "file" or part.filename is None:
            raise _error(400, "bad_request", "send one part named file, with a filename")
        staged = self.blobs.staging_file()
        try:
            sha, size, sample = await self._receive(part, staged, name, min(limit, budget), limit, retry_after)
            if await reader.next() is not None:
                raise _error(400, "bad_request", "send one part only")
            return web.json_response(await self._finish(name, clean_name(part.filename), staged, sha, size, sample), status=201)
        finally:
            # Whatever happened (a refusal, a dropped connection), nothing
            # partial is kept: a complete upload has been renamed by now.
            staged.unlink(missing_ok=True)

    async def _receive(
        self, part: BodyPartReader, staged: Path, name: str, allowed: int, limit: int, retry_after: float
    ) -> tuple[str, int, bytes]:
        """Stream the part to ``staged``, hashing it: never whole in memory."""
        hasher = hashlib.sha256()
        sample = b""
        size = 0
        try:
            with open(staged, "wb") as out:
                while chunk := await part.read_chunk(CHUNK):
                    size += len(chunk)
                    self._receiving[name] = self._receiving.get(name, 0) + len(chunk)
                    if size > limit:
                        raise _error(413, "too_large", f"a file may have at most {limit} bytes")
                    if size > allowed:
                        raise self._rate_limited(retry_after)
                    hasher.update(chunk)
                    # A page-cache write of one chunk: brief enough for the loop.
                    out.write(chunk)
                    if len(sample) < SAMPLE_BYTES:
                        sample += chunk[: SAMPLE_BYTES - len(sample)]
        finally:
            left = self._receiving.get(name, 0) - size
            if left > 0:
                self._receiving[name] = left
            else:
                self._receiving.pop(name, None)
        return hasher.hexdigest(), size, sample

    async def _finish(self, owner: str, name: str, staged: Path, sha: str, size: int, sample: bytes) -> dict[str, Any]:
        mime = sniff(sample)
        info = await self._image(staged, sha, mime)
        row: dict[str, Any] = {
            "id": secrets.token_urlsafe(18),
            "owner": owner,
            "name": name,
            "size": size,
            "type": mime,
            "sha256": sha,
            "width": info.width if info else None,
            "height": info.height if info else None,
            "thumb_sha256": None,
            "thumb_type": info.thumb_type if info else None,
            "created": time.time(),
        }
        async with self._blob_lock:
            if info is not None and info.thumb is not None:
                row["thumb_sha256"] = hashlib.sha256(info.thumb).hexdigest()
                await asyncio.to_thread(self.blobs.put_bytes, info.thumb, row["thumb_sha256"])
            # The row first: from the moment the blob is there, it is referenced.
            async with self.engine.begin() as conn:
                await conn.execute(uploads_table.insert(), row)
            self.blobs.commit(staged, sha)
        return self.wire(row)

    async def _image(self, staged: Path, sha: str, mime: str) -> ImageInfo | None:
        if not mime.startswith("image/") or mime == "image/svg+xml":
            return None
        t = uploads_table
        async with self.engine.connect() as conn:
            known = (
                await conn.execute(
                    sa.select(t.c.width, t.c.height, t.c.thumb_sha256, t.c.thumb_type)
                    .where(t.c.sha256 == sha, t.c.width.is_not(None))
                    .limit(1)
                )
            ).first()
        if known is not None and known.thumb_sha256 is not None:
            path = self.blobs.local_path(known.thumb_sha256)
            if path is not None:
                # The same bytes were thumbnailed before: once is enough.
                return ImageInfo(known.width, known.height, path.read_bytes(), known.thumb_type)
        try:
            return await asyncio.to_thread(inspect_image, staged, self.settings.upload_max_pixels)
        except TooManyPixels as exc:
            raise _error(
                413,
                "too_many_pixels",
                f"an image may have at most {self.settings.upload_max_pixels} pixels ({exc})",
            ) from None

    @staticmethod
    def wire(row: Any) -> dict[str, Any]:
        """An upload as clients see it (and, with its hash, as the log holds it)."""
        get = row.get if isinstance(row, dict) else row._mapping.get
        out: dict[str, Any] = {"id": get("id"), "name": get("name"), "size": get("size"), "type": get("type")}
        if get("width") is not None:
            out["width"], out["height"] = get("width"), get("height")
        out["thumb"] = get("thumb_sha256") is not None
        return out

    # -- posting ---------------------------------------------------------------------
    async def for_posting(self, owner: str, ids: tuple[str, ...], command_id: str) -> tuple[dict[str, Any], ...]:
        """The attachments a chat of ``owner`` may post: each upload its own
        and not posted yet (or posted by this very command: a retry)."""
        t = uploads_table
        async with self.engine.connect() as conn:
            rows = {r.id: r for r in await conn.execute(sa.select(t).where(t.c.id.in_(ids)))}
        ttl = self.settings.upload_unposted_ttl
        fresh_after = time.time() - ttl + min(POST_MARGIN, ttl / 4)
        out = []
        for upload_id in ids:
            row = rows.get(upload_id)
            if row is None or row.owner != owner:
                raise domain.BadAttachment("no upload of yours has that id")
            if row.posted_position is not None:
                if row.command_id != command_id:
                    raise domain.BadAttachment(f"{row.name} has been posted already")
            elif row.created < fresh_after:
                raise domain.BadAttachment(f"{row.name} was uploaded too long ago; upload it again")
            out.append({**self.wire(row), "sha256": row.sha256})
        return tuple(out)

    def hold(self, ids: tuple[str, ...], command_id: str) -> None:
        """Between a chat's check and its commit: the same upload in another
        chat is refused (the first one posts it)."""
        if any(self._posting.get(i, command_id) != command_id for i in ids):
            raise domain.BadAttachment("that upload is being posted in another message")
        for upload_id in ids:
            self._posting[upload_id] = command_id

    def release(self, ids: tuple[str, ...]) -> None:
        for upload_id in ids:
            self._posting.pop(upload_id, None)

    # -- download --------------------------------------------------------------------
    async def _authorized(self, request: web.Request) -> Any:
        name = await self.authenticate(request)
        upload_id = request.match_info["id"]
        row = None
        if _UPLOAD_ID.fullmatch(upload_id):
            t = uploads_table
            async with self.engine.connect() as conn:
                row = (await conn.execute(sa.select(t).where(t.c.id == upload_id))).first()
        if row is None:
            raise _error(404, "not_found", "no such file")
        if row.posted_position is None:
            allowed = row.owner == name
        else:
            allowed = row.scope == LOBBY_SCOPE or self.may_see(name, row.scope)
        if not allowed:
            raise _error(403, "forbidden", "this file was not shared with you")
        return row

    def _serve(self, sha: str, mime: str, disposition: str) -> web.StreamResponse:
        path = self.blobs.local_path(sha)
        if path is None:
            log.warning("blob %s is missing from the store", sha)
            raise _error(404, "not_found", "the file's contents are missing")
        headers = {
            "Content-Type": f"{mime}; charset=utf-8" if mime.startswith("text/") else mime,
            "X-Content-Type-Options": "nosniff",
            "Content-Disposition": disposition,
            # Even opened directly, nothing in it runs or loads anything.
            "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox",
            # Whoever may see it can change (a room member leaves): revalidate.
            "Cache-Control": "private, no-cache",
        }
        # aiohttp's file response: Range, ETag and If-None-Match, sendfile.
        return web.FileResponse(path, headers=headers)

    async def download(self, request: web.Request) -> web.StreamResponse:
        row = await self._authorized(request)
        kind = "inline" if row.type in SAFE_INLINE else "attachment"
        return self._serve(row.sha256, row.type, content_disposition(kind, row.name))

    async def thumbnail(self, request: web.Request) -> web.StreamResponse:
        row = await self._authorized(request)
        if row.thumb_sha256 is None:
            raise _error(404, "not_found", "this file has no thumbnail")
        return self._serve(row.thumb_sha256, row.thumb_type, content_disposition("inline", f"thumb-{row.name}"))

    # -- cleanup ---------------------------------------------------------------------
    async def cleanup(self) -> int:
        """Remove the uploads not posted within their TTL (rows, then the
        blobs nothing references any more), expired tokens, and staging
        files a crash left. Returns how many uploads went."""
        t = uploads_table
        now = time.time()
        cutoff = now - self.settings.upload_unposted_ttl
        async with self._blob_lock:
            async with self.engine.begin() as conn:
                await conn.execute(upload_tokens_table.delete().where(upload_tokens_table.c.expires < now))
                gone = (
                    await conn.execute(
                        sa.select(t.c.id, t.c.sha256, t.c.thumb_sha256).where(
                            t.c.posted_position.is_(None), t.c.created < cutoff
                        )
                    )
                ).all()
                gone = [g for g in gone if g.id not in self._posting]
                if not gone:
                    return 0
                # Posted meanwhile (a chat on another process): kept.
                await conn.execute(
                    t.delete().where(t.c.id.in_([g.id for g in gone]), t.c.posted_position.is_(None))
                )
                hashes = {g.sha256 for g in gone} | {g.thumb_sha256 for g in gone if g.thumb_sha256}
                referenced = {
                    h
                    for (h,) in await conn.execute(
                        sa.select(t.c.sha256).where(t.c.sha256.in_(hashes)).union(
                            sa.select(t.c.thumb_sha256).where(t.c.thumb_sha256.in_(hashes))
                        )
                    )
                }
            for sha in hashes - referenced:
                self.blobs.delete(sha)
        self.blobs.sweep_staging(max(HOUR, self.settings.upload_unposted_ttl))
        return len(gone)

    def cleanup_interval(self) -> float:
        # A tenth of the TTL, between a second and five minutes: an upload
        # outlives its TTL by at most that.
        return min(300.0, max(1.0, self.settings.upload_unposted_ttl / 10))

    async def run_cleanup(self) -> None:
        while True:
            await asyncio.sleep(self.cleanup_interval())
            try:
                removed = await self.cleanup()
                if removed:
                    log.info("removed %d upload(s) never posted", removed)
            except Exception as exc:  # the database may be down: try again later
                log.warning("could not clean up unposted uploads: %s", exc)


UPLOADS_KEY: web.AppKey[Uploads] = web.AppKey("uploads", Uploads)


def setup_upload_routes(app: web.Application) -> None:
    """The routes, registered with the app (before the index fallback); the
    ``Uploads`` they use is made when the app starts."""

    def uploads() -> Uploads:
        found = app.get(UPLOADS_KEY)
        if found is None:
            raise web.HTTPServiceUnavailable(text="starting\n")
        return found

    async def post(request: web.Request) -> web.StreamResponse:
        return await uploads().upload(request)

    async def get(request: web.Request) -> web.StreamResponse:
        return await uploads().download(request)

    async def thumb(request: web.Request) -> web.StreamResponse:
        return await uploads().thumbnail(request)

    app.router.add_post("/api/uploads", post)
    app.router.add_get("/files/{id}", get)
    app.router.add_get("/files/{id}/thumb", thumb)
