"""Hostile text and numbers (issue 10, points 1 and 6): what a client sends is
checked before anything is submitted, so one bad string or number fails its
own request only, and the server logs no traceback for it.

The rules themselves are tested on domain.check_* directly (a table of
characters); the rest runs a real server with real Socket.IO clients."""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatserver import domain
from chatserver.domain import BadPayload, DomainError, MessageEmpty, MessageTooLong, NameBad
from tests.support import Client, InProcessServer, log_of, migrated_sqlite, running_server, settings_for

MAX = 2000
INT64_MAX = 2**63 - 1

# -- the character table ------------------------------------------------------
# (character, what it is, allowed inside a name, allowed inside a message)
CHARACTERS: list[tuple[str, str, bool, bool]] = [
    ("\ud800", "lone high surrogate (Cs)", False, False),
    ("\udfff", "lone low surrogate (Cs)", False, False),
    ("\x00", "NUL (Cc)", False, False),
    ("\x1b", "escape (Cc)", False, False),
    ("\x7f", "delete (Cc)", False, False),
    ("\x85", "next line (Cc)", False, False),
    ("\r", "carriage return (Cc)", False, False),
    ("\n", "newline (Cc)", False, True),
    ("\t", "tab (Cc)", False, True),
    ("\u00ad", "soft hyphen (Cf)", False, False),
    ("\u061c", "Arabic letter mark (Cf, bidi)", False, False),
    ("\u200b", "zero width space (Cf)", False, False),
    ("\u200c", "zero width non-joiner (Cf)", False, True),
    ("\u200d", "zero width joiner (Cf)", False, True),
    ("\u200e", "left-to-right mark (Cf, bidi)", False, False),
    ("\u200f", "right-to-left mark (Cf, bidi)", False, False),
    ("\u202a", "left-to-right embedding (Cf, bidi)", False, False),
    ("\u202e", "right-to-left override (Cf, bidi)", False, False),
    ("\u2066", "left-to-right isolate (Cf, bidi)", False, False),
    ("\u2069", "pop directional isolate (Cf, bidi)", False, False),
    ("\u2060", "word joiner (Cf)", False, False),
    ("\ufeff", "byte order mark (Cf)", False, False),
    ("\U000e0001", "language tag (Cf)", False, False),
    ("\U000e0067", "tag letter g (Cf, flag sequences)", False, True),
    ("\U000e007f", "cancel tag (Cf, flag sequences)", False, True),
    ("\ue000", "private use (Co)", False, False),
    ("\U000f0000", "supplementary private use (Co)", False, False),
    ("\u0378", "unassigned (Cn)", False, False),
    ("\U0010ffff", "noncharacter (Cn)", False, False),
    ("\U0001fae8", "an emoji newer than this Unicode (Cn in an emoji block)", False, True),
    ("\u2028", "line separator (Zl)", False, False),
    ("\u2029", "paragraph separator (Zp)", False, False),
    ("\u00a0", "no-break space (Zs)", False, True),
    ("\u2003", "em space (Zs)", False, True),
    ("\u3000", "ideographic space (Zs)", False, True),
    ("\ufe0f", "variation selector 16 (Mn)", False, True),
    ("\U000e0100", "variation selector 17 (Mn)", False, True),
    ("\u034f", "combining grapheme joiner (Mn, invisible)", False, True),
    ("\u3164", "Hangul filler (Lo, invisible)", False, True),
    ("\u2800", "braille blank (So, blank)", False, True),
    ("\u0301", "combining acute accent (Mn)", True, True),
    ("é", "e with acute (Ll)", True, True),
    ("ß", "sharp s (Ll)", True, True),
    ("Ж", "Cyrillic Zhe (Lu)", True, True),
    ("中", "CJK ideograph (Lo)", True, True),
    ("😀", "emoji (So)", True, True),
    ("<", "less-than (Sm): HTML is text", True, True),
    ("&", "ampersand (Po)", True, True),
]
IDS = [what for _, what, _, _ in CHARACTERS]


@pytest.mark.parametrize(("ch", "what", "in_name", "in_message"), CHARACTERS, ids=IDS)
def test_character_table_for_names(ch: str, what: str, in_name: bool, in_message: bool) -> None:
    name = "ab" + ch + "cd"
    if in_name:
        assert domain.check_name(name) == unicodedata.normalize("NFC", name)
    else:
        with pytest.raises(NameBad):
            domain.check_name(name)


