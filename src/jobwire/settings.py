"""What one jobwire process is configured with (kept light: the client CLI imports it)."""

from __future__ import annotations

import dataclasses
import os
import resource


class SettingError(ValueError):
    """A JOBWIRE_* variable that cannot be understood; the message names it."""


def _env_limit(name: str, default: int) -> int:
    """A limit's default, overridable by the environment variable JOBWIRE_<NAME>."""
    return dataclasses.field(
        default_factory=lambda: int(os.environ.get(f"JOBWIRE_{name.upper()}", default)))


def _env_seconds(name: str, default: float) -> float:
    """Like _env_limit, for a duration in seconds."""
    return dataclasses.field(
        default_factory=lambda: float(os.environ.get(f"JOBWIRE_{name.upper()}", default)))


def _env_flag(name: str, default: bool = False) -> bool:
    """On if the environment variable JOBWIRE_<NAME> is 1 (or true, yes, on), off if it is
    set to anything else, `default` if it is unset or empty."""
    def read() -> bool:
        value = os.environ.get(f"JOBWIRE_{name.upper()}", "").strip().lower()
        return value in ("1", "true", "yes", "on") if value else default
    return dataclasses.field(default_factory=read)


def _env_secret(name: str) -> str | None:
    """A secret from the environment variable JOBWIRE_<NAME>; unset or empty is None."""
    return dataclasses.field(
        default_factory=lambda: os.environ.get(f"JOBWIRE_{name.upper()}") or None)


def _env_text(name: str, default: str) -> str:
    """Like _env_limit, for text (parsed where it is used)."""
    return dataclasses.field(
        default_factory=lambda: os.environ.get(f"JOBWIRE_{name.upper()}", default))


def _live_connection_budget() -> int:
    """The default cap on live connections: the process's file limit less a quarter of it
    (at least 64) for what else needs descriptors: HTTP requests and idle keep-alive
    connections, the database pool and files, logs. Past the file limit the process can
    no longer accept anything, health checks included."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - max(64, soft // 4))


@dataclasses.dataclass
class Settings:
    db: str = "sqlite:///jobwire.db"
    app: str = "jobwire.demo:jobwire"
    host: str = "127.0.0.1"
    port: int = 8000
    concurrency: int = 10  # jobs run at once by this process's worker; 0 runs none
    processes: int = 1  # server processes sharing the port (`jobwire serve --processes`)
    queues: tuple[str, ...] | None = None  # the queues this process's worker serves; None: all
    lease_seconds: float = 30.0
    retention_seconds: float = 24 * 3600.0
    guest_ttl_seconds: float = 30 * 24 * 3600.0
    # Limits on what one client may use (docs/guarantees.md); each refusal says which.
    max_body_bytes: int = _env_limit("max_body_bytes", 1 << 20)
    max_items_per_job: int = _env_limit("max_items_per_job", 100_000)
    max_subscriptions: int = _env_limit("max_subscriptions", 1_000)  # per WebSocket
    max_connections: int = _env_limit("max_connections", 100)  # WS + SSE per owner
    buffer_bytes: int = _env_limit("buffer_bytes", 4 << 20)  # queued for one WS or SSE
    ws_max_frame_bytes: int = _env_limit("ws_max_frame_bytes", 64 << 10)
    max_json_depth: int = _env_limit("max_json_depth", 64)  # a body or WebSocket message
    max_active_jobs: int = _env_limit("max_active_jobs", 100)  # queued + running per owner
    max_delay_seconds: float = _env_seconds("max_delay_seconds", 30 * 24 * 3600.0)  # a submit's
    # What tasks that fetch URLs from their input may reach (jobwire.netguard, the demo).
    fetch_allow_private: bool = _env_flag("fetch_allow_private")  # off: public addresses only
    fetch_deadline: float = _env_seconds("fetch_deadline", 15.0)  # the whole fetch, redirects too
    metrics_token: str | None = _env_secret("metrics_token")  # None: /metrics is open
    # WS + SSE of all owners together, in this process
    max_live_connections: int = _env_limit("max_live_connections", _live_connection_budget())
    # A public server (docs/guarantees.md "A public server"; parsed in api/public.py).
    session_rate: str = _env_text("session_rate", "30/60s,10")  # new guest sessions per address
    trusted_proxies: str = _env_text("trusted_proxies", "")  # IPs/CIDRs whose X-Forwarded-* count
    allowed_origins: str = _env_text("allowed_origins", "")  # other sites that may use the cookie
    secure_cookies: bool = _env_flag("secure_cookies")  # Secure even over plain HTTP
    # How tasks run (jobwire.runner): seconds per attempt unless the task sets its own
    # (0: no limit), and threads for plain `def` tasks (0: as many as `concurrency`).
    task_timeout: float = _env_seconds("task_timeout", 3600.0)
    sync_threads: int = _env_limit("sync_threads", 0)
    # The host app's identity (docs/identity.md): its JWTs and its backend's service key.
    service_key: str | None = _env_secret("service_key")
    jwt_secret: str | None = _env_secret("jwt_secret")  # HS256/384/512
    jwt_public_key: str | None = _env_secret("jwt_public_key")  # PEM text or a PEM file's path
    jwt_jwks: str | None = _env_secret("jwt_jwks")  # a JWKS file's path or URL
    jwt_audience: str | None = _env_secret("jwt_audience")  # checked when set
    jwt_issuer: str | None = _env_secret("jwt_issuer")  # checked when set
    jwt_owner_claim: str | None = _env_secret("jwt_owner_claim")  # None: sub
    jwt_guest_claim: str | None = _env_secret("jwt_guest_claim")  # this claim true: a guest
    jwt_leeway_seconds: float = _env_seconds("jwt_leeway_seconds", 30.0)  # for exp and nbf
    jwt_jwks_refresh_seconds: float = _env_seconds("jwt_jwks_refresh_seconds", 30.0)
    # A WebSocket without a token in its request must send {"op": "auth"} this soon.
    ws_auth_seconds: float = _env_seconds("ws_auth_seconds", 10.0)
    # How often a process re-checks the sessions of its live connections (ended sessions
    # close theirs: docs/guarantees.md "A public server").
    session_check_seconds: float = _env_seconds("session_check_seconds", 2.0)
    ticket_seconds: int = _env_limit("ticket_seconds", 30)  # how long a ticket is usable
    # `jobwire serve`'s line per request (uvicorn's access log): ~10% of a small request's
    # CPU; JOBWIRE_ACCESS_LOG=0 or --no-access-log turns it off.
    access_log: bool = _env_flag("access_log", True)

    def describe(self) -> str:
        """The database (its password masked), app and worker slots, for the line a
        process logs as it starts."""
        from jobwire.redact import database_url

        workers = f"{self.concurrency} worker slots" if self.concurrency else "no workers"
        return f"{database_url(self.db)} with app {self.app} and {workers}"
