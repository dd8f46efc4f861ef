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


def _optional_int(env: Mapping[str, str], key: str) -> int | None:
    return _int(env, key, 0) if env.get(key) else None


def _optional_float(env: Mapping[str, str], key: str) -> float | None:
    return _float(env, key, 0.0) if env.get(key) else None


def _origins(raw: str | None) -> tuple[str, ...]:
    """``CHAT_ALLOWED_ORIGINS``: comma-separated origins (``scheme://host[:port]``,
    as a browser sends them, so no path and no trailing slash), or ``*``."""
    if not raw:
        return ()
    origins = tuple(o.strip() for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and ("://" not in origin or origin.endswith("/") or origin.count("/") > 2):
            raise SystemExit(
                f"CHAT_ALLOWED_ORIGINS: {origin!r} is not an origin like https://chat.example.com"
            )
    return origins


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
    # Every frame a socket sends (WebSocket message or polling packet, valid or
    # not) is counted before it is decoded. None: twice the event rate and
    # burst, so a client the event limit merely slows is never refused here.
    frame_rate_per_second: float | None = None
    frame_burst: int | None = None
    # A socket refused frames for longer than this (or more than a burst of
    # them within one second) is disconnected.
    flood_grace_seconds: float = 2.0
    # After a socket is dropped for what it sent, new sockets from its address
    # get no burst and at most two new connections a second, for this long
    # (0: off; see README for reverse proxies).
    flood_penalty_seconds: float = 30.0
    # Origins whose pages may connect, besides the server's own; ("*",) for
    # any. Requests without an Origin header (non-browser clients) are not
    # affected.
    allowed_origins: tuple[str, ...] = ()
    # engine.io heartbeat, seconds.
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    # History sent after welcome, and the cap on one page of older history.
    history_size: int = 50
    history_page_max: int = 200
    resume_ttl_seconds: int = 24 * 3600
    # A resume that missed more events than this is refused: log in again.
    resume_max_gap: int = 5000
    # Rooms (the lobby counts for none of these limits).
    room_name_max: int = 20  # characters of a room's name (at least 2)
    room_topic_max: int = 200  # characters of a room's topic
    rooms_max: int = 10_000  # rooms in all
    rooms_per_user: int = 50  # rooms one user may be a member of
    room_members_max: int = 1000  # members of one room
    # Private conversations listed in ``conversations`` (the most recent).
    conversations_max: int = 100
    # Unread counts stop at this many ("100" means "100 or more").
    unread_cap: int = 100
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
    # Images and files (see README, Images and files).
    data_dir: Path = Path("data")  # blobs and uploads in progress
    upload_max_bytes: int = 25 * 1024 * 1024  # one file
    upload_bytes_per_hour: int = 200 * 1024 * 1024  # one user, any number of files
    files_per_message: int = 10
    upload_token_ttl: int = 600  # seconds an upload token lives at most
    # Seconds an upload may wait to be posted before it is removed.
    upload_unposted_ttl: float = 3600.0
    # Largest image (width x height) the server decodes for a thumbnail;
    # a larger one is refused (a decompression bomb, or near enough).
    upload_max_pixels: int = 40_000_000
    # Accounts (see README, Accounts and TLS). "open": anyone takes a free
    # name, as the seed did; "accounts": a socket needs a signed token.
    auth_mode: str = "open"
    # HS256 key for access tokens; empty: one generated into the database.
    secret_key: str = ""
    token_ttl: int = 15 * 60  # seconds an access token lives
    # Failed sign-ins counted per account and per address over a window;
    # past the count, sign-in is refused (429) until the window ends.
    login_failures_per_account: int = 10
    login_failures_per_address: int = 50
    login_failure_window: int = 15 * 60
    # Registrations counted per address over a window (each costs a password
    # hash, the most expensive thing a request can make the server do).
    registrations_per_address: int = 20
    registration_window: int = 60 * 60
    # Seconds between checks of this process's sockets' tokens against the
    # database (a sign-out or password change served by another process).
    revocation_sweep: float = 5.0
    # Serve HTTPS and WSS directly (both or neither).
    tls_cert: str = ""
    tls_key: str = ""

    @property
    def node_name(self) -> str:
        return self.node_id or "local"

    @property
    def frame_rate(self) -> float:
        if self.frame_rate_per_second is not None:
            return self.frame_rate_per_second
        return 2 * self.rate_per_second

    @property
    def frame_burst_size(self) -> int:
        if self.frame_burst is not None:
            return self.frame_burst
        return 2 * self.rate_burst

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
            frame_rate_per_second=_optional_float(env, "CHAT_FRAME_RATE"),
            frame_burst=_optional_int(env, "CHAT_FRAME_BURST"),
            flood_grace_seconds=_float(env, "CHAT_FLOOD_GRACE", defaults.flood_grace_seconds),
            flood_penalty_seconds=_float(env, "CHAT_FLOOD_PENALTY", defaults.flood_penalty_seconds),
            allowed_origins=_origins(env.get("CHAT_ALLOWED_ORIGINS")),
            ping_interval=_float(env, "CHAT_PING_INTERVAL", defaults.ping_interval),
            ping_timeout=_float(env, "CHAT_PING_TIMEOUT", defaults.ping_timeout),
            history_size=_int(env, "CHAT_HISTORY_SIZE", defaults.history_size),
            history_page_max=_int(env, "CHAT_HISTORY_PAGE_MAX", defaults.history_page_max),
            resume_ttl_seconds=_int(env, "CHAT_RESUME_TTL", defaults.resume_ttl_seconds),
            resume_max_gap=_int(env, "CHAT_RESUME_MAX_GAP", defaults.resume_max_gap),
            room_name_max=max(2, _int(env, "CHAT_ROOM_NAME_MAX", defaults.room_name_max)),
            room_topic_max=_int(env, "CHAT_ROOM_TOPIC_MAX", defaults.room_topic_max),
            rooms_max=_int(env, "CHAT_ROOMS_MAX", defaults.rooms_max),
            rooms_per_user=_int(env, "CHAT_ROOMS_PER_USER", defaults.rooms_per_user),
            room_members_max=_int(env, "CHAT_ROOM_MEMBERS_MAX", defaults.room_members_max),
            conversations_max=_int(env, "CHAT_CONVERSATIONS_MAX", defaults.conversations_max),
            unread_cap=max(1, _int(env, "CHAT_UNREAD_CAP", defaults.unread_cap)),
            reconcile_interval=_float(env, "CHAT_RECONCILE_INTERVAL", defaults.reconcile_interval),
            max_batch=_int(env, "CHAT_MAX_BATCH", defaults.max_batch),
            log_format=(env.get("CHAT_LOG_FORMAT") or defaults.log_format).lower(),
            log_level=(env.get("CHAT_LOG_LEVEL") or defaults.log_level).upper(),
            metrics=env.get("CHAT_METRICS") or defaults.metrics,
            shutdown_timeout=_float(env, "CHAT_SHUTDOWN_TIMEOUT", defaults.shutdown_timeout),
            data_dir=Path(env.get("CHAT_DATA_DIR") or defaults.data_dir),
            upload_max_bytes=_int(env, "CHAT_UPLOAD_MAX_BYTES", defaults.upload_max_bytes),
            upload_bytes_per_hour=_int(env, "CHAT_UPLOAD_BYTES_PER_HOUR", defaults.upload_bytes_per_hour),
            files_per_message=_int(env, "CHAT_FILES_PER_MESSAGE", defaults.files_per_message),
            upload_token_ttl=_int(env, "CHAT_UPLOAD_TOKEN_TTL", defaults.upload_token_ttl),
            upload_unposted_ttl=_float(env, "CHAT_UPLOAD_UNPOSTED_TTL", defaults.upload_unposted_ttl),
            upload_max_pixels=_int(env, "CHAT_UPLOAD_MAX_PIXELS", defaults.upload_max_pixels),
            auth_mode=(env.get("CHAT_AUTH") or defaults.auth_mode).lower(),
            secret_key=env.get("CHAT_SECRET_KEY") or defaults.secret_key,
            token_ttl=_int(env, "CHAT_TOKEN_TTL", defaults.token_ttl),
            login_failures_per_account=_int(
                env, "CHAT_LOGIN_FAILURES_PER_ACCOUNT", defaults.login_failures_per_account
            ),
            login_failures_per_address=_int(
                env, "CHAT_LOGIN_FAILURES_PER_ADDRESS", defaults.login_failures_per_address
            ),
            login_failure_window=_int(env, "CHAT_LOGIN_FAILURE_WINDOW", defaults.login_failure_window),
            registrations_per_address=_int(
                env, "CHAT_REGISTRATIONS_PER_ADDRESS", defaults.registrations_per_address
            ),
            registration_window=_int(env, "CHAT_REGISTRATION_WINDOW", defaults.registration_window),
            revocation_sweep=_float(env, "CHAT_REVOCATION_SWEEP", defaults.revocation_sweep),
            tls_cert=env.get("CHAT_TLS_CERT") or defaults.tls_cert,
            tls_key=env.get("CHAT_TLS_KEY") or defaults.tls_key,
        )
