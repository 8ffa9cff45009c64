"""The ASGI guard in front of every route: API key (401) and request body size (413).

Pure ASGI rather than `BaseHTTPMiddleware`, so streaming responses and disconnect detection pass
through untouched. The key is compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fmforge.serve.errors import error_body


async def _send_error(send: Any, status: int, body: dict, headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class GuardMiddleware:
    """401 without the API key (except public paths); 413 for bodies over `max_body_bytes`."""

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        public_paths: tuple[str, ...],
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.public_paths = public_paths
        self.max_body_bytes = max_body_bytes

    def _public(self, path: str) -> bool:
        return any(
            path == p or (p.endswith("/") and p != "/" and path.startswith(p))
            for p in self.public_paths
        )

    def _authorised(self, scope: dict) -> bool:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key and not self._public(scope["path"]) and not self._authorised(scope):
            body = error_body(
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
            await _send_error(send, 401, body, {"WWW-Authenticate": "Bearer"})
            return
        too_large = error_body(
            f"The request body exceeds the limit of {self.max_body_bytes} bytes.",
            code="request_too_large",
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_body_bytes:
                    await _send_error(send, 413, too_large, {"Connection": "close"})
                    return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # Read the whole body (bounded), then replay it; later receives go to the client.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _send_error(send, 413, too_large, {"Connection": "close"})
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
