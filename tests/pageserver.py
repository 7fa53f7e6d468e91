"""A loopback HTTP server on a thread of its own, for tests whose side of the test is
synchronous (Playwright, a subprocess): every GET gets what `answer()` returns."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable
from typing import Any

# A GET's answer: the body and its content type.
Answer = Callable[[], tuple[bytes, str]]


class PageServer:
    """Serves `answer` on 127.0.0.1 (a free port) until `close`; `base` is its URL."""

    def __init__(self, answer: Answer) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, content_type = answer()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
