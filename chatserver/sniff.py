"""What a file is, from its first bytes (never from its name or the client's
claim).

A small subset of the WHATWG MIME Sniffing rules, written here rather than
taken from a library: the server needs few answers and all of them safe.
The types that matter are the four images served inline (decided by their
magic numbers alone) and the markup a browser would run (HTML, SVG, XML),
which is recognized so that it is labelled as what it is; everything is
served with ``nosniff`` and, but for those four images, as an attachment,
so a wrong guess here downloads a file, it never runs one.
"""

from __future__ import annotations

SAMPLE_BYTES = 1445  # what WHATWG's sniffing looks at (the "resource header")

# Served inline: images a browser decodes with no script and no markup.
SAFE_INLINE = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"\x00\x00\x01\x00", "image/x-icon"),
    (b"%PDF-", "application/pdf"),
    (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b\x08", "application/gzip"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"OggS\x00", "application/ogg"),
    (b"ID3", "audio/mpeg"),
    (b"\x1aE\xdf\xa3", "video/webm"),
    (b"%!PS-Adobe-", "application/postscript"),
)

# WHATWG's HTML patterns: after leading whitespace, one of these (any case)
# followed by a space or ">" .
_HTML_TAGS = (
    b"<!DOCTYPE HTML", b"<HTML", b"<HEAD", b"<SCRIPT", b"<IFRAME", b"<H1", b"<DIV", b"<FONT",
    b"<TABLE", b"<A", b"<STYLE", b"<TITLE", b"<B", b"<BODY", b"<BR", b"<P", b"<!--",
)
_TAG_END = b" >\t\n\x0c\r"
_WHITESPACE = b" \t\n\x0c\r"


def _riff(sample: bytes) -> str | None:
    if sample[:4] != b"RIFF" or len(sample) < 12:
        return None
    return {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}.get(sample[8:12])


def _mp4(sample: bytes) -> bool:
    return len(sample) >= 12 and sample[4:8] == b"ftyp"


def _markup(sample: bytes) -> str | None:
    text = sample.lstrip(_WHITESPACE)
    if text.startswith(b"\xef\xbb\xbf"):
        text = text[3:].lstrip(_WHITESPACE)
    upper = text[:64].upper()
    for tag in _HTML_TAGS:
        if upper.startswith(tag) and len(text) > len(tag) and text[len(tag)] in _TAG_END:
            return "text/html"
    lower = sample.lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")) and b"<svg" in lower:
        return "image/svg+xml"
    if text.startswith(b"<?xml"):
        # An XHTML page runs script like HTML does.
        return "application/xhtml+xml" if b"<html" in lower else "text/xml"
    return None


def _text(sample: bytes) -> bool:
    """UTF-8 (a character cut by the end of the sample is fine) without the
    control bytes that only binary files hold."""
    if any(b < 0x20 and b not in b"\t\n\x0c\r\x1b" for b in sample):
        return False
    for cut in range(4):
        try:
            sample[: len(sample) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


def sniff(sample: bytes) -> str:
    """The MIME type of a file whose first bytes are ``sample``."""
    for magic, mime in _MAGIC:
        if sample.startswith(magic):
            return mime
    riff = _riff(sample)
    if riff is not None:
        return riff
    if _mp4(sample):
        return "video/mp4"
    markup = _markup(sample)
    if markup is not None:
        return markup
    if sample and _text(sample):
        return "text/plain"
    return "application/octet-stream"
