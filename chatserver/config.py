"""Settings, read once from the environment, with working defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///chat.db"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def database_url_from_env(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get("CHAT_DATABASE_URL") or DEFAULT_DATABASE_URL


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{key} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{key} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str = DEFAULT_DATABASE_URL
    public_dir: Path = PROJECT_ROOT / "public"
    node_modules_dir: Path = PROJECT_ROOT / "node_modules"
    # A name for this process in the log and the server's log lines (not its
    # identity: each process generates a lease id at start). Set it per
    # process slot when running several: a process restarted under the same
    # name closes its previous run's sessions at once instead of when that
    # run's lease expires.
    node_id: str = ""
    # Limits on what one client may send.
    max_message_chars: int = 2000
    max_packet_bytes: int = 64 * 1024
    rate_per_second: float = 200.0
    rate_burst: int = 400
    # engine.io heartbeat, seconds.
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    # History sent after welcome, and the cap on one page of older history.
    history_size: int = 50
    history_page_max: int = 200
    resume_ttl_seconds: int = 24 * 3600
    # A resume that missed more events than this is refused: log in again.
    resume_max_gap: int = 5000
    # Seconds between looks for sessions the log shows open with no socket.
    reconcile_interval: float = 10.0
    # Seconds without a heartbeat after which a process sharing the log is
    # taken for dead and its sessions are closed by another.
    node_lease_seconds: float = 15.0
    # Largest number of appends committed in one transaction (group commit).
    max_batch: int = 512
    # Operations: log lines (text|json) and level, /metrics (on, off or a
    # port of its own), seconds a graceful stop may take before the process exits.
    log_format: str = "text"
    log_level: str = "INFO"
    metrics: str = "on"
    shutdown_timeout: float = 10.0

    @property
    def node_name(self) -> str:
        return self.node_id or "local"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            host=env.get("HOST") or defaults.host,
            port=_int(env, "PORT", defaults.port),
            database_url=database_url_from_env(env),
            public_dir=Path(env.get("CHAT_PUBLIC_DIR") or defaults.public_dir),
            node_modules_dir=Path(
                env.get("CHAT_NODE_MODULES_DIR") or defaults.node_modules_dir
            ),
            node_id=env.get("CHAT_NODE_ID") or defaults.node_id,
            node_lease_seconds=_float(env, "CHAT_NODE_LEASE", defaults.node_lease_seconds),
            max_message_chars=_int(env, "CHAT_MAX_MESSAGE_CHARS", defaults.max_message_chars),
            max_packet_bytes=_int(env, "CHAT_MAX_PACKET_BYTES", defaults.max_packet_bytes),
            rate_per_second=_float(env, "CHAT_RATE_PER_SECOND", defaults.rate_per_second),
            rate_burst=_int(env, "CHAT_RATE_BURST", defaults.rate_burst),
            ping_interval=_float(env, "CHAT_PING_INTERVAL", defaults.ping_interval),
            ping_timeout=_float(env, "CHAT_PING_TIMEOUT", defaults.ping_timeout),
            history_size=_int(env, "CHAT_HISTORY_SIZE", defaults.history_size),
            history_page_max=_int(env, "CHAT_HISTORY_PAGE_MAX", defaults.history_page_max),
            resume_ttl_seconds=_int(env, "CHAT_RESUME_TTL", defaults.resume_ttl_seconds),
            resume_max_gap=_int(env, "CHAT_RESUME_MAX_GAP", defaults.resume_max_gap),
            reconcile_interval=_float(env, "CHAT_RECONCILE_INTERVAL", defaults.reconcile_interval),
            max_batch=_int(env, "CHAT_MAX_BATCH", defaults.max_batch),
            log_format=(env.get("CHAT_LOG_FORMAT") or defaults.log_format).lower(),
            log_level=(env.get("CHAT_LOG_LEVEL") or defaults.log_level).upper(),
            metrics=env.get("CHAT_METRICS") or defaults.metrics,
            shutdown_timeout=_float(env, "CHAT_SHUTDOWN_TIMEOUT", defaults.shutdown_timeout),
        )
