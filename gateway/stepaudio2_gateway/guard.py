"""Outermost ASGI layer: API keys, the request body limit, and per-request metrics (status and time to the
last byte, for streamed replies too)."""

from __future__ import annotations

import hmac
import json
import time

from stepaudio2_gateway.errors import APIError

OPEN_PATHS = ("/health", "/metrics", "/")  # the page itself is public; its API calls carry the key


class Guard:
    def __init__(self, app, gateway) -> None:
        self.app = app
        self.gateway = gateway
        self.cfg = gateway.cfg

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = next((e for e in _ENDPOINTS if path == e or (e != "/" and path.startswith(e + "/"))), "other")
        started = time.perf_counter()
        status = {"code": 500, "counted": False}

        def count(code: int) -> None:
            if not status["counted"]:
                status["counted"] = True
                self.gateway.metrics.done(endpoint, code, time.perf_counter() - started)

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                count(status["code"])

        headers = dict(scope.get("headers") or [])
        error = self._auth(path, headers) or self._declared_size(headers)
        if error is not None:
            await self._drain(receive)
            await _respond(error, send_counted)
            return
        try:
            await self.app(scope, self._limited(receive), send_counted)
        finally:
            count(499)  # the client left before the last byte (nginx's "client closed request")

    def _auth(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        if not self.cfg.api_keys or path in OPEN_PATHS:
            return None
        auth = headers.get(b"authorization", b"").decode("latin-1")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not key:
            return APIError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key")
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.cfg.api_keys):
            return APIError(401, "incorrect API key provided", code="invalid_api_key")
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds this server's limit of {self.cfg.max_body_bytes} bytes",
                        code="request_too_large")

    def _declared_size(self, headers: dict[bytes, bytes]) -> APIError | None:
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.cfg.max_body_bytes:
            return self._too_large()
        return None

    async def _drain(self, receive) -> None:
        """Read (and drop) what the client is still sending, up to a bound, so that it reads our error instead of
        a broken pipe; past the bound the connection is closed after the response."""
        budget = 4 * self.cfg.max_body_bytes
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _limited(self, receive):
        """A receive that counts body bytes (chunked uploads have no Content-Length) and stops past the limit."""
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.cfg.max_body_bytes:
                    raise self._too_large()
            return message

        return wrapped


_ENDPOINTS = ("/v1/chat/completions", "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/audio/voices",
              "/v1/models", "/health", "/metrics", "/")


async def _respond(error: APIError, send) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
