"""ASGI plumbing for long replies: a deadline on an event stream, an SSE response that cancels its producer when
the client disconnects, and the same disconnect watch for non-streamed replies.

Cancelling the producer closes the pipeline's gRPC stream (TritonPipeline.events' finally), and Triton then
frees the LLM slot and the token2wav stream of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from stepaudio2_gateway.errors import APIError

T = TypeVar("T")


def timeout_error(timeout_s: float) -> APIError:
    return APIError(504, f"the reply took longer than this server's limit of {timeout_s:.0f} s; it was cancelled",
                    code="timeout")


async def with_deadline(agen: AsyncIterator[T], timeout_s: float) -> AsyncIterator[T]:
    """Items of `agen` until `timeout_s` has passed since the first call; then 504 (and `agen` is closed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with contextlib.aclosing(agen):
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise timeout_error(timeout_s)
            try:
                item = await asyncio.wait_for(agen.__anext__(), remaining)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError as exc:
                raise timeout_error(timeout_s) from exc
            yield item


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class SSEResponse:
    """text/event-stream from an async iterator of bytes; a disconnect cancels (and closes) the iterator."""

    def __init__(self, body: AsyncIterator[bytes], on_disconnect: Callable[[], None] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.body = body
        self.on_disconnect = on_disconnect
        self.on_close = on_close  # runs however the response ends (even before the body was started)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

        async def pump() -> None:
            async with contextlib.aclosing(self.body) as body:
                async for chunk in body:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await race(pump(), receive, self.on_disconnect)
        finally:
            if self.on_close is not None:
                self.on_close()


async def race(work: Awaitable[T], receive, on_disconnect: Callable[[], None] | None = None) -> T | None:
    """Run `work`; if the client disconnects first, cancel it and return None."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            if on_disconnect is not None:
                on_disconnect()
        watch.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watch
    try:
        return await task
    except asyncio.CancelledError:
        if watch.done() and not watch.cancelled():
            return None
        raise
    except OSError:  # the client went away while we were writing
        return None