@pytest.mark.parametrize(("ch", "what", "in_name", "in_message"), CHARACTERS, ids=IDS)
def test_character_table_for_messages(ch: str, what: str, in_name: bool, in_message: bool) -> None:
    message = "hi " + ch + " there"
    if in_message:
        assert domain.check_message(message, max_chars=MAX) == message  # stored as typed
    else:
        with pytest.raises(BadPayload):
            domain.check_message(message, max_chars=MAX)


def test_everything_that_passes_can_be_encoded() -> None:
    # In a name and in a message: what passes is valid UTF-8. Every code point
    # of planes 0, 1 and 14 (surrogates, controls, formats, emoji, tags,
    # variation selectors), and a sample of the rest (ideographs, private use,
    # unassigned), to stay quick.
    codes = [*range(0x20000), *range(0xE0000, 0xE1000), *range(0x20000, 0x110000, 97)]
    passed_names = passed_messages = 0
    for code in codes:
        ch = chr(code)
        try:
            name = domain.check_name("ab" + ch)
        except NameBad:
            pass
        else:
            name.encode("utf-8")
            passed_names += 1
        try:
            message = domain.check_message(ch + "x", max_chars=MAX)
        except DomainError:
            pass
        else:
            message.encode("utf-8")
            passed_messages += 1
    assert passed_names > 50_000 and passed_messages > passed_names


def test_names_are_nfc_and_counted_on_it() -> None:
    nfc, nfd = "jos\u00e9", "jose\u0301"
    assert domain.check_name(nfd) == nfc == domain.check_name(nfc)
    # Ten characters once composed, though eleven code points as sent.
    assert domain.check_name("abcdefghi" + "e\u0301") == "abcdefghi\u00e9"
    # Korean: jamo as typed on some keyboards compose to one syllable each.
    assert domain.check_name("\u1112\u1161\u11ab\u1100\u1173\u11af\u1100\u1161") == "\ud55c\uae00\uac00"
    with pytest.raises(NameBad):
        domain.check_name("e\u0301e\u0301")  # two characters in NFC
    with pytest.raises(NameBad):
        domain.check_name("a" * 10 + "\u0301" * 200)  # too long to be worth normalizing


@pytest.mark.parametrize(
    "value",
    ["ab", "abcdefghijk", "", "   ", " bob", "bob ", "bo  b", "\u00a0bob", "bob\u200b", "\u202ebobcat",
     "bob\ufe0f", "\u3164\u3164\u3164", "ab\ud800", "\ud83d\ude00\ud83d", 123, None, True, ["bob"], {"name": "bob"}],
)
def test_bad_names(value: object) -> None:
    with pytest.raises(NameBad):
        domain.check_name(value)


@pytest.mark.parametrize("value", ["bob", "Bob", "bo b", "a b c", "<b>x</b>", "O'Brien", "😀😀😀", "名前です"])
def test_good_names_are_kept(value: str) -> None:
    assert domain.check_name(value) == value


def test_messages() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    for good in ["hi", "two\nlines\tand a tab", family, england, "\u2764\ufe0f", "jose\u0301", "x" * MAX]:
        assert domain.check_message(good, max_chars=MAX) == good
    for empty in ["", "   ", "\n\t ", "\u200d", "\ufe0f\u200c"]:
        with pytest.raises(MessageEmpty):
            domain.check_message(empty, max_chars=MAX)
    with pytest.raises(MessageTooLong):
        domain.check_message("x" * (MAX + 1), max_chars=MAX)
    for bad in ["ab\ud800", "\udc00", "x\u202ey", "a\x07", "a\rb", 5, None, b"bytes", ["x"]]:
        with pytest.raises(BadPayload):
            domain.check_message(bad, max_chars=MAX)


@pytest.mark.parametrize(
    "request_",
    [{"before": 10**30}, {"before": 2**63}, {"before": -5}, {"before": 0}, {"before": 1.5}, {"before": 1e308},
     {"before": float("nan")}, {"before": True}, {"before": "3"}, {"limit": 10**30}, {"limit": 2**63},
     {"limit": 0}, {"limit": -1}, {"limit": 2.0}, {"limit": False}, {"limit": None}, [1, 2], "x", 7],
)
def test_bad_pages(request_: object) -> None:
    with pytest.raises(BadPayload):
        domain.check_page(request_, cap=200)


