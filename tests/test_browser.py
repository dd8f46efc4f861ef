"""The browser chat in ``public/``, in a real headless Chromium against a real
server process (``python -m chatserver``) on a free loopback port."""

from __future__ import annotations

import base64
import contextlib
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.browser_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    api,
    expect_account_form,
    expect_signed_in,
    register,
    sign_in,
    stored_session,
    submit_account_form,
    attach,
    chats,
    conversations,
    create_room,
    drop_files,
    expect_chat,
    expect_conversations,
    expect_file_chat,
    expect_members,
    expect_tray_ready,
    fetch,
    file_chats,
    file_payload,
    expect_users,
    join_room,
    login,
    notices,
    open_conversation,
    picture,
    presence,
    request,
    scroll_state,
    send,
    send_many,
    size_text,
    tray,
    users,
    wait_until,
)
from tests.support import ROOT, ServerProcess, migrated_sqlite

pytestmark = pytest.mark.browser

ARTIFACTS = ROOT / "test-artifacts"
CONNECTED = "#status .conn-connected"  # an open-mode page is ready for a name
SIGN_IN_FORM = "#accountForm"  # an accounts-mode page is ready for a sign-in
PageFactory = Callable[..., Page]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (set CHROMIUM, or apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class ServerPool:
    """A fresh server (own database) for each test, started in the background
    while the previous test runs, and stopped in the background after it: a
    server takes a second or two to boot."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.starter = ThreadPoolExecutor(max_workers=1)
        self.stopper = ThreadPoolExecutor(max_workers=1)
        self.count = 0
        migrated_sqlite(directory)  # the migrated template, made once, here
        self.next = self._launch()

    def _launch(self) -> Future[ServerProcess]:
        self.count += 1
        folder = self.directory / f"server-{self.count}"
        folder.mkdir()
        # Uploaded files beside the database, not in the checkout's ./data.
        return self.starter.submit(
            lambda: ServerProcess(migrated_sqlite(folder), CHAT_DATA_DIR=str(folder / "data")).start()
        )

    def take(self) -> ServerProcess:
        ready, self.next = self.next, self._launch()
        return ready.result()

    def stop_later(self, server: ServerProcess) -> None:
        self.stopper.submit(server.terminate)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_later(self.next.result())
        self.starter.shutdown()
        self.stopper.shutdown()  # waits for every stop


@pytest.fixture(scope="module")
def server_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("browser-servers"))
    try:
        yield pool
    finally:
        pool.close()


class Servers:
    """The chat servers of one test."""

    def __init__(self, pool: ServerPool) -> None:
        self.pool = pool
        self.started: list[ServerProcess] = []
        self._default: ServerProcess | None = None

    @property
    def default(self) -> ServerProcess:
        """The test's server (default settings, its own database)."""
        if self._default is None:
            self._default = self.pool.take()
            self.started.append(self._default)
        return self._default

    def restart(self, server: ServerProcess) -> ServerProcess:
        """A new server process on the same port and database."""
        assert server.proc is not None and server.proc.poll() is not None, "stop it first"
        data = {"CHAT_DATA_DIR": server.env["CHAT_DATA_DIR"]} if "CHAT_DATA_DIR" in server.env else {}
        again = ServerProcess(server.database_url, port=server.port, **data).start()
        self.started.append(again)
        return again

    def start(self, **env: str) -> ServerProcess:
        """Another server with its own database, files and settings `env`."""
        self.pool.count += 1
        folder = self.pool.directory / f"server-{self.pool.count}"
        folder.mkdir()
        server = ServerProcess(migrated_sqlite(folder), CHAT_DATA_DIR=str(folder / "data"), **env).start()
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            self.pool.stop_later(server)


@pytest.fixture
def servers(server_pool: ServerPool) -> Iterator[Servers]:
    servers = Servers(server_pool)
    try:
        yield servers
    finally:
        servers.stop_all()


@pytest.fixture
def new_page(browser: Browser, servers: Servers) -> Iterator[PageFactory]:
    """Open the chat (on `server`, default: the test's one server) in a fresh
    browser context, its own cookies and storage. Any uncaught script error
    on a page fails the test."""
    contexts = []
    errors: list[str] = []

    def open_page(server: ServerProcess | None = None, *, ready: str = CONNECTED, **context_options: object) -> Page:
        context = browser.new_context(**context_options)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto((server or servers.default).url)
        wait_until(page, "ready => document.querySelector(ready) !== null", ready)
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, f"script errors on the page: {errors}"


def test_templates_escape_everything() -> None:
    """Every value in a template goes through <%- %>: no <%= %>, no print()."""
    html = (ROOT / "public" / "index.html").read_text()
    templates = re.findall(r'<script type="text/template"[^>]*>(.*?)</script>', html, re.S)
    assert len(templates) >= 5
    for template in templates:
        for tag in re.findall(r"<%(.*?)%>", template, re.S):
            if tag.startswith("-"):
                continue
            assert not tag.startswith("="), f"unescaped <%={tag}%>"
            assert "print" not in tag, f"print() writes raw HTML: <%{tag}%>"


def test_two_pages_chat_both_ways_then_one_leaves(new_page: PageFactory) -> None:
    alice = new_page()
    login(alice, "alice")
    expect_users(alice, ["alice"])

    bob = new_page()
    login(bob, "bob")
    expect_users(bob, ["alice", "bob"])
    expect_users(alice, ["alice", "bob"])
    expect(alice.locator("#chatList .notice")).to_have_text(["alice joined room.", "bob joined room."])
    expect(bob.locator("#chatList .notice")).to_contain_text(["bob joined room."])

    send(alice, "hello bob")
    expect(alice.locator("#chatInput")).to_have_value("")
    expect_chat(bob, "alice", "hello bob")
    expect_chat(alice, "alice", "hello bob")

    # Enter on an empty or blank input sends nothing.
    send(bob, "")
    send(bob, "   ")
    send(bob, "hi alice")
    expect_chat(alice, "bob", "hi alice")
    expect_chat(bob, "bob", "hi alice")
    assert chats(alice) == [("alice", "hello bob"), ("bob", "hi alice")]
    assert chats(bob) == [("alice", "hello bob"), ("bob", "hi alice")]
    # Own lines are marked, the other's are not.
    expect(alice.locator("#chatList li.chat-mine .message")).to_have_text(["hello bob"])
    expect(bob.locator("#chatList li.chat-mine .message")).to_have_text(["hi alice"])

    # Bob closes his page: Alice sees him leave and the count drop to 1.
    bob.context.close()
    expect(alice.locator("#chatList .notice")).to_have_text(
        ["alice joined room.", "bob joined room.", "bob left room."]
    )
    expect_users(alice, ["alice"])


def test_bad_and_taken_names_then_success(new_page: PageFactory) -> None:
    holder = new_page()
    login(holder, "taken")

    page = new_page()
    # Note every time the button goes busy and the error element is replaced.
    page.evaluate(
        """() => {
            window.__busy = 0;
            new MutationObserver(() => {
                if (document.querySelector('#loginButton[disabled][aria-busy="true"]')) window.__busy++;
            }).observe(document.getElementById('container'), {subtree: true, childList: true, attributes: true});
        }"""
    )
    error = page.locator("#loginError")

    page.fill("#nameInput", "ab")
    page.press("#nameInput", "Enter")
    expect(error).to_have_text("Invalid name")
    expect(error).to_be_visible()
    expect(page.locator("#nameInput")).to_have_value("ab")
    expect(page.locator("#loginButton")).to_be_enabled()
    assert page.evaluate("window.__busy") >= 1

    # The same refusal again: the form goes busy and the error is shown afresh.
    error.evaluate("el => el.dataset.stale = '1'")
    page.click("#loginButton")
    expect(page.locator("#loginError:not([data-stale])")).to_have_text("Invalid name")
    assert page.evaluate("window.__busy") >= 2

    page.fill("#nameInput", "taken")
    page.press("#nameInput", "Enter")
    expect(error).to_have_text("Name already exists")
    expect(page.locator("#nameInput")).to_have_value("taken")

    page.fill("#nameInput", "second")
    page.press("#nameInput", "Enter")
    expect(page.locator("#chatInput")).to_be_visible()
    expect(page.locator("#status .conn-name")).to_have_text("as second")
    expect_users(page, ["taken", "second"])
    expect_users(holder, ["taken", "second"])


XSS_MESSAGES = [
    '<img src=x onerror="window.__xss=1">',
    "<script>window.__xss=2</script>",
    "<b>bold</b> & &amp; \"quotes\" 'single'",
]
XSS_NAME = "<b>bo</b>"  # names are 3 to 10 characters: markup, not a script
XSS_BAD_NAME = '"><img src=x onerror="window.__xss=3">'  # refused, then re-rendered into value=""


def test_html_in_names_and_messages_is_text(new_page: PageFactory) -> None:
    watcher = new_page()
    login(watcher, "watcher")

    page = new_page()
    page.fill("#nameInput", XSS_BAD_NAME)
    page.press("#nameInput", "Enter")
    expect(page.locator("#loginError")).to_have_text("Invalid name")
    expect(page.locator("#nameInput")).to_have_value(XSS_BAD_NAME)

    login(page, XSS_NAME)
    for message in XSS_MESSAGES:
        send(page, message)
    send(page, "done")
    for p in (page, watcher):
        expect_chat(p, XSS_NAME, "done")
        assert chats(p) == [(XSS_NAME, m) for m in [*XSS_MESSAGES, "done"]]
        assert f"{XSS_NAME} joined room." in notices(p)
        expect_users(p, ["watcher", XSS_NAME])
        # Nothing became an element: the lists hold only our own markup.
        assert p.locator("#container img, #container script, #container b").count() == 0
        assert p.locator("#status img, #status b").count() == 0
    expect(page.locator("#status .conn-name")).to_have_text(f"as {XSS_NAME}")
    # An <img onerror> would have fired by now (its request returns at once).
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None
    assert watcher.evaluate("window.__xss") is None


def test_scrolls_only_when_at_the_bottom(new_page: PageFactory) -> None:
    reader = new_page(viewport={"width": 900, "height": 500})
    login(reader, "reader")
    writer = new_page()
    login(writer, "writer")

    writer.evaluate("n => { for (let i = 0; i < n; i++) ChatApp.controller.viewEventBus.trigger('chat', 'line ' + i); }", 40)
    expect_chat(reader, "writer", "line 39")
    state = scroll_state(reader)
    assert state["height"] > state["client"], "the list should overflow for this test"
    assert state["atBottom"], state

    # Reading older lines: a new line does not move the view.
    reader.eval_on_selector("#chatScroll", "s => { s.scrollTop = 0; }")
    send(writer, "while reading")
    expect_chat(reader, "writer", "while reading")
    assert scroll_state(reader)["top"] == 0
    expect(reader.locator("#newBelow")).to_be_visible()

    reader.click("#newBelow")
    assert scroll_state(reader)["atBottom"]
    expect(reader.locator("#newBelow")).to_be_hidden()
    send(writer, "at the bottom")
    expect_chat(reader, "writer", "at the bottom")
    assert scroll_state(reader)["atBottom"]


def test_server_restart_reconnects_and_logs_in_again(new_page: PageFactory, servers: Servers) -> None:
    server = servers.default
    page = new_page(server)
    login(page, "carol")
    send(page, "before restart")
    expect_chat(page, "carol", "before restart")

    server.terminate()
    status = page.locator("#status .conn")
    expect(status).to_have_class(re.compile(r"\bconn-(disconnected|reconnecting)\b"))
    expect(status).to_contain_text("Disconnected")
    expect(page.locator(".home-screen")).to_have_class(re.compile(r"\boffline\b"))

    servers.restart(server)  # same port, same database
    expect(status).to_have_class(re.compile(r"\bconn-connected\b"), timeout=15_000)
    expect(page.locator("#status .conn-name")).to_have_text("as carol")
    expect(page.locator(".home-screen")).not_to_have_class(re.compile(r"\boffline\b"))
    expect_users(page, ["carol"])
    # Logged in on the new server: a chat is accepted and comes back.
    send(page, "after restart")
    expect_chat(page, "carol", "after restart")
    assert chats(page) == [("carol", "before restart"), ("carol", "after restart")]
    lines = notices(page)
    assert lines[0] == "carol joined room."
    assert lines[-1] == "carol joined room."
    # Whether the server resumed (replaying the leave it recorded at
    # shutdown) or the page logged in again, no line is shown twice.
    assert lines.count("carol left room.") <= 1, lines


def in_lobby(new_page: PageFactory, *names: str) -> list[Page]:
    """A page per name, each logged in, in that order."""
    pages = []
    for name in names:
        page = new_page()
        login(page, name)
        pages.append(page)
    return pages


def test_reload_logs_in_again_under_the_same_name(new_page: PageFactory) -> None:
    alice, bob = in_lobby(new_page, "alice", "bob")
    send(alice, "before reload")
    expect_chat(bob, "alice", "before reload")

    alice.reload()
    # Back in the lobby as alice without typing her name, history included.
    expect(alice.locator("#status .conn-name")).to_have_text("as alice")
    expect_chat(alice, "alice", "before reload")
    expect_users(alice, ["bob", "alice"])
    send(alice, "after reload")
    expect_chat(bob, "alice", "after reload")
    # Bob saw the truth: the old page left, the reloaded one joined.
    wait_until(bob, "() => [...document.querySelectorAll('#chatList .notice')].length >= 4", None, lambda: presence(bob))
    assert presence(bob)[-2:] == ["alice left room.", "alice joined room."]

    # A fresh tab (its own session storage) starts at the login screen.
    fresh = new_page()
    expect(fresh.locator("#nameInput")).to_be_visible()
    expect(fresh.locator("#nameInput")).to_have_value("")


def test_saved_name_taken_by_someone_else_ends_at_the_login_screen(new_page: PageFactory) -> None:
    holder = new_page()
    login(holder, "dora")
    # As a duplicated tab would: the saved name is held by a live session.
    copy = new_page()
    copy.evaluate("() => sessionStorage.setItem('chat.name', 'dora')")
    copy.reload()
    error = copy.locator("#loginError")
    expect(error).to_have_text("Name already exists", timeout=15_000)
    expect(copy.locator("#nameInput")).to_have_value("dora")
    assert copy.evaluate("() => sessionStorage.getItem('chat.name')") == "dora"
    # Logging in under another name replaces the saved one.
    copy.fill("#nameInput", "dora2")
    copy.press("#nameInput", "Enter")
    expect(copy.locator("#status .conn-name")).to_have_text("as dora2")
    assert copy.evaluate("() => sessionStorage.getItem('chat.name')") == "dora2"
    expect_users(holder, ["dora", "dora2"])


def test_reconnect_shows_what_was_missed_once(new_page: PageFactory) -> None:
    away, talker = in_lobby(new_page, "away", "talker")
    send(talker, "while you were here")
    expect_chat(away, "talker", "while you were here")

    # Drop the connection and keep it down while the other page talks.
    away.evaluate(
        "() => { const s = ChatApp.controller.chatClient.socket; s.io.reconnection(false); s.io.engine.close(); }"
    )
    expect(away.locator("#status .conn")).to_have_class(re.compile(r"\bconn-disconnected\b"))
    missed = [f"missed {i}" for i in range(3)]
    for message in missed:
        send(talker, message)
    expect_chat(talker, "talker", missed[-1])

    away.evaluate("() => { const s = ChatApp.controller.chatClient.socket; s.io.reconnection(true); s.connect(); }")
    expect(away.locator("#status .conn-name")).to_have_text("as away")
    send(talker, "live again")
    expect_chat(away, "talker", "live again")
    expected = [("talker", m) for m in ["while you were here", *missed, "live again"]]
    assert chats(away) == expected
    assert chats(talker) == expected
    # Both show the same joins and leaves (the log's), none twice.
    assert presence(away) == presence(talker)
    # Join order depends on whether the server resumed or the page logged in again.
    expect(away.locator("#userCount")).to_have_text("2")
    assert sorted(users(away)) == ["away", "talker"]


def test_history_on_entering_and_paging_back(new_page: PageFactory) -> None:
    first = new_page()
    login(first, "first")
    sent = [f"message {i}" for i in range(1, 54)]
    first.evaluate("texts => texts.forEach(t => ChatApp.controller.viewEventBus.trigger('chat', t))", sent)
    expect_chat(first, "first", sent[-1])

    late = new_page()
    login(late, "late")
    # The server's last 50 items before the login (default CHAT_HISTORY_SIZE),
    # then the live join line.
    lines = late.locator("#chatList li")
    expect(lines).to_have_count(51)
    expect(lines.first).to_have_text(re.compile(r"first\s*message 4\b"))
    expect(lines.last).to_have_text(re.compile(r"late joined room\."))
    assert chats(late) == [("first", m) for m in sent[3:]]

    older = late.locator("#chatOlder [data-action=older]")
    expect(older).to_be_visible()
    older.click()
    expect(late.locator("#chatOlder")).to_contain_text("Start of the conversation")
    expect(lines).to_have_count(55)
    assert chats(late) == [("first", m) for m in sent]
    assert notices(late) == ["first joined room.", "late joined room."]
    expect(lines.first).to_have_text(re.compile(r"first joined room\."))


LONG_WORD = "Supercalifragilistic" * 8
LONG_MESSAGE = "This message is long enough to wrap onto several lines in the lobby: " + " ".join(
    ["lorem ipsum dolor sit amet"] * 12
)


def test_lobby_screenshot_wide_and_narrow(new_page: PageFactory) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    alice = new_page(viewport={"width": 1280, "height": 720})
    login(alice, "alice")
    bob = new_page(viewport={"width": 360, "height": 640})
    login(bob, "bob")
    send(alice, "Hi Bob! How is the new chat?")
    send(bob, "Works nicely, and <b>this</b> stays text.")
    send(alice, LONG_MESSAGE)
    send(bob, LONG_WORD)
    send(alice, "À bientôt, ça marche !")
    expect_chat(alice, "alice", "À bientôt, ça marche !")
    expect_chat(bob, "alice", "À bientôt, ça marche !")

    for page in (alice, bob):
        # Long lines wrap: nothing scrolls sideways, in the list or the page.
        assert page.eval_on_selector("#chatScroll", "s => s.scrollWidth <= s.clientWidth")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        for selector in ("#chatInput", "#userCount", "#status .conn"):
            box = page.locator(selector).bounding_box()
            viewport = page.viewport_size
            assert box and viewport
            assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], selector
            assert box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"], selector
        expect_users(page, ["alice", "bob"])

    alice.screenshot(path=str(ARTIFACTS / "lobby.png"))
    bob.screenshot(path=str(ARTIFACTS / "lobby-narrow.png"))


