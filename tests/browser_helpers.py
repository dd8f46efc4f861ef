"""Helpers for the browser tests: a headless Chromium driven by Playwright's
sync API, and small actions on the chat page."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

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
