"""Helpers for the browser tests: a headless Chromium driven by Playwright's
sync API, and small actions on the chat page."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageDraw
from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Generous for a loaded CI machine; a passing run waits far less.
TIMEOUT_MS = 10_000
expect.set_options(timeout=TIMEOUT_MS)


def wait_until(page: Page, predicate: str, arg: Any = None, describe: Callable[[], Any] | None = None) -> None:
    """Wait until the JavaScript `predicate(arg)` is true on the page, checked
    every animation frame (expect() backs off to one check a second)."""
    try:
        page.wait_for_function(predicate, arg=arg, timeout=TIMEOUT_MS)
    except PlaywrightTimeoutError:
        raise AssertionError(f"timed out waiting for {predicate} ({arg!r}); now: {describe() if describe else '?'}") from None


def login(page: Page, name: str) -> None:
    """Log in from the login screen and wait for the lobby."""
    page.fill("#nameInput", name)
    page.press("#nameInput", "Enter")
    wait_until(
        page,
        "name => document.querySelector('#chatInput') !== null &&"
        " document.querySelector('#status .conn-name')?.textContent === 'as ' + name",
        name,
        lambda: page.inner_text("body"),
    )


def send(page: Page, text: str) -> None:
    page.fill("#chatInput", text)
    page.press("#chatInput", "Enter")


def chats(page: Page) -> list[tuple[str, str]]:
    """(sender, message) of every chat line, as text."""
    pairs = page.eval_on_selector_all(
        "#chatList li.chat-chat",
        "els => els.map(el => [el.querySelector('.sender').textContent,"
        " el.querySelector('.message').textContent])",
    )
    return [(sender, message) for sender, message in pairs]


def notices(page: Page) -> list[str]:
    """The text of every join, leave and local notice line."""
    return page.eval_on_selector_all(
        "#chatList li.chat-join, #chatList li.chat-leave, #chatList li.chat-notice",
        "els => els.map(el => el.querySelector('.notice').textContent)",
    )


def presence(page: Page) -> list[str]:
    """The join and leave lines only."""
    return page.eval_on_selector_all(
        "#chatList li.chat-join, #chatList li.chat-leave",
        "els => els.map(el => el.querySelector('.notice').textContent)",
    )


def users(page: Page) -> list[str]:
    return page.eval_on_selector_all("#userList .user-name", "els => els.map(el => el.textContent)")


def expect_users(page: Page, names: list[str]) -> None:
    """The online-users panel lists exactly `names`, and its badge counts them."""
    wait_until(
        page,
        "names => JSON.stringify([...document.querySelectorAll('#userList .user-name')].map(e => e.textContent))"
        " === JSON.stringify(names) && document.querySelector('#userCount').textContent === String(names.length)",
        names,
        lambda: (users(page), page.inner_text("#userCount")),
    )


def expect_chat(page: Page, sender: str, message: str) -> None:
    """Exactly one chat line shows `message`, from `sender`."""
    wait_until(
        page,
        "([sender, message]) => [...document.querySelectorAll('#chatList li.chat-chat')].some(li =>"
        " li.querySelector('.sender').textContent === sender && li.querySelector('.message').textContent === message)",
        [sender, message],
        lambda: chats(page)[-5:],
    )
    assert [c for c in chats(page) if c[1] == message] == [(sender, message)]


def scroll_state(page: Page) -> dict[str, Any]:
    return page.eval_on_selector(
        "#chatScroll",
        "s => ({top: s.scrollTop, height: s.scrollHeight, client: s.clientHeight,"
        " atBottom: s.scrollHeight - s.scrollTop - s.clientHeight <= 2})",
    )


# -- rooms and private conversations -------------------------------------------

CONVERSATIONS_JS = """() => Object.fromEntries(['roomConvs', 'privateConvs'].map(id => [id,
    [...document.querySelectorAll('#' + id + ' .conv-item')].map(li =>
        [li.querySelector('.conv-name').textContent, li.querySelector('.unread')?.textContent ?? ''])]))"""


def conversations(page: Page) -> dict[str, list[list[str]]]:
    """The conversation list: {roomConvs: [[label, unread]], privateConvs: [...]},
    unread '' where no badge is shown."""
    return page.evaluate(CONVERSATIONS_JS)


def expect_conversations(page: Page, rooms: list[list[str]], private: list[list[str]]) -> None:
    """The conversation list shows exactly these entries ([label, unread badge or ''])."""
    wait_until(
        page,
        f"want => JSON.stringify(({CONVERSATIONS_JS})()) === JSON.stringify(want)",
        {"roomConvs": rooms, "privateConvs": private},
        lambda: conversations(page),
    )


def open_conversation(page: Page, label: str) -> None:
    """Click an entry of the conversation list (`Lobby`, `# room`, a peer's name)."""
    page.locator(".conv-item").filter(has=page.get_by_text(label, exact=True)).click()
    wait_until(
        page,
        "label => document.querySelector('.conv-item.active .conv-name')?.textContent === label"
        " && document.querySelector('#chatInput') !== null",
        label,
        lambda: conversations(page),
    )


def title(page: Page) -> str:
    return page.inner_text("#convHeader .conv-title")


def create_room(page: Page, name: str, topic: str = "") -> None:
    """Create a room from the directory; it is then shown."""
    page.click("#browseRooms")
    page.fill("#roomNameInput", name)
    page.fill("#roomTopicInput", topic)
    page.click("#createRoomButton")
    expect(page.locator("#convHeader .conv-title")).to_have_text(f"# {name}")


def join_room(page: Page, name: str) -> None:
    """Join a room from the directory's list of all rooms; it is then shown."""
    page.click("#browseRooms")
    entry = page.locator("#roomDirectory .dir-room").filter(has=page.get_by_text(name, exact=True))
    entry.locator("[data-action=join]").click()
    expect(page.locator("#convHeader .conv-title")).to_have_text(f"# {name}")


def members(page: Page) -> list[list[object]]:
    """The shown room's members: [name, online]."""
    return page.eval_on_selector_all(
        "#memberList .user",
        "els => els.map(el => [el.querySelector('.user-name').textContent, !el.classList.contains('user-offline')])",
    )


def expect_members(page: Page, want: list[list[object]]) -> None:
    online = sum(1 for _name, is_online in want if is_online)
    wait_until(
        page,
        "([want, badge]) => JSON.stringify([...document.querySelectorAll('#memberList .user')].map(el =>"
        " [el.querySelector('.user-name').textContent, !el.classList.contains('user-offline')]))"
        " === JSON.stringify(want) && document.querySelector('#memberCount').textContent === badge",
        [want, f"{online}/{len(want)}"],
        lambda: members(page),
    )


def send_many(page: Page, texts: list[str]) -> None:
    """Send chats to the shown conversation without typing each."""
    page.evaluate(
        "texts => { const c = ChatApp.controller.homeModel.activeConversation();"
        " texts.forEach(t => ChatApp.controller.viewEventBus.trigger('chat', t, c)); }",
        texts,
    )


def request(page: Page, event: str, *args: Any) -> Any:
    """Send a request from the page's own socket and return its acknowledgement."""
    return page.evaluate(
        "([event, args]) => new Promise(resolve =>"
        " ChatApp.controller.chatClient.socket.timeout(5000).emit(event, ...args, (err, ack) => resolve(err ? {timeout: true} : ack)))",
        [event, list(args)],
    )


# -- files and images (issue 14) -------------------------------------------------


def picture(width: int, height: int, fmt: str = "PNG") -> bytes:
    """A picture that shows whether it was scaled or cropped: a diagonal
    gradient with a frame and a circle, in `fmt` (PNG, JPEG, ...)."""
    vertical = Image.linear_gradient("L").resize((width, height))
    horizontal = Image.linear_gradient("L").rotate(90).resize((width, height))
    image = Image.merge("RGB", (horizontal, vertical, Image.new("L", (width, height), 160)))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width - 1, height - 1), outline=(20, 20, 120), width=max(2, width // 100))
    r = min(width, height) // 4
    draw.ellipse((width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r), fill=(240, 180, 40))
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def size_text(size: int) -> str:
    """How the page writes a file size: binary units, one decimal below 10."""
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}" if value < 10 else f"{round(value)} {unit}"


