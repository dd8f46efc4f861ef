"""Images and files (issue 14), end to end: a real server on loopback, real
Socket.IO clients for tokens and chats, real HTTP requests for uploads and
downloads, and the data folder and the event log looked at afterwards."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from chatserver.events import MessagePosted, PrivateMessageSent
from aiohttp import web

from chatserver.app import create_app
from chatserver.web import AccessLogger
from tests.support import Client, InProcessServer, log_of, settings_for


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


async def start(db_url: str, data_dir: Path, **overrides: Any) -> InProcessServer:
    return await InProcessServer(settings_for(db_url, data_dir=data_dir, **overrides)).start()


@pytest.fixture
async def srv(db_url: str, data_dir: Path) -> AsyncIterator[InProcessServer]:
    server = await start(db_url, data_dir)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class User:
    """A logged-in socket and its upload token."""

    def __init__(self, client: Client, token: str) -> None:
        self.client = client
        self.token = token

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def user(url: str, name: str) -> User:
    client = await Client(url).connect()
    await client.login(name)
    ack = await client.call("uploadToken")
    assert ack["ok"] is True, ack
    assert len(ack["token"]) >= 22 and ack["expiresIn"] == 600
    return User(client, ack["token"])


async def upload(
    http: aiohttp.ClientSession,
    url: str,
    who: User | None,
    data: bytes,
    filename: str = "file.bin",
    content_type: str = "application/octet-stream",
    field: str = "file",
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    # Unquoted field values, as browsers send them (raw UTF-8 file names).
    form = aiohttp.FormData(quote_fields=False)
    form.add_field(field, data, filename=filename, content_type=content_type)
    headers = who.auth if who is not None else {}
    async with http.post(f"{url}/api/uploads", data=form, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def fetch(http: aiohttp.ClientSession, url: str, who: User | None, **headers: str) -> tuple[int, bytes, Any]:
    if who is not None:
        headers = {**who.auth, **headers}
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers


def png(width: int = 40, height: int = 30, color: tuple[int, ...] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def blob_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "blobs").rglob("*") if p.is_file()) if (data_dir / "blobs").exists() else []


def part_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "tmp").glob("*.part")) if (data_dir / "tmp").exists() else []


async def chat(u: User, message: str, **options: Any) -> dict[str, Any]:
    return await u.client.call("chat", message, options)


# -- upload, post, receive, download ------------------------------------------------


async def test_upload_post_receive_download_and_thumbnail(
    srv: InProcessServer, http: aiohttp.ClientSession, db_url: str, data_dir: Path
) -> None:
    ann, bob = await user(srv.url, "ann"), await user(srv.url, "bob")
    image = png(640, 480)
    status, up, _ = await upload(http, srv.url, ann, image, "red.png", "image/png")
    assert status == 201, up
    assert up["name"] == "red.png" and up["size"] == len(image) and up["type"] == "image/png"
    assert (up["width"], up["height"], up["thumb"]) == (640, 480, True)
    assert set(up) == {"id", "name", "size", "type", "width", "height", "thumb"}

    ack = await chat(ann, "", attachments=[up["id"]])
    assert ack["ok"] is True, ack
    await bob.client.wait_for(lambda: any(c.get("attachments") for c in bob.client.events("chat")))
    live = next(c for c in bob.client.events("chat") if c.get("attachments"))
    assert live["message"] == "" and live["sender"] == "ann"
    assert live["attachments"] == [up]  # no content hash on the wire

    status, body, headers = await fetch(http, f"{srv.url}/files/{up['id']}", bob)
    assert status == 200 and body == image
    assert headers["Content-Type"] == "image/png"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Disposition"].startswith("inline")

    # Ranges and revalidation, as aiohttp's file response does them.
    status, part, headers = await fetch(http, f"{srv.url}/files/{up['id']}", bob, Range="bytes=0-7")
    assert status == 206 and part == image[:8]
    etag = headers["ETag"]
    status, _, _ = await fetch(http, f"{srv.url}/files/{up['id']}", bob, **{"If-None-Match": etag})
    assert status == 304

    status, thumb, headers = await fetch(http, f"{srv.url}/files/{up['id']}/thumb", bob)
    assert status == 200 and headers["Content-Type"] in ("image/jpeg", "image/png")
    with Image.open(io.BytesIO(thumb)) as t:
        assert t.size == (320, 240)

    # The token also works in the query (an <img src>).
    async with http.get(f"{srv.url}/files/{up['id']}/thumb?token={bob.token}") as resp:
        assert resp.status == 200

    # The log holds the metadata and the hash; a text chat's payload is as before.
    await chat(ann, "just text")
    log = await log_of(db_url)
    posted = [s.event for s in log if isinstance(s.event, MessagePosted)]
    with_file, text = posted[-2], posted[-1]
    # Content-addressed: the blob's name is the hash the log records.
    assert with_file.attachments[0]["sha256"] == hashlib.sha256(image).hexdigest()
    assert with_file.attachments[0]["sha256"] in {p.name for p in blob_files(data_dir)}
    assert {k: v for k, v in with_file.attachments[0].items() if k != "sha256"} == up
    assert text.attachments == ()
    assert "attachments" not in next(c for c in bob.client.events("chat") if c["message"] == "just text")

    # History carries them too.
    late = await Client(srv.url).connect()
    await late.login("cyd")
    history = (await late.wait_event("history"))[0]["items"]
    assert [i.get("attachments") for i in history if i["kind"] == "chat"] == [[up], None]
    for c in (ann.client, bob.client, late):
        await c.disconnect()


async def test_who_may_fetch(srv: InProcessServer, http: aiohttp.ClientSession) -> None:
    ann, bob, cyd = await user(srv.url, "ann"), await user(srv.url, "bob"), await user(srv.url, "cyd")
    _, lobby_file, _ = await upload(http, srv.url, ann, b"for the lobby\n", "a.txt")
    url = f"{srv.url}/files/{lobby_file['id']}"
    # Not posted yet: the uploader's alone.
    assert (await fetch(http, url, ann))[0] == 200
    assert (await fetch(http, url, bob))[0] == 403
    assert (await fetch(http, url, None))[0] == 401
    assert (await fetch(http, url, None, Authorization="Bearer not-a-token"))[0] == 401
    assert (await fetch(http, f"{srv.url}/files/AAAAAAAAAAAAAAAAAAAAAAAA", ann))[0] == 404
    assert (await chat(ann, "see this", attachments=[lobby_file["id"]]))["ok"]
    assert (await fetch(http, url, bob))[0] == 200

    # A room: its members only.
    assert (await ann.client.call("createRoom", {"room": "Dev"}))["ok"]
    assert (await bob.client.call("joinRoom", {"room": "dev"}))["ok"]
    _, room_file, _ = await upload(http, srv.url, ann, b"for Dev\n", "dev.txt")
    assert (await chat(ann, "", attachments=[room_file["id"]], room="Dev"))["ok"]
    room_url = f"{srv.url}/files/{room_file['id']}"
    assert (await fetch(http, room_url, bob))[0] == 200
    assert (await fetch(http, room_url, cyd))[0] == 403
    await bob.client.wait_for(lambda: any(c.get("attachments") for c in bob.client.events("roomChat")))
    # Leaving the room ends it.
    assert (await bob.client.call("leaveRoom", {"room": "Dev"}))["ok"]
    await asyncio.sleep(0.2)
    assert (await fetch(http, room_url, bob))[0] == 403

    # A private conversation: its two parties.
    _, dm_file, _ = await upload(http, srv.url, ann, b"psst\n", "secret.txt")
    assert (await chat(ann, "for you", attachments=[dm_file["id"]], to="bob"))["ok"]
    await bob.client.wait_for(lambda: bool(bob.client.events("privateMessage")))
    assert bob.client.events("privateMessage")[0]["attachments"] == [dm_file]
    dm_url = f"{srv.url}/files/{dm_file['id']}"
    assert (await fetch(http, dm_url, bob))[0] == 200
    assert (await fetch(http, dm_url, ann))[0] == 200
    assert (await fetch(http, dm_url, cyd))[0] == 403
    history = await bob.client.call("history", {"with": "ann"})
    assert history["items"][-1]["attachments"] == [dm_file]
    for u in (ann, bob, cyd):
        await u.client.disconnect()


async def test_a_token_ends_with_its_session(srv: InProcessServer, http: aiohttp.ClientSession) -> None:
    ann = await user(srv.url, "ann")
    _, up, _ = await upload(http, srv.url, ann, b"x" * 10)
    assert (await fetch(http, f"{srv.url}/files/{up['id']}", ann))[0] == 200
    await ann.client.disconnect()
    await asyncio.sleep(0.3)
    assert (await fetch(http, f"{srv.url}/files/{up['id']}", ann))[0] == 401
    status, body, _ = await upload(http, srv.url, ann, b"y")
    assert status == 401 and body["error"] == "unauthorized"
    anon = await Client(srv.url).connect()
    ack = await anon.call("uploadToken")
    assert ack == {"ok": False, "error": "not_logged_in", "message": ack["message"]}
    await anon.disconnect()


# -- types ------------------------------------------------------------------------


async def test_a_content_type_lie_is_served_as_what_it_is(
    srv: InProcessServer, http: aiohttp.ClientSession
) -> None:
    ann = await user(srv.url, "ann")
    page = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"
    status, up, _ = await upload(http, srv.url, ann, page, "cat.png", "image/png")
    assert status == 201 and up["type"] == "text/html" and up["thumb"] is False and "width" not in up
    status, body, headers = await fetch(http, f"{srv.url}/files/{up['id']}", ann)
    assert status == 200 and body == page
    assert headers["Content-Type"].startswith("text/html")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Content-Disposition"].startswith("attachment;")
    assert "filename*=UTF-8''cat.png" in headers["Content-Disposition"]
    assert (await fetch(http, f"{srv.url}/files/{up['id']}/thumb", ann))[0] == 404

    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    _, up, _ = await upload(http, srv.url, ann, svg, "logo.svg", "image/svg+xml")
    assert up["type"] == "image/svg+xml" and up["thumb"] is False
    _, _, headers = await fetch(http, f"{srv.url}/files/{up['id']}", ann)
    assert headers["Content-Disposition"].startswith("attachment;")

    # A real PNG claimed to be text is a PNG; a name with a path and a
    # right-to-left override is cut to its last segment, the override gone.
    _, up, _ = await upload(http, srv.url, ann, png(), "../../x/\u202egnp.exe", "text/plain")
    assert up["type"] == "image/png" and up["name"] == "_gnp.exe"
    await ann.client.disconnect()


async def test_thumbnail_applies_exif_orientation_and_strips_metadata(
    srv: InProcessServer, http: aiohttp.ClientSession
) -> None:
    ann = await user(srv.url, "ann")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to show
    exif[0x010F] = "SecretCam"  # make
    exif[0x0131] = "where I live"  # software, standing in for any private tag
    photo = io.BytesIO()
    Image.new("RGB", (400, 200), (10, 120, 200)).save(photo, "JPEG", exif=exif.tobytes())
    status, up, _ = await upload(http, srv.url, ann, photo.getvalue(), "photo.jpg", "image/jpeg")
    assert status == 201 and up["type"] == "image/jpeg"
    assert (up["width"], up["height"]) == (200, 400)  # as shown
    _, thumb, _ = await fetch(http, f"{srv.url}/files/{up['id']}/thumb", ann)
    assert b"SecretCam" not in thumb and b"where I live" not in thumb
    with Image.open(io.BytesIO(thumb)) as t:
        assert t.size == (160, 320)
        assert dict(t.getexif()) == {}
        assert "icc_profile" not in t.info and "exif" not in t.info
    await ann.client.disconnect()


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit PNG of ``width`` x ``height`` zero pixels: a few KiB that
    decode to width*height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("width", "height", "max_pixels"), [(20000, 20000, None), (120, 100, 10_000)])
async def test_a_decompression_bomb_is_refused(
    db_url: str, data_dir: Path, http: aiohttp.ClientSession, width: int, height: int, max_pixels: int | None
) -> None:
    overrides = {"upload_max_pixels": max_pixels} if max_pixels else {}
    server = await start(db_url, data_dir, **overrides)
    try:
        ann = await user(server.url, "ann")
        bomb = png_bomb(width, height)
        assert len(bomb) < 200_000
        status, body, _ = await upload(http, server.url, ann, bomb, "bomb.png", "image/png")
        assert status == 413 and body["error"] == "too_many_pixels", body
        assert blob_files(data_dir) == [] and part_files(data_dir) == []
        # An image within the bound is fine.
        status, _, _ = await upload(http, server.url, ann, png(90, 100), "ok.png", "image/png")
        assert status == 201
        await ann.client.disconnect()
    finally:
        await server.stop()


# -- store ------------------------------------------------------------------------


async def test_identical_uploads_share_one_blob_and_one_thumbnail(
    srv: InProcessServer, http: aiohttp.ClientSession, data_dir: Path
) -> None:
    ann, bob = await user(srv.url, "ann"), await user(srv.url, "bob")
    image = png(500, 500, (1, 2, 3))
    _, first, _ = await upload(http, srv.url, ann, image, "one.png")
    _, second, _ = await upload(http, srv.url, bob, image, "two.png")
    assert first["id"] != second["id"] and second["name"] == "two.png"
    assert (first["width"], first["thumb"]) == (second["width"], second["thumb"]) == (500, True)
    assert len(blob_files(data_dir)) == 2  # the image and its thumbnail
    # Ids are not the hash: one upload's id says nothing of another's.
    assert (await fetch(http, f"{srv.url}/files/{second['id']}", ann))[0] == 403
    assert part_files(data_dir) == []
    for u in (ann, bob):
        await u.client.disconnect()


# -- limits -----------------------------------------------------------------------


async def test_size_limit(db_url: str, data_dir: Path, http: aiohttp.ClientSession) -> None:
    server = await start(db_url, data_dir, upload_max_bytes=100_000)
    try:
        ann = await user(server.url, "ann")
        status, body, _ = await upload(http, server.url, ann, b"a" * 100_001)
        assert status == 413 and body["error"] == "too_large"
        # A body announcing far more is refused before it is read.
        status, body, _ = await upload(http, server.url, ann, b"b" * 400_000)
        assert status == 413
        assert blob_files(data_dir) == [] and part_files(data_dir) == []
        status, body, _ = await upload(http, server.url, ann, b"c" * 100_000)
        assert status == 201 and body["size"] == 100_000
        await ann.client.disconnect()
    finally:
        await server.stop()


async def test_hourly_byte_budget(db_url: str, data_dir: Path, http: aiohttp.ClientSession) -> None:
    server = await start(db_url, data_dir, upload_bytes_per_hour=50_000)
    try:
        ann, bob = await user(server.url, "ann"), await user(server.url, "bob")
        assert (await upload(http, server.url, ann, b"1" * 30_000))[0] == 201
        status, body, headers = await upload(http, server.url, ann, b"2" * 30_000)
        assert status == 429 and body["error"] == "rate_limited"
        assert 3500 <= int(headers["Retry-After"]) <= 3600
        assert (await upload(http, server.url, ann, b"3" * 20_000))[0] == 201
        status, _, _ = await upload(http, server.url, ann, b"4")
        assert status == 429
        # Per user: bob has his own.
        assert (await upload(http, server.url, bob, b"5" * 30_000))[0] == 201
        assert len(blob_files(data_dir)) == 3 and part_files(data_dir) == []
        for u in (ann, bob):
            await u.client.disconnect()
    finally:
        await server.stop()


async def test_attachment_refusals(srv: InProcessServer, http: aiohttp.ClientSession) -> None:
    ann, bob = await user(srv.url, "ann"), await user(srv.url, "bob")
    _, mine, _ = await upload(http, srv.url, ann, b"mine")
    unknown = "A" * 24
    assert (await chat(ann, "x", attachments=[unknown]))["error"] == "bad_attachment"
    assert (await chat(bob, "x", attachments=[mine["id"]]))["error"] == "bad_attachment"
    assert (await chat(ann, "x", attachments=[mine["id"]] * 2))["error"] == "bad_attachment"
    assert (await chat(ann, "x", attachments=[unknown] * 11))["error"] == "too_many_attachments"
    assert (await chat(ann, "x", attachments="nope"))["error"] == "bad_payload"
    assert (await chat(ann, "   "))["error"] == "empty_message"
    ack = await chat(ann, "once", attachments=[mine["id"]], id="m-1")
    assert ack["ok"] is True
    # A retry of the same chat is answered with the original...
    assert await chat(ann, "once", attachments=[mine["id"]], id="m-1") == ack
    # ...and any other chat with it is refused: an upload posts once.
    assert (await chat(ann, "twice", attachments=[mine["id"]]))["error"] == "bad_attachment"
    assert (await chat(ann, "twice", attachments=[mine["id"]], id="m-2"))["error"] == "bad_attachment"
    for u in (ann, bob):
        await u.client.disconnect()


async def test_bad_upload_requests(srv: InProcessServer, http: aiohttp.ClientSession, data_dir: Path) -> None:
    ann = await user(srv.url, "ann")
    status, body, _ = await upload(http, srv.url, ann, b"x", field="picture")
    assert status == 400 and body["error"] == "bad_request"
    form = aiohttp.FormData()
    form.add_field("file", b"one", filename="1.txt")
    form.add_field("file", b"two", filename="2.txt")
    async with http.post(f"{srv.url}/api/uploads", data=form, headers=ann.auth) as resp:
        assert resp.status == 400
    async with http.post(f"{srv.url}/api/uploads", data=b"raw", headers=ann.auth) as resp:
        assert resp.status == 400
    assert blob_files(data_dir) == [] and part_files(data_dir) == []
    await ann.client.disconnect()


# -- an interrupted upload; cleanup -------------------------------------------------


async def test_an_interrupted_upload_leaves_no_partial_file(
    srv: InProcessServer, data_dir: Path, http: aiohttp.ClientSession, db_url: str
) -> None:
    ann = await user(srv.url, "ann")
    boundary = "XyZzY"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    announced = len(head) + 5_000_000
    reader, writer = await asyncio.open_connection(srv.settings.host, srv.settings.port)
    writer.write(
        (
            "POST /api/uploads HTTP/1.1\r\n"
            f"Host: {srv.settings.host}\r\n"
            f"Authorization: Bearer {ann.token}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {announced}\r\n\r\n"
        ).encode()
        + head
        + b"z" * 1_000_000
    )
    await writer.drain()
    # The server is receiving it into a staging file...
    for _ in range(100):
        if part_files(data_dir):
            break
        await asyncio.sleep(0.05)
    assert part_files(data_dir), "the upload was never staged"
    # ...when the client goes away.
    writer.transport.abort()
    for _ in range(100):
        if not part_files(data_dir):
            break
        await asyncio.sleep(0.05)
    assert part_files(data_dir) == [] and blob_files(data_dir) == []
    # Nothing was recorded, and the budget is whole again.
    assert (await upload(http, srv.url, ann, b"after"))[0] == 201
    await ann.client.disconnect()


async def test_unposted_uploads_are_removed_after_their_ttl(
    db_url: str, data_dir: Path, http: aiohttp.ClientSession
) -> None:
    server = await start(db_url, data_dir, upload_unposted_ttl=1.0)
    try:
        ann, bob = await user(server.url, "ann"), await user(server.url, "bob")
        _, kept, _ = await upload(http, server.url, ann, png(10, 10, (9, 9, 9)), "kept.png")
        assert (await chat(ann, "", attachments=[kept["id"]]))["ok"]
        _, dropped, _ = await upload(http, server.url, ann, b"never posted")
        _, shared, _ = await upload(http, server.url, ann, b"same bytes")
        _, shared_posted, _ = await upload(http, server.url, bob, b"same bytes")
        assert (await chat(bob, "", attachments=[shared_posted["id"]]))["ok"]
        assert len(blob_files(data_dir)) == 4  # kept + its thumbnail, dropped, same bytes
        await asyncio.sleep(3.5)
        assert (await fetch(http, f"{server.url}/files/{dropped['id']}", ann))[0] == 404
        assert (await fetch(http, f"{server.url}/files/{shared['id']}", ann))[0] == 404
        assert (await fetch(http, f"{server.url}/files/{kept['id']}", bob))[0] == 200
        assert (await fetch(http, f"{server.url}/files/{kept['id']}/thumb", bob))[0] == 200
        # The blob another upload still references stays.
        status, body, _ = await fetch(http, f"{server.url}/files/{shared_posted['id']}", ann)
        assert status == 200 and body == b"same bytes"
        assert len(blob_files(data_dir)) == 3
        # Posting it after its TTL is refused.
        _, late, _ = await upload(http, server.url, ann, b"late")
        await asyncio.sleep(1.2)
        assert (await chat(ann, "", attachments=[late["id"]]))["error"] == "bad_attachment"
        for u in (ann, bob):
            await u.client.disconnect()
    finally:
        await server.stop()


async def test_private_message_events_keep_attachments_in_the_log(
    srv: InProcessServer, http: aiohttp.ClientSession, db_url: str
) -> None:
    ann, bob = await user(srv.url, "ann"), await user(srv.url, "bob")
    _, up, _ = await upload(http, srv.url, ann, b"%PDF-1.4\n...", "doc.pdf")
    assert up["type"] == "application/pdf"
    assert (await chat(ann, "the doc", attachments=[up["id"]], to="bob"))["ok"]
    assert (await chat(ann, "plain", to="bob"))["ok"]
    log = await log_of(db_url)
    private = [s.event for s in log if isinstance(s.event, PrivateMessageSent)]
    assert private[0].attachments[0]["id"] == up["id"] and len(private[0].attachments[0]["sha256"]) == 64
    assert private[1].attachments == ()
    for u in (ann, bob):
        await u.client.disconnect()


async def test_a_token_in_a_url_stays_out_of_the_access_log(
    db_url: str, data_dir: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # aiohttp decides whether to log when a connection opens: level first.
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    settings = settings_for(db_url, data_dir=data_dir)
    # The runner as `chatserver` makes it, with the project's access log.
    runner = web.AppRunner(create_app(settings), handle_signals=False, access_log_class=AccessLogger)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    url = f"http://{settings.host}:{settings.port}"
    try:
        ann = await user(url, "ann")
        _, up, _ = await upload(http, url, ann, b"hello")
        async with http.get(f"{url}/files/{up['id']}?token={ann.token}") as resp:
            assert resp.status == 200
        await asyncio.sleep(0.1)
        lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
        assert any(f"/files/{up['id']}?token=redacted" in line for line in lines), lines
        assert not any(ann.token in line for line in lines)
        await ann.client.disconnect()
    finally:
        await runner.cleanup()


def test_settings_from_the_environment_and_their_checks() -> None:
    from chatserver.check import validate
    from chatserver.config import Settings

    defaults = Settings.from_env({})
    assert defaults.data_dir == Path("data")
    assert (defaults.upload_max_bytes, defaults.upload_bytes_per_hour) == (25 * 1024 * 1024, 200 * 1024 * 1024)
    assert (defaults.files_per_message, defaults.upload_token_ttl, defaults.upload_unposted_ttl) == (10, 600, 3600)
    env = {"CHAT_DATA_DIR": "/srv/files", "CHAT_UPLOAD_MAX_BYTES": "5", "CHAT_UPLOAD_UNPOSTED_TTL": "0"}
    settings = Settings.from_env(env)
    assert settings.data_dir == Path("/srv/files") and settings.upload_max_bytes == 5
    problems, _ = validate(settings)
    assert "CHAT_UPLOAD_UNPOSTED_TTL must be positive, got 0.0" in problems


@pytest.mark.postgres
async def test_two_processes_on_postgres_share_tokens_uploads_and_files(
    pg_url: str, data_dir: Path, http: aiohttp.ClientSession
) -> None:
    """A token from one process works on another, a file uploaded to one is
    posted through the other, and each serves it (one blob store)."""
    one = await start(pg_url, data_dir)
    two = await start(pg_url, data_dir)
    try:
        ann, bob = await user(one.url, "ann"), await user(two.url, "bob")
        # Process two learns of ann's session from the shared log.
        for _ in range(50):
            status, up, _ = await upload(http, two.url, ann, png(64, 48), "pic.png", "image/png")
            if status != 401:
                break
            await asyncio.sleep(0.1)
        assert status == 201 and up["thumb"] is True, up
        assert (await chat(ann, "from one", attachments=[up["id"]]))["ok"]
        await bob.client.wait_for(lambda: any(c.get("attachments") for c in bob.client.events("chat")))
        assert next(c for c in bob.client.events("chat") if c.get("attachments"))["attachments"] == [up]
        for server, who in ((two, bob), (one, ann)):
            status, body, headers = await fetch(http, f"{server.url}/files/{up['id']}", who)
            assert status == 200 and headers["Content-Type"] == "image/png"
        assert (await chat(ann, "again", attachments=[up["id"]]))["error"] == "bad_attachment"
        for u in (ann, bob):
            await u.client.disconnect()
    finally:
        await two.stop()
        await one.stop()
