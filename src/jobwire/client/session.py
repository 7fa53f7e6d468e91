"""A small local file keeping, per server URL, the session token and the ids of the
jobs being watched, so a restarted process (or the next CLI command) carries on."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def config_dir() -> Path:
    """$XDG_CONFIG_HOME/jobwire, or ~/.config/jobwire."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "jobwire"


def default_path() -> Path:
    return config_dir() / "client.json"


def server_key(url: str) -> str:
    return url.rstrip("/")


class SessionFile:
    """{"servers": {url: {"token", "owner", "jobs": [ids]}}}, readable only by its owner
    (it holds tokens), replaced atomically on every change."""

    def __init__(self, path: str | os.PathLike[str], url: str) -> None:
        self.path = Path(path)
        self.key = server_key(url)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"servers": {}}  # missing or damaged: start over rather than fail
        if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
            return {"servers": {}}
        return data

    def load(self) -> dict[str, Any]:
        entry = self._read()["servers"].get(self.key)
        return entry if isinstance(entry, dict) else {}

    @property
    def token(self) -> str | None:
        token = self.load().get("token")
        return token if isinstance(token, str) else None

    @property
    def jobs(self) -> list[str]:
        jobs = self.load().get("jobs")
        return [j for j in jobs if isinstance(j, str)] if isinstance(jobs, list) else []

    def _update(self, **changes: Any) -> None:
        data = self._read()
        entry = data["servers"].setdefault(self.key, {})
        entry.update(changes)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".client-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:  # mkstemp creates it 0600
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def save_token(self, token: str, owner: str, keep_jobs: bool = False) -> None:
        # A new owner has none of the old jobs, unless they were claimed along with it.
        self._update(token=token, owner=owner, **({} if keep_jobs else {"jobs": []}))

    def add_job(self, job_id: str) -> None:
        jobs = self.jobs
        if job_id not in jobs:
            self._update(jobs=[*jobs, job_id])

    def remove_job(self, job_id: str) -> None:
        jobs = self.jobs
        if job_id in jobs:
            self._update(jobs=[j for j in jobs if j != job_id])