def file_payload(name: str, data: bytes, mime: str = "application/octet-stream") -> dict[str, Any]:
    return {"name": name, "mimeType": mime, "buffer": data}


def attach(page: Page, *files: dict[str, Any]) -> None:
    """Choose files with the attach button's file input."""
    page.set_input_files("#fileInput", list(files))


def drop_files(page: Page, *files: dict[str, Any], target: str = "#chatScroll") -> None:
    """Drag files over the conversation and drop them, as a file manager does."""
    page.evaluate(
        """([target, files]) => {
            const transfer = new DataTransfer();
            for (const f of files) {
                const bytes = Uint8Array.from(atob(f.data), c => c.charCodeAt(0));
                transfer.items.add(new File([bytes], f.name, {type: f.mimeType}));
            }
            const el = document.querySelector(target);
            for (const type of ['dragenter', 'dragover', 'drop']) {
                el.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
            }
        }""",
        [target, [{"name": f["name"], "mimeType": f["mimeType"], "data": base64.b64encode(f["buffer"]).decode()} for f in files]],
    )


def tray(page: Page) -> list[list[str]]:
    """The files waiting in the input: [name, size text, state]."""
    return page.eval_on_selector_all(
        "#uploadTray li.upload",
        "els => els.map(el => [el.querySelector('.upload-name').textContent, el.querySelector('.upload-size').textContent,"
        " el.className.match(/upload-(uploading|ready|failed)/)[1]])",
    )


