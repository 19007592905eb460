"""Bounds a request body that arrives without ``Content-Length`` (chunked transfer encoding).

``app.BodyLimit`` refuses a body whose declared length is over the limit before it is read; a
chunked body declares none, so without this the route would read it into memory whatever its
size. This middleware counts the bytes as the app receives them and stops at the limit with a
``413`` :class:`~deployments.api.errors.ErrorBody`.

FastAPI's own ``max_body_size`` is not used: it sits outside every app middleware and replaces
any ``413`` answered for a declared length with a plain-text one, which breaks the error format.
"""

from __future__ import annotations

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """The body grew past the limit while it was read.

    A FastAPI ``HTTPException``: FastAPI re-raises those from the body read unchanged (any other
    error there becomes a generic 400), so the app's handler answers the ``413``.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"body exceeds {max_bytes:,} bytes")


class StreamedBodyLimit:
    """Refuses a request once more than ``max_bytes`` of its body have been received.

    Args:
        app: The application it wraps.
        max_bytes: The largest body accepted.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with a receive channel that counts the body."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)