# -- rooms and private messages (issue 12) ------------------------------------


def test_room_created_joined_from_the_list_chat_seen_by_members_only(new_page: PageFactory) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    ann = new_page(viewport={"width": 1280, "height": 720})
    login(ann, "ann")
    bob, cat = in_lobby(new_page, "bob", "cat")

    create_room(ann, "Dev", "Python and tests")
    expect(ann.locator("#convTopic")).to_have_text("Python and tests")
    expect_conversations(ann, [["Lobby", ""], ["# Dev", ""]], [])
    expect_members(ann, [["ann", True]])
    expect(ann.locator("#chatList .notice")).to_have_text(["ann created the room: Python and tests", "ann joined room."])

    # Bob finds it in the list of all rooms and joins; Ann sees him arrive.
    join_room(bob, "Dev")
    expect_members(bob, [["ann", True], ["bob", True]])
    expect_members(ann, [["ann", True], ["bob", True]])
    expect_conversations(bob, [["Lobby", ""], ["# Dev", ""]], [])
    # Bob pages the room back to its creation.
    expect(bob.locator("#chatList .notice")).to_have_text(
        ["ann created the room: Python and tests", "ann joined room.", "bob joined room."]
    )

    send(ann, "hello dev")
    expect_chat(bob, "ann", "hello dev")
    expect_chat(ann, "ann", "hello dev")
    send(bob, "hi ann")
    expect_chat(ann, "bob", "hi ann")
    # The lobby stays the lobby: neither room chat is in it, for anyone.
    send(cat, "lobby only")
    expect_conversations(ann, [["Lobby", "1"], ["# Dev", ""]], [])
    open_conversation(bob, "Lobby")
    expect_chat(bob, "cat", "lobby only")
    assert chats(bob) == [("cat", "lobby only")]
    # Cat is in no room and was sent nothing of Dev: a socket gets its events
    # in log order, so by his own later lobby chat the room's would be here.
    expect_chat(cat, "cat", "lobby only")
    assert chats(cat) == [("cat", "lobby only")]
    assert conversations(cat) == {"roomConvs": [["Lobby", ""]], "privateConvs": []}
    assert cat.evaluate("ChatApp.controller.homeModel.conversations.length") == 1
    assert "hello dev" not in cat.inner_text("body")
    ann.screenshot(path=str(ARTIFACTS / "room.png"))

    # A member offline stays a member, shown offline.
    cat.context.close()
    bob.context.close()
    expect_members(ann, [["ann", True], ["bob", False]])
    expect_conversations(ann, [["Lobby", "1"], ["# Dev", ""]], [])
    open_conversation(ann, "Lobby")
    expect_conversations(ann, [["Lobby", ""], ["# Dev", ""]], [])
    expect_chat(ann, "cat", "lobby only")


