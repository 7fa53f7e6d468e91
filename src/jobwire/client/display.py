"""How `jobwire watch` shows a job: a live progress bar with item lines on a terminal,
plain lines (one per change) in a pipe."""

from __future__ import annotations

import json
from typing import IO, Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from jobwire.client.snapshot import JSON, Snapshot
from jobwire.text import printable


def _json(value: JSON) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def changes(prev: Snapshot | None, snap: Snapshot) -> list[str]:
    """The lines worth printing for the step from `prev` to `snap`, made `printable`:
    item names, errors and results come from guests."""
    job = f"job {snap.id}"
    p = snap.progress
    counts = f"{p['done']}/{p['total']} done, {p['failed']} failed"
    lines = []
    ev = snap.event
    if prev is None or ev is None:  # first state, or reloaded after a gap
        lines.append(f"{job} {snap.job['task']}: {snap.status}, {counts}")
    elif ev["type"] == "item" and ev["data"]["item"] in ("done", "failed"):
        item = snap.items[ev["data"]["ref"]]
        lines.append(f"item {item['ref']} failed: {item.get('error')}"
                     if item["status"] == "failed"
                     else f"item {item['ref']} done {_json(item.get('result'))}")
    elif ev["type"] == "retrying":
        lines.append(f"{job} retrying: {snap.error}")
    elif ev["type"] == "cancel_requested":
        lines.append(f"{job} cancel requested")
    elif snap.status != prev.status and not snap.terminal:
        lines.append(f"{job} {snap.status}")
    if snap.terminal and (prev is None or not prev.terminal):
        outcome = {"completed": f": {_json(snap.result)}", "failed": f": {snap.error}"}
        lines.append(f"{job} {snap.status} ({counts}){outcome.get(snap.status, '')}")
    return [printable(line) for line in lines]


class Display(Protocol):
    def show(self, snap: Snapshot) -> None: ...

    def close(self) -> None: ...


class Lines:
    """Plain output: one line per change, flushed at once so pipes see it live."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.prev: Snapshot | None = None

    def show(self, snap: Snapshot) -> None:
        for line in changes(self.prev, snap):
            print(line, file=self.out, flush=True)
        self.prev = snap

    def close(self) -> None:
        pass


class RateColumn(ProgressColumn):
    """Items finished per second, as rich measures it over recent updates; nothing once
    the job ended, as a rate would say it goes on."""

    def render(self, task: Task) -> Text:
        if task.fields["ended"]:
            return Text("")
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} items/s" if speed else "- items/s", style="progress.data.speed")


class EtaColumn(TimeRemainingColumn):
    """"ETA" and the time left, while the job runs."""

    def render(self, task: Task) -> Text:
        return Text("") if task.fields["ended"] else Text.assemble("ETA ", super().render(task))


class Bar:
    """A live bar (done/failed of total, rate, ETA) with item and status lines above it;
    at the end it shows the final state, still and without rate or ETA."""

    def __init__(self, console: Console) -> None:
        self.prev: Snapshot | None = None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[of]} done"),
            TextColumn("[red]{task.fields[failed]} failed"),
            RateColumn(), EtaColumn(),
            console=console,
        )
        self.task = self.progress.add_task("", total=None, done=0, failed=0, of="?",
                                           ended=False)
        self.progress.start()

    def show(self, snap: Snapshot) -> None:
        for line in changes(self.prev, snap):
            self.progress.console.print(line, markup=False, highlight=False)
        p = snap.progress
        # The description is rich markup (see TextColumn above): escaped as well.
        description = escape(printable(f"{snap.id[:8]} {snap.status}"))
        # An unknown total pulses the bar as if work went on: an ended job's stands still.
        total = p["total"] or (1 if snap.terminal else None)
        self.progress.update(self.task, description=description, total=total,
                             completed=p["done"] + p["failed"], done=p["done"],
                             failed=p["failed"], of=p["total"], ended=snap.terminal)
        self.prev = snap

    def close(self) -> None:
        self.progress.stop()


def display_for(out: IO[str]) -> Display:
    console = Console(file=out)
    return Bar(console) if console.is_terminal else Lines(out)