def test_good_pages() -> None:
    assert domain.check_page(None, cap=200) == (None, 200)
    assert domain.check_page({}, cap=200) == (None, 200)
    assert domain.check_page({"before": INT64_MAX, "limit": INT64_MAX}, cap=200) == (INT64_MAX, 200)
    assert domain.check_page({"before": 1, "limit": 1}, cap=200) == (1, 1)
    assert domain.check_page({"before": None, "limit": 7}, cap=200) == (None, 7)


def test_positions() -> None:
    assert domain.check_position(0, 10) == 0 and domain.check_position(10, 10) == 10
    for bad in [11, -1, 10**30, 2**63, 1.5, 1e308, float("nan"), True, False, "3", None]:
        with pytest.raises(BadPayload):
            domain.check_position(bad, 10)


def test_resume_tokens() -> None:
    import secrets

    token = secrets.token_urlsafe(32)  # as the server issues them
    assert domain.check_resume_token(token) == token
    for bad in ["\ud800" * 20, "a" * 20 + "\x00", "a" * 9, "a" * 201, "a" * 20 + "=", "\u00e9" * 20, 12345678901, None]:
        with pytest.raises(domain.ResumeRefused) as refused:
            domain.check_resume_token(bad)
        assert refused.value.code == "invalid_token"


# -- against a real server -------------------------------------------------------


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


async def connected(server: InProcessServer) -> Client:
    return await Client(server.url).connect()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[InProcessServer]:
    url = migrated_sqlite(tmp_path) if request.param == "sqlite" else request.getfixturevalue("pg_url")
    async with running_server(settings_for(url)) as srv:
        yield srv