def test_leaving_a_room(new_page: PageFactory) -> None:
    ann, bob = in_lobby(new_page, "ann", "bob")
    create_room(ann, "Ops")
    # Names are unique whatever their case.
    bob.click("#browseRooms")
    bob.fill("#roomNameInput", "OPS")
    bob.click("#createRoomButton")
    expect(bob.locator("#createRoomError")).to_have_text("A room with that name exists already.")
    join_room(bob, "Ops")
    expect_members(ann, [["ann", True], ["bob", True]])

    # Membership outlives the page: after a reload the room is listed, with
    # what was said meanwhile counted by the server.
    open_conversation(bob, "Lobby")
    send(ann, "while bob reads the lobby")
    expect_conversations(bob, [["Lobby", ""], ["# Ops", "1"]], [])
    bob.reload()
    expect(bob.locator("#status .conn-name")).to_have_text("as bob")
    expect_conversations(bob, [["Lobby", ""], ["# Ops", "1"]], [])
    open_conversation(bob, "# Ops")
    expect_chat(bob, "ann", "while bob reads the lobby")
    expect_conversations(bob, [["Lobby", ""], ["# Ops", ""]], [])

    bob.click("#leaveRoom")
    # Back in the lobby, the room gone from his list; Ann sees him leave.
    expect(bob.locator("#convHeader .conv-title")).to_have_text("Lobby")
    expect_conversations(bob, [["Lobby", ""]], [])
    expect_members(ann, [["ann", True]])
    expect(ann.locator("#chatList .notice").last).to_have_text("bob left room.")
    # No longer a member: the room's chats do not reach him (by Ann's later
    # lobby chat, in log order, they would have).
    send(ann, "after bob left")
    expect_chat(ann, "ann", "after bob left")
    open_conversation(ann, "Lobby")
    send(ann, "in the lobby")
    expect_chat(bob, "ann", "in the lobby")
    assert chats(bob) == [("ann", "in the lobby")]
    assert bob.evaluate("ChatApp.controller.homeModel.room('Ops')") is None
    assert "after bob left" not in bob.inner_text("body")
    # The lobby cannot be left: it has no Leave button.
    assert bob.locator("#leaveRoom").count() == 0


