"""Fixtures for the chaos suite: servers running the chaos tasks with chosen limits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Proc

APP = "tests.chaos.tasks:jobwire"

Serve = Callable[..., Proc]


@pytest.fixture
def serve(procs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Serve:
    """serve(*args, db=None, **limits) -> a server on a fresh SQLite file (or `db`), with
    Settings limits set through their JOBWIRE_* variables (restarts keep them)."""

    def start(*args: str, db: str | None = None, **limits: int) -> Proc:
        for name, value in limits.items():
            monkeypatch.setenv(f"JOBWIRE_{name.upper()}", str(value))
        url = db or f"sqlite:///{tmp_path / 'chaos.db'}"
        proc: Proc = procs("serve", "--db", url, "--app", APP, "--lease", "2", *args)
        return proc

    return start