async def test_hostile_strings_fail_alone(any_server: InProcessServer, caplog: pytest.LogCaptureFixture) -> None:
    """Lone surrogates, in logins of a socket that is not logged in and in
    chats of one that is, interleaved with an innocent user's chats: each
    hostile request is refused before it reaches a batch; every innocent chat
    is stored and acknowledged."""
    server = any_server
    caplog.set_level(logging.WARNING)
    innocent, lurker, evil = await connected(server), await connected(server), await connected(server)
    try:
        await innocent.login("alice")
        await evil.login("eve")

        async def hostile(i: int) -> tuple[str, dict[str, object]]:
            if i % 2:
                return "login", await lurker.call("login", f"ab\ud800{i % 10}")
            return "chat", await evil.call("chat", f"bad {i} \udfff")

        async def innocent_chat(i: int) -> dict[str, object]:
            return await innocent.call("chat", f"innocent {i}")

        tasks = []
        for i in range(200):
            tasks.append(hostile(i))
            if i % 2 == 0:
                tasks.append(innocent_chat(i // 2))
        results = await asyncio.gather(*tasks)
        innocent_acks = [r for r in results if isinstance(r, dict)]
        hostile_acks = [r for r in results if isinstance(r, tuple)]
        assert len(innocent_acks) == 100 and len(hostile_acks) == 200
        assert all(ack["ok"] is True for ack in innocent_acks), [a for a in innocent_acks if not a["ok"]]
        for event, ack in hostile_acks:
            assert ack["ok"] is False
            assert ack["error"] == ("name_bad" if event == "login" else "bad_payload"), (event, ack)
        # The seed's answer to a bad login: loginNameBad with the name as sent.
        await lurker.wait_event("loginNameBad", count=100)
        assert all("\ud800" in name for name in lurker.events("loginNameBad"))
        assert (await innocent.call("onlineUsers")) == ["alice", "eve"]
        await innocent.wait_event("chat", count=100)
        assert [m["message"] for m in innocent.events("chat")] == [f"innocent {i}" for i in range(100)]
    finally:
        for c in (innocent, lurker, evil):
            await c.disconnect()
    stored = [e for e in await log_of(server.settings.database_url) if e.type == "MessagePosted"]
    assert [(e.event.sender, e.event.message) for e in stored] == [  # type: ignore[attr-defined]
        ("alice", f"innocent {i}") for i in range(100)
    ]
    no_tracebacks(caplog)


async def test_look_alike_names_are_one_name(server: InProcessServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    bob, jose, other = await connected(server), await connected(server), await connected(server)
    try:
        await bob.login("bobcat")
        for look_alike in ["bobcat\u200b", "\u202ebobcat", "bobcat\ufe0f", "bob\u00a0cat", " bobcat", "bobcat "]:
            ack = await other.call("login", look_alike)
            assert ack["ok"] is False and ack["error"] == "name_bad", look_alike
        await other.wait_event("loginNameBad", count=6)
        # NFD in, NFC everywhere: the ack, welcome, userJoined, onlineUsers, the log.
        ack = await jose.call("login", "jose\u0301")
        assert ack["ok"] is True and ack["name"] == "jos\u00e9"
        await jose.wait_for(lambda: "jos\u00e9" in jose.events("userJoined"))
        assert jose.events("welcome")[0]["name"] == "jos\u00e9"
        assert await jose.call("onlineUsers") == ["bobcat", "jos\u00e9"]
        # The other form is the same name, already online.
        ack = await other.call("login", "jos\u00e9")
        assert ack["ok"] is False and ack["error"] == "name_taken"
        await other.wait_event("loginNameExists")
        chat = await jose.call("chat", "hola")
        assert chat["ok"] is True
        await bob.wait_event("chat")
        assert bob.events("chat")[0]["sender"] == "jos\u00e9"
    finally:
        for c in (bob, jose, other):
            await c.disconnect()
    log = await log_of(server.settings.database_url)
    names = {e.event.name for e in log if e.type == "UserJoined"}  # type: ignore[attr-defined]
    assert names == {"bobcat", "jos\u00e9"}
    no_tracebacks(caplog)


async def test_character_table_through_the_server(server: InProcessServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    names, chatter = await connected(server), await connected(server)
    try:
        await chatter.login("chatter")
        sent = []
        for i, (ch, what, in_name, in_message) in enumerate(CHARACTERS):
            if in_name:
                continue  # a good name would log this socket in
            ack = await names.call("login", "ab" + ch + "cd")
            assert ack["ok"] is False and ack["error"] == "name_bad", what
            message = f"{i}: {ch}!"
            ack = await chatter.call("chat", message)
            assert ack["ok"] is in_message and (in_message or ack["error"] == "bad_payload"), (what, ack)
            if in_message:
                sent.append(message)
        await chatter.wait_event("chat", count=len(sent))
        assert [m["message"] for m in chatter.events("chat")] == sent  # as typed
    finally:
        await names.disconnect()
        await chatter.disconnect()
    no_tracebacks(caplog)


async def test_numbers_out_of_range_are_bad_payload(
    server: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    a = await connected(server)
    try:
        await a.login("alice")
        for i in range(3):
            assert (await a.call("chat", f"m{i}"))["ok"]
        for request in [{"before": 10**30}, {"limit": 10**30}, {"before": -5}, {"before": 1.5}, {"before": 2**63},
                        {"before": 1e308}, {"before": True}, {"limit": -(10**30)}, {"before": 3, "limit": 2**64}]:
            ack = await a.call("history", request)
            assert ack["ok"] is False and ack["error"] == "bad_payload", (request, ack)
        # The largest good values are served.
        page = await a.call("history", {"before": INT64_MAX, "limit": INT64_MAX})
        assert page["ok"] is True and [i.get("message") for i in page["items"]][-3:] == ["m0", "m1", "m2"]
        token = a.events("welcome")[0]["resumeToken"]
    finally:
        await a.disconnect()
    b = await connected(server)
    try:
        for last in [10**30, 2**63, -1, 1.5, True, "5", None]:
            ack = await b.call("resume", {"token": token, "lastPosition": last})
            assert ack["ok"] is False and ack["error"] == "bad_payload", (last, ack)
        await b.wait_event("resumeFailed", count=7)
        # Refusals took nothing: the token still resumes.
        ack = await b.call("resume", {"token": token, "lastPosition": 0})
        assert ack["ok"] is True and ack["name"] == "alice"
    finally:
        await b.disconnect()
    no_tracebacks(caplog)


async def test_resume_token_that_is_not_text(server: InProcessServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    c = await connected(server)
    try:
        ack = await c.call("resume", {"token": "\ud800" * 20, "lastPosition": 0})
        assert ack["ok"] is False and ack["error"] == "invalid_token", ack
        await c.login("alice")  # the socket carries on
    finally:
        await c.disconnect()
    no_tracebacks(caplog)