def test_private_messages_unread_badges_and_read_markers(new_page: PageFactory) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    ann = new_page(viewport={"width": 1280, "height": 720})
    login(ann, "ann")
    bob, cat = in_lobby(new_page, "bob", "cat")
    expect_users(ann, ["ann", "bob", "cat"])

    # Clicking a user in the online list opens the private conversation.
    ann.locator("#userList .user-open").filter(has_text="bob").click()
    expect(ann.locator("#convHeader .conv-title")).to_have_text("@ bob")
    expect(ann.locator("#peerState")).to_have_text("online")
    send(ann, "psst, bob")
    expect_chat(ann, "ann", "psst, bob")
    expect_conversations(ann, [["Lobby", ""]], [["bob", ""]])

    # Bob is reading the lobby: the conversation appears with a badge.
    expect_conversations(bob, [["Lobby", ""]], [["ann", "1"]])
    send(ann, "are you there?")
    expect_conversations(bob, [["Lobby", ""]], [["ann", "2"]])
    assert chats(bob) == []  # nothing of it in the lobby
    open_conversation(bob, "ann")
    expect_conversations(bob, [["Lobby", ""]], [["ann", ""]])
    assert chats(bob) == [("ann", "psst, bob"), ("ann", "are you there?")]
    send(bob, "here")
    expect_chat(ann, "bob", "here")
    expect_conversations(ann, [["Lobby", ""]], [["bob", ""]])  # read as it arrives
    # Nobody else was sent any of it.
    assert conversations(cat) == {"roomConvs": [["Lobby", ""]], "privateConvs": []}
    assert "psst" not in cat.inner_text("body")
    ann.screenshot(path=str(ARTIFACTS / "private.png"))

    # Opening it sent a read marker (after a short debounce): the server's
    # summary says so, and a reload (a fresh login) shows it read.
    deadline = time.monotonic() + 5
    while True:
        summary = request(bob, "conversations")
        unread = [(c["with"], c["unread"]) for c in summary["private"]]
        if unread == [("ann", 0)] or time.monotonic() > deadline:
            break
        bob.wait_for_timeout(100)
    assert unread == [("ann", 0)], summary
    bob.reload()
    expect(bob.locator("#status .conn-name")).to_have_text("as bob")
    expect_conversations(bob, [["Lobby", ""]], [["ann", ""]])
    # A message while he is elsewhere is unread again, in the list after a reload too.
    send(ann, "one more")
    expect_conversations(bob, [["Lobby", ""]], [["ann", "1"]])
    bob.reload()
    expect(bob.locator("#status .conn-name")).to_have_text("as bob")
    expect_conversations(bob, [["Lobby", ""]], [["ann", "1"]])
    open_conversation(bob, "ann")
    # Paged from the server: the whole conversation, once.
    expect_chat(bob, "ann", "one more")
    assert chats(bob) == [("ann", "psst, bob"), ("ann", "are you there?"), ("bob", "here"), ("ann", "one more")]

    # From a room's member list too.
    create_room(cat, "Cats")
    join_room(bob, "Cats")
    expect_members(cat, [["cat", True], ["bob", True]])
    cat.locator("#memberList .user-open").filter(has_text="bob").click()
    expect(cat.locator("#convHeader .conv-title")).to_have_text("@ bob")


