"""Request body limits, enforced before any route reads (or buffers) a body.

``BodyLimit`` is a pure ASGI middleware: a declared ``Content-Length`` over the limit is
refused with 413 at once; a body streamed without one (chunked) is counted as it arrives,
and the first chunk past the limit answers 413 and ends the request (the route sees the
client as gone). Before answering, up to :data:`DRAIN_CAP` more bytes are read and
discarded (never kept), so an ordinary client that sends its whole body before reading
gets its 413 instead of a reset connection; a bigger body is cut off there.

Multipart bodies (adapter and hypernetwork uploads, which
:func:`tessera.server.uploads.read_form` streams and counts itself) get the upload limit;
everything else (JSON) gets the much smaller request limit, so a 300 MiB JSON body is
never parsed.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.server.http_errors import error_body

DRAIN_CAP = 8 * 1024 * 1024  # bytes of a refused body read and thrown away before the 413


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_request_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or b"").lower()
        upload = content_type.startswith(b"multipart/form-data")
        limit = self.max_upload_bytes if upload else self.max_request_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _drain(receive)
            await _refuse(send, limit)
            return
        if upload:  # read_form counts the streamed parts itself, with the same limit
            await self.app(scope, receive, send)
            return
        seen = 0
        refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    if message.get("more_body", False):
                        await _drain(receive)
                    await _refuse(send, limit)
                    return {"type": "http.disconnect"}  # the route stops reading
            return message

        async def guarded(message: Message) -> None:
            if not refused:  # the 413 already went out: drop the route's late answer
                await send(message)

        await self.app(scope, counted, guarded)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


async def _drain(receive: Receive) -> None:
    """Read and discard the rest of a refused body, :data:`DRAIN_CAP` bytes at most."""
    drained = 0
    while drained <= DRAIN_CAP:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _refuse(send: Send, limit: int) -> None:
    body = json.dumps(error_body("payload_too_large",
                                 f"request body exceeds the limit of {limit} bytes",
                                 "body")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
