"""The body-size middleware on its own: what it trusts and what it counts."""

from __future__ import annotations

from starlette.types import Message, Receive, Scope, Send

from jobwire.api.limits import BodyLimit


async def run(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, int]:
    """Send a request through BodyLimit(max 100 bytes) to an app that reads the whole
    body; (response status, bytes the app read)."""
    read = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal read
        while True:
            message = await receive()
            read += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await BodyLimit(app, 100)({"type": "http", "headers": headers}, receive, send)
    return sent[0]["status"], read


async def test_declared_lengths_are_trusted_only_without_transfer_encoding() -> None:
    assert await run([(b"content-length", b"50")], [b"x" * 50]) == (200, 50)
    assert (await run([(b"content-length", b"500")], [b"x" * 500]))[0] == 413
    # Both headers: the body is chunked whatever Content-Length says, so it is counted.
    both = [(b"content-length", b"10"), (b"transfer-encoding", b"chunked")]
    assert (await run(both, [b"x" * 60, b"x" * 60]))[0] == 413
    assert (await run([], [b"x" * 60, b"x" * 60]))[0] == 413
    assert await run([], [b"x" * 60, b"x" * 30]) == (200, 90)