def test_room_history_pages_per_room(new_page: PageFactory) -> None:
    ann, bob = in_lobby(new_page, "ann", "bob")
    send(ann, "a lobby line")
    create_room(ann, "Hist")
    sent = [f"room line {i}" for i in range(1, 61)]
    send_many(ann, sent)
    expect_chat(ann, "ann", sent[-1])

    join_room(bob, "Hist")
    # The newest page (50 items, his join the last), then older pages on request.
    lines = bob.locator("#chatList li")
    expect(lines).to_have_count(50)
    expect(lines.last).to_have_text(re.compile(r"bob joined room\."))
    assert chats(bob) == [("ann", m) for m in sent[11:]]
    older = bob.locator("#chatOlder [data-action=older]")
    older.click()
    expect(bob.locator("#chatOlder")).to_contain_text("Start of the conversation")
    expect(lines).to_have_count(63)
    assert chats(bob) == [("ann", m) for m in sent]
    expect(bob.locator("#chatList .notice")).to_have_text(["ann created the room.", "ann joined room.", "bob joined room."])

    # The lobby pages its own history: the room's lines are not in it.
    open_conversation(bob, "Lobby")
    expect_chat(bob, "ann", "a lobby line")
    assert chats(bob) == [("ann", "a lobby line")]
    # And the room kept its lines while another conversation was shown.
    open_conversation(bob, "# Hist")
    expect(lines).to_have_count(63)


HTML_ROOM = "<b>x</b>"
HTML_TOPIC = '<img src=x onerror="window.__xss=4">'


def test_html_in_room_names_topics_and_messages_is_text(new_page: PageFactory) -> None:
    ann, bob = in_lobby(new_page, "ann", "bob")
    create_room(ann, HTML_ROOM, HTML_TOPIC)
    expect(ann.locator("#convTopic")).to_have_text(HTML_TOPIC)
    for message in XSS_MESSAGES:
        send(ann, message)
    join_room(bob, HTML_ROOM)  # listed as text in the directory too
    expect_chat(bob, "ann", XSS_MESSAGES[-1])
    assert chats(bob) == [("ann", m) for m in XSS_MESSAGES]
    expect(bob.locator("#chatList .notice").first).to_have_text(f"ann created the room: {HTML_TOPIC}")
    open_conversation(bob, "Lobby")
    bob.locator("#userList .user-open").click()
    send(bob, XSS_MESSAGES[0])
    expect_conversations(ann, [["Lobby", ""], [f"# {HTML_ROOM}", ""]], [["bob", "1"]])
    open_conversation(ann, "bob")
    expect_chat(ann, "bob", XSS_MESSAGES[0])
    for page in (ann, bob):
        assert page.locator("#container img, #container script, #container b").count() == 0
    bob.click("#browseRooms")
    expect(bob.locator("#roomDirectory .dir-room-name")).to_have_text([HTML_ROOM])
    expect(bob.locator("#roomDirectory .dir-room-topic")).to_have_text([HTML_TOPIC])
    assert bob.locator("#container img, #container b").count() == 0
    bob.wait_for_timeout(300)  # an <img onerror> would have fired by now
    assert ann.evaluate("window.__xss") is None
    assert bob.evaluate("window.__xss") is None


def test_room_and_private_messages_missed_while_disconnected_arrive_once(new_page: PageFactory) -> None:
    away, talker = in_lobby(new_page, "away", "talker")
    talker.locator("#userList .user-open").click()  # a PM conversation with away, open
    expect(talker.locator("#convHeader .conv-title")).to_have_text("@ away")
    create_room(talker, "Dev")
    join_room(away, "Dev")
    send(talker, "before the drop")
    expect_chat(away, "talker", "before the drop")

    away.evaluate(
        "() => { const s = ChatApp.controller.chatClient.socket; s.io.reconnection(false); s.io.engine.close(); }"
    )
    expect(away.locator("#status .conn")).to_have_class(re.compile(r"\bconn-disconnected\b"))
    missed = [f"missed {i}" for i in range(3)]
    for message in missed:
        send(talker, message)
    expect_chat(talker, "talker", missed[-1])
    open_conversation(talker, "away")
    expect(talker.locator("#peerState")).to_have_text("offline")
    send(talker, "while you were away")
    expect_chat(talker, "talker", "while you were away")

    away.evaluate("() => { const s = ChatApp.controller.chatClient.socket; s.io.reconnection(true); s.connect(); }")
    expect(away.locator("#status .conn-name")).to_have_text("as away")
    expect_chat(away, "talker", missed[-1])
    assert chats(away) == [("talker", m) for m in ["before the drop", *missed]]
    expect_conversations(away, [["Lobby", ""], ["# Dev", ""]], [["talker", "1"]])
    open_conversation(talker, "# Dev")
    send(talker, "live again")
    expect_chat(away, "talker", "live again")
    assert chats(away) == [("talker", m) for m in ["before the drop", *missed, "live again"]]


# -- images and files (issue 14) ------------------------------------------------

PICTURE = picture(800, 500)
NOTES = ("Notes from the meeting.\n" * 64).encode()  # 1536 bytes: "1.5 KiB"


def upload_answer(page: Page, name: str) -> dict[str, object]:
    """The server's answer for the upload called `name` waiting in the input."""
    return page.evaluate(
        "name => ChatApp.controller.homeModel.activeConversation().uploads.findWhere({name}).get('upload')", name
    )


