"""Sample posts served at /demo/posts/{n}, so extract_post works offline, and the
HTML extraction it uses."""

from __future__ import annotations

import dataclasses
import html
from html.parser import HTMLParser
from urllib.parse import urljoin

POSTS = [
    ("Why your progress bar froze on the second run",
     ["A job runner that keys progress by page instead of by job shows the first run's "
      "numbers to the second.", "Give every job its own id and its own event sequence."]),
    ("Deduplicating work with a partial unique index",
     ["Check-then-insert races; a unique index over active rows does not.",
      "Two submits of the same key get one job."]),
    ("Resuming a WebSocket from a sequence number",
     ["Send the last seq you applied; the server replays what you missed.",
      "Drop anything at or below the seq you have."]),
    ("Leases, heartbeats and the worker that never came back",
     ["A lease turns a dead worker into a timeout instead of a stuck job."]),
    ("Cleaning up finished jobs", ["Retention is a policy, not an afterthought."]),
]


def render_post(n: int) -> str:
    title, paragraphs = POSTS[n]
    body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    links = "".join(f'<li><a href="/demo/posts/{i}">{html.escape(t)}</a></li>'
                    for i, (t, _) in enumerate(POSTS) if i != n)
    return (f"<!doctype html><html><head><title>{html.escape(title)}</title></head>"
            f"<body><article><h1>{html.escape(title)}</h1>{body}</article>"
            f"<nav><ul>{links}</ul></nav></body></html>")


class _Extractor(HTMLParser):
    SKIP = {"script", "style", "noscript", "template"}

    def __init__(self, base: str) -> None:
        super().__init__(convert_charrefs=True)
        self.base = base
        self.title = ""
        self.text: list[str] = []
        self.links: list[str] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._stack.append(tag)
        href = dict(attrs).get("href")
        if tag == "a" and href and not href.startswith(("javascript:", "#")):
            self.links.append(urljoin(self.base, href))

    def handle_endtag(self, tag: str) -> None:
        if tag in self._stack:
            while self._stack.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if any(t in self.SKIP for t in self._stack):
            return
        if "title" in self._stack:
            self.title += data
        elif data.strip() and ("p" in self._stack or "h1" in self._stack):
            self.text.append(" ".join(data.split()))


@dataclasses.dataclass(frozen=True)
class Extracted:
    url: str
    title: str
    text: str
    links: list[str]

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def extract(page: str, url: str) -> Extracted:
    parser = _Extractor(url)
    parser.feed(page)
    return Extracted(url, parser.title.strip(), "\n".join(parser.text),
                     list(dict.fromkeys(parser.links)))
