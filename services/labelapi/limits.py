"""A request body limit that holds before any route, and so authentication, reads the body.

Plain ASGI, outside FastAPI's routing: a declared ``Content-Length`` over the limit is
answered 413 without reading a byte; a body without one (chunked) is read here up
to the limit and answered 413 the moment it passes it. A body within the limit is
handed on unchanged, so the app reads exactly what the client sent. At most
``max_bytes`` of one request are ever held.
"""

from __future__ import annotations

import json

SETTING = "BMCELL_MAX_BODY_BYTES"


class BodyLimit:
    def __init__(self, app, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == "bad":
            await _refuse(send, 400, "Content-Length is not a number", "content-length")
            return
        if declared is not None and declared > self.max_bytes:
            await _refuse(send, 413, self._too_large(f"{declared} bytes declared"), "body")
            return
        # Read the body here, bounded, so nothing downstream sees more than the limit.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _refuse(
                    send, 413, self._too_large(f"more than {self.max_bytes} bytes"), "body"
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only a disconnect can come

        await self.app(scope, replay, send)

    def _too_large(self, what: str) -> str:
        return f"request body too large: {what}, the limit is {self.max_bytes} bytes ({SETTING})"


def _content_length(scope) -> int | str | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                n = int(value)
            except ValueError:
                return "bad"
            return n if n >= 0 else "bad"
    return None


async def _refuse(send, status: int, message: str, field: str) -> None:
    body = json.dumps({"error": message, "field": field}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