def test_image_attached_in_one_page_shows_as_a_thumbnail_in_another(new_page: PageFactory) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    alice = new_page(viewport={"width": 1280, "height": 720})
    login(alice, "alice")
    bob = new_page(viewport={"width": 1280, "height": 720})
    login(bob, "bob")
    send(alice, "Photos from the trip:")

    # The attach button opens the file chooser; the file uploads at once.
    with alice.expect_file_chooser() as chooser:
        alice.click("#attachButton")
    chooser.value.set_files(file_payload("sunset.png", PICTURE, "image/png"))
    expect_tray_ready(alice, 1)
    assert tray(alice) == [["sunset.png", "4.6 KiB", "ready"]], tray(alice)
    uploaded = upload_answer(alice, "sunset.png")
    assert uploaded["type"] == "image/png" and uploaded["thumb"] is True, uploaded
    assert (uploaded["width"], uploaded["height"]) == (800, 500)
    send(alice, "the sunset")
    expect(alice.locator("#uploadTray li")).to_have_count(0)

    # A file dropped on the conversation goes with the next message.
    drop_files(alice, file_payload("notes.txt", NOTES, "text/plain"))
    expect_tray_ready(alice, 1)
    send(alice, "and the notes")

    for page in (alice, bob):
        expect_file_chat(page, "alice", "the sunset", [["image", "sunset.png", "4.6 KiB"]])
        expect_file_chat(page, "alice", "and the notes", [["file", "notes.txt", "1.5 KiB"]])
        assert chats(page) == [("alice", "Photos from the trip:"), ("alice", "the sunset"), ("alice", "and the notes")]

    # Bob's thumbnail: the server's (at most 320 px), shown 240x150 from the
    # picture's own proportions.
    thumb = bob.locator("#chatList img.att-thumb")
    expect(thumb).to_have_count(1)
    natural = thumb.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert 0 < natural[0] <= 320 and 0 < natural[1] <= 320, natural
    assert abs(natural[0] / natural[1] - 800 / 500) < 0.02, natural
    box = thumb.bounding_box()
    # (The loaded thumbnail's own proportions may differ by a rounded pixel.)
    assert box is not None and round(box["width"]) == 240 and abs(box["height"] - 150) <= 1, box
    assert re.search(rf"/files/{re.escape(str(uploaded['id']))}/thumb\?token=[\w-]", thumb.get_attribute("src") or "")
    assert scroll_state(bob)["atBottom"]

    # A later arrival sees both in the lobby's history.
    cat = new_page()
    login(cat, "cat")
    expect_file_chat(cat, "alice", "the sunset", [["image", "sunset.png", "4.6 KiB"]])
    expect_file_chat(cat, "alice", "and the notes", [["file", "notes.txt", "1.5 KiB"]])

    bob.screenshot(path=str(ARTIFACTS / "files.png"))

    # Click: the full size, the uploaded bytes themselves.
    thumb.click()
    full = bob.locator(".lightbox img.lightbox-image")
    expect(full).to_be_visible()
    wait_until(bob, "() => document.querySelector('.lightbox img').naturalWidth > 0")
    assert full.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [800, 500]
    expect(bob.locator(".lightbox .lightbox-name")).to_have_text("sunset.png")
    got = fetch(bob, full.get_attribute("src") or "")
    assert got["status"] == 200 and got["headers"]["content-type"] == "image/png", got["headers"]
    assert base64.b64decode(got["body"]) == PICTURE
    bob.screenshot(path=str(ARTIFACTS / "files-full.png"))
    bob.keyboard.press("Escape")
    expect(bob.locator(".lightbox")).to_have_count(0)

    # A picture pasted into the input (a screenshot) is attached too.
    bob.evaluate(
        """async data => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const clipboard = new DataTransfer();
            clipboard.items.add(new File([bytes], 'image.png', {type: 'image/png'}));
            document.querySelector('#chatInput').dispatchEvent(
                new ClipboardEvent('paste', {clipboardData: clipboard, bubbles: true, cancelable: true}));
        }""",
        base64.b64encode(picture(200, 200)).decode(),
    )
    expect_tray_ready(bob, 1)
    expect(bob.locator("#chatInput")).to_have_value("")
    send(bob, "pasted")
    expect_file_chat(alice, "bob", "pasted", [["image", "image.png", size_text(len(picture(200, 200)))]])


def test_files_in_a_room_and_a_private_conversation_are_links_with_name_and_size(new_page: PageFactory) -> None:
    ann, bob, cat = in_lobby(new_page, "ann", "bob", "cat")
    create_room(ann, "Files")
    join_room(bob, "Files")

    # A file alone is a message (no text).
    attach(ann, file_payload("report.csv", NOTES, "text/csv"))
    expect_tray_ready(ann, 1)
    send(ann, "")
    for page in (ann, bob):
        expect_file_chat(page, "ann", "", [["file", "report.csv", "1.5 KiB"]])
    link = bob.locator("#chatList a.att-file")
    assert link.get_attribute("download") == "report.csv"
    got = fetch(bob, link.get_attribute("href") or "")
    assert got["status"] == 200, got
    assert got["headers"].get("content-disposition", "").startswith("attachment"), got["headers"]
    assert got["headers"]["x-content-type-options"] == "nosniff"
    assert base64.b64decode(got["body"]) == NOTES

    # Not a member: Cat's own token does not open it.
    cat_token = request(cat, "uploadToken")
    assert cat_token["ok"] is True, cat_token
    file_id = re.search(r"/files/([^/?]+)", link.get_attribute("href") or "")
    assert file_id
    refused = fetch(cat, f"/files/{file_id.group(1)}?token={cat_token['token']}")
    assert refused["status"] == 403, refused["status"]
    assert "report.csv" not in cat.inner_text("body")

    # A private conversation: Bob sends Ann two files with a line of text.
    open_conversation(bob, "Lobby")
    bob.locator("#userList .user-open").filter(has_text="ann").click()
    expect(bob.locator("#convHeader .conv-title")).to_have_text("@ ann")
    blob = bytes(range(256)) * (3 * 4096)  # 3 MiB of binary
    attach(bob, file_payload("data.bin", blob), file_payload("notes.txt", NOTES, "text/plain"))
    expect_tray_ready(bob, 2)
    send(bob, "two files for you")
    want = [["file", "data.bin", "3.0 MiB"], ["file", "notes.txt", "1.5 KiB"]]
    expect_file_chat(bob, "bob", "two files for you", want)
    expect_conversations(ann, [["Lobby", ""], ["# Files", ""]], [["bob", "1"]])
    open_conversation(ann, "bob")
    expect_file_chat(ann, "bob", "two files for you", want)
    got = fetch(ann, ann.locator("#chatList a.att-file").first.get_attribute("href") or "")
    assert got["status"] == 200 and base64.b64decode(got["body"]) == blob


# No '"' (a browser sends it as %22 in a multipart filename) and no '/'
# (the server keeps the last path segment): markup that would still run.
HTML_FILE_NAME = "<img src=x onerror=window.__xss=5>.txt"
HTML_IMAGE_NAME = "<b onmouseover=window.__xss=6>look<b>.png"


