"""The blob store: file contents by their SHA-256, beside the event log.

The log records that a file was shared (its metadata and hash); the bytes
live here. Everything the rest of the server does with bytes goes through
``BlobStore``, so another backend (an S3-compatible bucket, see README) is a
class of its own, not a change to the upload and download code.

``LocalBlobStore`` keeps, under its root (``CHAT_DATA_DIR``):

- ``blobs/<first two hex digits>/<sha256>``: one file per distinct content,
  written once (a second upload of the same bytes keeps the first file);
- ``tmp/<random>.part``: uploads being received. A blob appears under its
  hash only by ``os.replace`` of a complete, hashed file, so a reader never
  sees a partial blob and an interrupted upload leaves only its ``.part``,
  which the upload removes (and ``sweep_staging`` any a crash left behind).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from typing import Protocol

_SHA256 = re.compile(r"[0-9a-f]{64}")


class BlobStore(Protocol):
    def staging_file(self) -> Path:
        """A fresh local path to receive an upload into (not yet a blob)."""
        ...

    def commit(self, staged: Path, sha256: str) -> None:
        """Make ``staged`` (complete, of hash ``sha256``) the blob ``sha256``;
        if that blob exists already, drop ``staged`` (deduplication)."""
        ...

    def put_bytes(self, data: bytes, sha256: str) -> None: ...

    def local_path(self, sha256: str) -> Path | None:
        """Where the blob can be served from, or None if it is missing."""
        ...

    def delete(self, sha256: str) -> None: ...

    def sweep_staging(self, older_than: float) -> int: ...


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"

    def _path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.blobs / sha256[:2] / sha256

    def staging_file(self) -> Path:
        # Created on first use: a server that never receives a file makes no folders.
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / f"{secrets.token_hex(16)}.part"

    def commit(self, staged: Path, sha256: str) -> None:
        target = self._path(sha256)
        if target.exists():
            # Same hash, same bytes: keep the file already served (its ETag
            # and any reader holding it open stay valid).
            staged.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)

    def put_bytes(self, data: bytes, sha256: str) -> None:
        if self._path(sha256).exists():
            return
        staged = self.staging_file()
        try:
            with open(staged, "wb") as f:
                f.write(data)
            self.commit(staged, sha256)
        finally:
            staged.unlink(missing_ok=True)

    def local_path(self, sha256: str) -> Path | None:
        path = self._path(sha256)
        return path if path.is_file() else None

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def sweep_staging(self, older_than: float) -> int:
        """Remove ``.part`` files untouched for ``older_than`` seconds: left
        by a process that died while receiving them."""
        if not self.tmp.is_dir():
            return 0
        cutoff = time.time() - older_than
        removed = 0
        for path in self.tmp.glob("*.part"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
