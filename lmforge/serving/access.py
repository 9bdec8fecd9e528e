"""Who may send what: the API key, one client's share of the queue, and the size of a body.

Each is checked before a request costs the model anything: a wrong key, a client over its share, or a
body too large to read is answered at once, so that one careless or hostile client cannot stall the
others.
"""

import ipaddress
import secrets
from collections.abc import Callable

from fastapi import Request

from lmforge.serving.wire import RequestError

LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost): any other
    address makes the server reachable from other machines, which ``lmforge serve`` allows only with an
    API key."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiKey:
    """A FastAPI dependency: with a key set, a request must send ``Authorization: Bearer <key>`` (what
    the OpenAI clients send as ``api_key``); compared in constant time."""

    def __init__(self, key: str | None):
        self.key = key

    def __call__(self, request: Request) -> None:
        if self.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.key.encode()):
            raise RequestError("a valid API key is required: send 'Authorization: Bearer <key>'", status=401, code="invalid_api_key")


class ClientLimit:
    """Requests in progress (queued or generating) per client address, at most ``limit`` each (429
    beyond it): one client cannot fill the queue that every other client waits in.  Used from the event
    loop only, so it needs no lock."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_progress: dict[str, int] = {}

    def admit(self, client: str) -> Callable[[], None]:
        """Count a request of ``client``; returns its release, which may be called more than once."""
        if self.in_progress.get(client, 0) >= self.limit:
            raise RequestError(f"too many requests in progress from {client} (serve.max_requests_per_client: "
                               f"{self.limit}); retry when one has finished", status=429,
                               code="rate_limit_exceeded", kind="rate_limit_error")
        self.in_progress[client] = self.in_progress.get(client, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_progress[client] -= 1
                if not self.in_progress[client]:
                    del self.in_progress[client]

        return release


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with a 413 and OpenAI's error body,
    from its Content-Length before a byte of it is read, or (a chunked body) as soon as it passes the
    limit.  Starlette's own limiter (FastAPI's ``max_body_size``) answers in plain text, which OpenAI
    clients cannot parse."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    @staticmethod
    def error(limit: int) -> RequestError:
        return RequestError(f"the request body is larger than this server accepts ({limit:,} bytes, serve.max_request_bytes)",
                            status=413, code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        from fastapi.responses import JSONResponse
        from starlette.datastructures import Headers
        from starlette.exceptions import HTTPException

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse(self.error(self.limit).body(), 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413)  # FastAPI passes an HTTPException from the body on to the app's handler
            return message

        await self.app(scope, limited, send)