def test_file_names_with_html_are_text(new_page: PageFactory) -> None:
    ann = new_page()
    login(ann, "ann")
    bob = new_page(viewport={"width": 360, "height": 640})  # narrow: long names wrap
    login(bob, "bob")
    attach(ann, file_payload(HTML_FILE_NAME, NOTES, "text/plain"), file_payload(HTML_IMAGE_NAME, PICTURE, "image/png"))
    expect_tray_ready(ann, 2)
    assert [row[0] for row in tray(ann)] == [HTML_FILE_NAME, HTML_IMAGE_NAME]
    send(ann, "<i>names</i>")
    want = [["file", HTML_FILE_NAME, "1.5 KiB"], ["image", HTML_IMAGE_NAME, "4.6 KiB"]]
    for page in (ann, bob):
        expect_file_chat(page, "ann", "<i>names</i>", want)
        # The only pictures are the thumbnail; no markup became an element.
        assert page.locator("#container img").count() == 1
        assert page.locator("#container img.att-thumb").get_attribute("alt") == HTML_IMAGE_NAME
        assert page.locator("#container b, #container i").count() == 0
        assert page.eval_on_selector("#chatScroll", "s => s.scrollWidth <= s.clientWidth")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    ARTIFACTS.mkdir(exist_ok=True)
    bob.screenshot(path=str(ARTIFACTS / "files-narrow.png"))
    bob.locator("#chatList img.att-thumb").click()
    expect(bob.locator(".lightbox .lightbox-name")).to_have_text(HTML_IMAGE_NAME)
    assert bob.locator(".lightbox b").count() == 0
    assert bob.locator(".lightbox a[download]").get_attribute("download") == HTML_IMAGE_NAME
    bob.wait_for_timeout(300)  # an <img onerror> would have fired by now
    assert ann.evaluate("window.__xss") is None
    assert bob.evaluate("window.__xss") is None


def test_upload_progress_bar_and_refused_uploads(new_page: PageFactory, servers: Servers) -> None:
    server = servers.start(CHAT_UPLOAD_MAX_BYTES=str(2 * 1024 * 1024), CHAT_FILES_PER_MESSAGE="1")
    page = new_page(server)
    login(page, "slow")
    # Record every value the progress bar shows.
    page.evaluate(
        """() => {
            window.__progress = [];
            new MutationObserver(() => {
                for (const bar of document.querySelectorAll('#uploadTray .upload-progress'))
                    window.__progress.push(Number(bar.getAttribute('aria-valuenow')));
            }).observe(document.getElementById('container'), {subtree: true, childList: true, attributes: true});
        }"""
    )
    # A slow uplink (bytes per second), so the upload takes about two seconds.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 512 * 1024},
    )
    attach(page, file_payload("big.bin", bytes(1024 * 1024)))
    expect(page.locator("#uploadTray .upload-progress")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "files-uploading.png"))
    # Enter while it uploads sends nothing yet.
    send(page, "too early")
    expect(page.locator("#chatError")).to_have_text("Wait for the upload to finish, or remove it.")
    expect_tray_ready(page, 1)
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    seen = page.evaluate("window.__progress")
    assert any(0 < p < 100 for p in seen), seen
    assert seen == sorted(seen), seen
    send(page, "too early")  # still in the input
    expect_file_chat(page, "slow", "too early", [["file", "big.bin", "1.0 MiB"]])

    # Larger than the server takes: refused with the server's reason; nothing to send.
    attach(page, file_payload("huge.bin", bytes(2 * 1024 * 1024 + 1)))
    failed = page.locator("#uploadTray li.upload-failed")
    expect(failed).to_have_count(1)
    expect(failed.locator(".upload-error")).not_to_be_empty()
    send(page, "")
    expect(page.locator("#uploadTray li")).to_have_count(1)
    assert len(file_chats(page)) == 1
    failed.locator("[data-action=remove-upload]").click()
    expect(page.locator("#uploadTray li")).to_have_count(0)
    expect(page.locator("#uploadTray")).to_be_hidden()

    # More files than the server takes in one message: refused, and the
    # text and files are given back to send again.
    attach(page, file_payload("one.txt", NOTES, "text/plain"), file_payload("two.txt", NOTES, "text/plain"))
    expect_tray_ready(page, 2)
    send(page, "both")
    expect(page.locator("#chatError")).to_have_text("Too many files in one message: remove some.")
    expect_tray_ready(page, 2)
    expect(page.locator("#chatInput")).to_have_value("both")
    page.locator("#uploadTray li.upload").filter(has_text="two.txt").locator("[data-action=remove-upload]").click()
    page.press("#chatInput", "Enter")
    expect_file_chat(page, "slow", "both", [["file", "one.txt", "1.5 KiB"]])
    expect(page.locator("#uploadTray li")).to_have_count(0)


def test_after_reconnecting_files_load_and_upload_with_the_new_sessions_token(new_page: PageFactory) -> None:
    ann, bob = in_lobby(new_page, "ann", "bob")
    attach(ann, file_payload("first.png", PICTURE, "image/png"))
    expect_tray_ready(ann, 1)
    send(ann, "first")
    expect_file_chat(bob, "ann", "first", [["image", "first.png", "4.6 KiB"]])
    before = bob.evaluate("ChatApp.controller.homeModel.files.get('token')")
    assert before

    # Bob's connection drops; his session (and its token) ends with it.
    bob.evaluate("() => { const s = ChatApp.controller.chatClient.socket; s.io.reconnection(false); s.io.engine.close(); }")
    expect(bob.locator("#status .conn")).to_have_class(re.compile(r"\bconn-disconnected\b"))
    attach(ann, file_payload("second.png", picture(300, 600), "image/png"))
    expect_tray_ready(ann, 1)
    send(ann, "second")
    bob.evaluate("() => { const s = ChatApp.controller.chatClient.socket; s.io.reconnection(true); s.connect(); }")
    expect(bob.locator("#status .conn-name")).to_have_text("as bob")

    # What he missed arrives with a thumbnail from the new session's token.
    expect_file_chat(bob, "ann", "second", [["image", "second.png", size_text(len(picture(300, 600)))]])
    after = bob.evaluate("ChatApp.controller.homeModel.files.get('token')")
    assert after and after != before
    assert (bob.locator("#chatList img.att-thumb").last.get_attribute("src") or "").endswith("token=" + after)
    # And he can upload again.
    drop_files(bob, file_payload("reply.txt", NOTES, "text/plain"))
    expect_tray_ready(bob, 1)
    send(bob, "got it")
    expect_file_chat(ann, "bob", "got it", [["file", "reply.txt", "1.5 KiB"]])



# -- accounts mode (issue 13) ----------------------------------------------------

PASSWORD = "correct horse battery"