def expect_tray_ready(page: Page, count: int) -> None:
    """`count` files wait in the input, all uploaded."""
    wait_until(
        page,
        "n => document.querySelectorAll('#uploadTray li.upload').length === n &&"
        " document.querySelectorAll('#uploadTray li.upload-ready').length === n",
        count,
        lambda: (tray(page), page.inner_text("#uploadTray")),
    )


ATTACHMENTS_JS = """els => els.map(li => [li.querySelector('.sender').textContent, li.querySelector('.message').textContent,
    [...li.querySelectorAll('.attachment')].map(a => [a.classList.contains('attachment-image') ? 'image' : 'file',
        a.querySelector('.att-name').textContent, a.querySelector('.att-size').textContent])])"""


def file_chats(page: Page) -> list[list[Any]]:
    """The chat lines with files: [sender, message, [[image|file, name, size text], ...]]."""
    return page.eval_on_selector_all("#chatList li.chat-files", ATTACHMENTS_JS)


def expect_file_chat(page: Page, sender: str, message: str, files: list[list[str]]) -> None:
    """A chat line from `sender` with `message` shows exactly `files`, every
    file's link ready (with a token) and every thumbnail loaded."""
    want = [sender, message, files]
    wait_until(
        page,
        f"want => ({ATTACHMENTS_JS})([...document.querySelectorAll('#chatList li.chat-files')])"
        " .some(line => JSON.stringify(line) === JSON.stringify(want))"
        " && [...document.querySelectorAll('#chatList a[data-file]')].every(a => /[/]files[/][^/?]+[?]token=./.test(a.href))"
        " && [...document.querySelectorAll('#chatList img.att-thumb')].every(img => img.complete && img.naturalWidth > 0)",
        want,
        lambda: file_chats(page),
    )


def fetch(page: Page, url: str) -> dict[str, Any]:
    """GET `url` from the page (its origin, its cookies): status, headers, body as base64."""
    return page.evaluate(
        """async url => {
            const r = await fetch(url);
            const bytes = new Uint8Array(await r.arrayBuffer());
            let binary = '';
            for (const b of bytes) binary += String.fromCharCode(b);
            return {status: r.status, headers: Object.fromEntries(r.headers), body: btoa(binary)};
        }""",
        url,
    )


# -- accounts mode (issue 13) ----------------------------------------------------


def expect_signed_in(page: Page, name: str) -> None:
    """The lobby is shown, logged in as the account `name`."""
    wait_until(
        page,
        "name => document.querySelector('#chatInput') !== null &&"
        " document.querySelector('#status .conn-name')?.textContent === 'as ' + name",
        name,
        lambda: page.inner_text("body"),
    )


def submit_account_form(page: Page, name: str, password: str, *, registering: bool) -> None:
    """Fill and send the sign-in form, or the register form (switched to first)."""
    if (page.inner_text("#accountSubmit").strip() == "Register") != registering:
        page.click("#accountSwitch")
    expect(page.locator("#accountSubmit")).to_have_text("Register" if registering else "Sign in")
    page.fill("#accountName", name)
    page.fill("#accountPassword", password)
    page.click("#accountSubmit")


def register(page: Page, name: str, password: str) -> None:
    """Register on the form; the page then signs in with it."""
    submit_account_form(page, name, password, registering=True)
    expect_signed_in(page, name)


def sign_in(page: Page, name: str, password: str) -> None:
    submit_account_form(page, name, password, registering=False)
    expect_signed_in(page, name)


def expect_account_form(page: Page, notice: str = "") -> None:
    """The sign-in form is shown (with `notice` above it, or none) and the
    status says nobody is signed in."""
    expect(page.locator("#accountForm")).to_be_visible()
    expect(page.locator("#status .conn-text")).to_have_text("Not signed in")
    if notice:
        expect(page.locator("#accountNotice")).to_have_text(notice)
    else:
        expect(page.locator("#accountNotice")).to_have_count(0)


def stored_session(page: Page) -> Any:
    """What this tab keeps of its session (sessionStorage), or None."""
    return page.evaluate("() => JSON.parse(sessionStorage.getItem('chat.session') || 'null')")


def api(page: Page, method: str, path: str, body: Any = None, token: str | None = None) -> dict[str, Any]:
    """A JSON request from the page (its origin): {status, body}."""
    return page.evaluate(
        """async ([method, path, body, token]) => {
            const headers = {};
            if (body !== null) headers['Content-Type'] = 'application/json';
            if (token) headers['Authorization'] = 'Bearer ' + token;
            const r = await fetch(path, {method, headers, body: body === null ? undefined : JSON.stringify(body)});
            const text = await r.text();
            let parsed = null;
            try { parsed = text ? JSON.parse(text) : null; } catch (e) { parsed = text; }
            return {status: r.status, body: parsed};
        }""",
        [method, path, body, token],
    )
