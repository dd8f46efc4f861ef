"""Helpers for the browser tests: a headless Chromium driven by Playwright's
sync API, and small actions on the chat page."""

from __future__ import annotations

import os
from typing import Any

from playwright.sync_api import Page, expect

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
expect.set_options(timeout=10_000)


def login(page: Page, name: str) -> None:
    """Log in from the login screen and wait for the lobby."""
    page.fill("#nameInput", name)
    page.press("#nameInput", "Enter")
    expect(page.locator("#chatInput")).to_be_visible()
    expect(page.locator("#status .conn-name")).to_have_text(f"as {name}")


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
    expect(page.locator("#userList .user-name")).to_have_text(names)
    expect(page.locator("#userCount")).to_have_text(str(len(names)))


def expect_chat(page: Page, sender: str, message: str) -> None:
    line = page.locator("#chatList li.chat-chat").filter(
        has=page.locator(".message", has_text=message)
    )
    expect(line.locator(".sender")).to_have_text([sender])
    expect(line.locator(".message")).to_have_text([message])


def scroll_state(page: Page) -> dict[str, Any]:
    return page.eval_on_selector(
        "#chatScroll",
        "s => ({top: s.scrollTop, height: s.scrollHeight, client: s.clientHeight,"
        " atBottom: s.scrollHeight - s.scrollTop - s.clientHeight <= 2})",
    )