def test_open_mode_page_shows_the_name_form(new_page: PageFactory) -> None:
    """The default server is in open mode: the page asks it, and shows the
    name form and no sign-in form or sign-out button."""
    page = new_page()
    assert api(page, "GET", "/api/auth/mode") == {"status": 200, "body": {"mode": "open"}}
    expect(page.locator("#nameInput")).to_be_visible()
    expect(page.locator("#accountForm")).to_have_count(0)
    login(page, "solo")
    expect(page.locator("#signOut")).to_have_count(0)


def test_accounts_register_sign_in_chat_sign_out(new_page: PageFactory, servers: Servers) -> None:
    server = servers.start(CHAT_AUTH="accounts")
    alice = new_page(server, ready=SIGN_IN_FORM)
    expect_account_form(alice)
    assert stored_session(alice) is None

    register(alice, "alice", PASSWORD)
    first = stored_session(alice)
    assert first["name"] == "alice" and first["token"].count(".") == 2  # a JWT, kept for the tab

    bob = new_page(server, ready=SIGN_IN_FORM)
    register(bob, "bob", "bob's own long password")
    expect_users(alice, ["alice", "bob"])

    # Alice signs out: her token is revoked on the server, forgotten by the
    # tab, and Bob sees her leave.
    alice.click("#signOut")
    expect_account_form(alice, "You signed out.")
    assert stored_session(alice) is None
    expect_users(bob, ["bob"])
    assert api(alice, "POST", "/api/sessions/refresh", token=first["token"])["status"] == 401

    # She signs in again (the form kept her name) and chats; Bob sees it.
    expect(alice.locator("#accountName")).to_have_value("alice")
    sign_in(alice, "alice", PASSWORD)
    assert stored_session(alice)["token"] != first["token"]
    expect_users(bob, ["bob", "alice"])  # join order: she joined again after Bob
    send(alice, "signed in for real")
    expect_chat(bob, "alice", "signed in for real")
    expect_chat(alice, "alice", "signed in for real")

    # A reload keeps the tab's session: back in the lobby without the form.
    alice.reload()
    expect_signed_in(alice, "alice")
    expect_chat(alice, "alice", "signed in for real")

    # A new tab (its own sessionStorage) is not signed in.
    other = new_page(server, ready=SIGN_IN_FORM)
    expect_account_form(other)

    bob.click("#signOut")
    expect_account_form(bob, "You signed out.")
    expect_users(alice, ["alice"])


def test_accounts_wrong_password_and_taken_name(new_page: PageFactory, servers: Servers) -> None:
    server = servers.start(CHAT_AUTH="accounts")
    owner = new_page(server, ready=SIGN_IN_FORM)
    register(owner, "carol", PASSWORD)

    page = new_page(server, ready=SIGN_IN_FORM, viewport={"width": 1024, "height": 640})
    submit_account_form(page, "carol", "not the password", registering=False)
    expect(page.locator("#accountError")).to_have_text("Wrong name or password.")
    expect(page.locator("#accountError")).to_be_visible()
    expect_account_form(page)
    assert stored_session(page) is None
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "signin.png"))

    # Registering a name that has an account says so.
    submit_account_form(page, "carol", "another long password", registering=True)
    expect(page.locator("#accountError")).to_have_text("That name is taken: choose another, or sign in.")

    # Typing again clears the mark; the right password signs in.
    page.fill("#accountPassword", "x")
    expect(page.locator("#accountPassword")).not_to_have_class(re.compile("is-invalid"))
    owner.click("#signOut")
    expect_account_form(owner, "You signed out.")
    sign_in(page, "carol", PASSWORD)


def test_accounts_refused_token_back_to_the_form(new_page: PageFactory, servers: Servers) -> None:
    """A token the server refuses at the handshake (here a forged one, as an
    expired or revoked one would be) sends the page back to the form, with why."""
    server = servers.start(CHAT_AUTH="accounts")
    page = new_page(server, ready=SIGN_IN_FORM)
    register(page, "dave", PASSWORD)
    good = stored_session(page)
    header, payload, _signature = good["token"].split(".")
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(b'not the signature').decode().rstrip('=')}"
    page.evaluate("s => sessionStorage.setItem('chat.session', JSON.stringify(s))", {**good, "token": forged})
    page.reload()
    expect_account_form(page, "Your session is no longer valid: sign in again.")
    assert stored_session(page) is None
    sign_in(page, "dave", PASSWORD)


def test_accounts_token_refreshed_before_expiry(new_page: PageFactory, servers: Servers) -> None:
    """With 4-second tokens the page refreshes its token (about every 3 s)
    and stays signed in and chatting well past the first one's expiry."""
    server = servers.start(CHAT_AUTH="accounts", CHAT_TOKEN_TTL="4")
    page = new_page(server, ready=SIGN_IN_FORM)
    register(page, "erin", PASSWORD)
    first = stored_session(page)["token"]
    time.sleep(9)
    assert stored_session(page)["token"] != first
    send(page, "still here")
    expect_chat(page, "erin", "still here")
    expect_signed_in(page, "erin")
    # The live connection took each new token (reauth): the session never
    # ended, so she never left; no "Connection lost.", no reconnect.
    assert notices(page) == ["erin joined room."], notices(page)


def test_accounts_kicked_and_banned_back_to_the_form(new_page: PageFactory, servers: Servers) -> None:
    """The first account is an admin. A kick ends the other's session (the
    form says why, and signing in again works); a ban ends it too, and the
    banned account's token is then refused at the handshake (connect_error
    `banned`) and its sign-in answered with the ban."""
    server = servers.start(CHAT_AUTH="accounts")
    admin = new_page(server, ready=SIGN_IN_FORM)
    register(admin, "boss", PASSWORD)
    bob = new_page(server, ready=SIGN_IN_FORM)
    register(bob, "bob", PASSWORD)
    expect_users(admin, ["boss", "bob"])

    assert request(admin, "kick", {"name": "bob"})["ok"] is True
    expect_account_form(bob, "You were removed from the chat by a moderator.")
    assert stored_session(bob) is None
    expect_users(admin, ["boss"])
    sign_in(bob, "bob", PASSWORD)
    kept = stored_session(bob)

    assert request(admin, "ban", {"name": "bob", "seconds": 600})["ok"] is True
    expect_account_form(bob, "This account is banned from the chat.")

    # The token he had, put back and used for a handshake: refused as banned.
    bob.evaluate("s => sessionStorage.setItem('chat.session', JSON.stringify(s))", kept)
    bob.reload()
    expect_account_form(bob, "This account is banned from the chat. (bob is banned)")
    submit_account_form(bob, "bob", PASSWORD, registering=False)
    expect(bob.locator("#accountError")).to_have_text("bob is banned")
