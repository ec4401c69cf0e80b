"""Triton's `pipeline` over gRPC streaming, asynchronously (tritonclient's aio client): one stream per request,
cancelled (which frees the LLM slot and the token2wav stream on the server) when the caller stops iterating
before the result: timeout, client disconnect, a stop string, or an error. A stream whose result arrived closes
normally.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from stepaudio2_client.client import RECONNECT_BACKOFF, error_from, request_inputs
from stepaudio2_gateway.errors import GRPC_TO_HTTP, APIError

COMPLETE_CLOSE_S = 5.0  # how long a stream whose result arrived may take to close before it is cancelled


class TritonDown(APIError):
    def __init__(self, detail: str) -> None:
        super().__init__(503, f"the inference server is not reachable: {detail}", code="server_unavailable",
                         headers={"Retry-After": "5"})


def api_error(exc: InferenceServerException) -> APIError:
    """A Triton error as the HTTP error the client sees (the server names the field in its message)."""
    err = error_from(exc)
    status = GRPC_TO_HTTP.get(err.status, 500)
    if status == 429:
        return APIError(429, f"the inference server is full, try again shortly ({err.message})",
                        code="server_full", headers={"Retry-After": "1"})
    code = "invalid_value" if status == 400 else err.status.lower()
    return APIError(status, err.message, code=code)


class TritonPipeline:
    def __init__(self, url: str, model: str = "pipeline") -> None:
        self.url = url
        self.model = model
        self._client: grpcaio.InferenceServerClient | None = None

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        if self._client is None:  # made lazily: the aio client binds to the running event loop
            # Round robin over every address the name resolves to: behind a headless Service (dns:///name:port)
            # new streams spread over the Triton pods instead of pinning to the first one.
            args = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                    ("grpc.keepalive_time_ms", 30_000), ("grpc.lb_policy_name", "round_robin"), *RECONNECT_BACKOFF]
            self._client = grpcaio.InferenceServerClient(self.url, channel_args=args)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready() and await self.client.is_model_ready(self.model))
        except (InferenceServerException, grpc.RpcError, OSError):
            return False

    async def events(
        self, request: dict[str, Any], audio: bytes | list[bytes] | None, voice: bytes | None = None
    ) -> AsyncIterator[dict]:
        """The pipeline's events (audio events carry float32 24 kHz PCM in "pcm"); the last is "result"."""
        done = asyncio.Event()
        inputs = request_inputs(request, audio, voice)

        async def requests():
            yield {"model_name": self.model, "inputs": inputs, "request_id": uuid.uuid4().hex}
            await done.wait()  # keep the request side open until the reply is complete or abandoned

        stream = self.client.stream_infer(requests())
        complete = False
        try:
            async for result, error in stream:
                if error is not None:
                    raise api_error(error)
                out = result.as_numpy("event")
                if out is None or not out.size:
                    continue
                event = json.loads(out.reshape(-1)[0])
                if event.get("type") == "audio":
                    event["pcm"] = np.asarray(result.as_numpy("audio_chunk"), dtype=np.float32).reshape(-1)
                if event.get("type") == "result":  # the last event: the request side closes now
                    complete = True
                    done.set()
                yield event
                if complete:
                    return
            raise APIError(502, "the inference server closed the stream without a result", code="bad_gateway")
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, None):
                raise TritonDown(str(exc.details() if hasattr(exc, "details") else exc)) from exc
            raise APIError(502, f"gRPC error from the inference server: {code}", code="bad_gateway") from exc
        finally:
            done.set()
            await _end(stream, cancel=not complete)


    async def register_voice(self, wav: bytes) -> str:
        """Check a reference wav with the `voice_prompt` model; returns its server-side voice id."""
        t = grpcaio.InferInput("audio", [1], "BYTES")
        t.set_data_from_numpy(np.array([wav], dtype=np.object_))
        try:
            result = await self.client.infer("voice_prompt", [t], client_timeout=120)
        except InferenceServerException as exc:
            if "failed to connect" in str(exc).lower() or (exc.status() or "").endswith("UNAVAILABLE"):
                raise TritonDown(str(exc)) from exc
            raise api_error(exc) from exc
        return result.as_numpy("voice_id").reshape(-1)[0].decode()


async def _end(stream: Any, cancel: bool) -> None:
    """Cancel an abandoned stream (frees its work on the server); let a complete one finish by itself. Triton
    2.51's gRPC stream handler can crash when a cancel meets the end of a request it has just answered (fixed in
    later releases: triton-inference-server/server#7840, #8078), so a complete reply is never cancelled."""
    if not cancel:
        try:
            async with asyncio.timeout(COMPLETE_CLOSE_S):
                async for _ in stream:  # nothing more comes: this waits for the server to close the stream
                    pass
            return
        except (TimeoutError, grpc.RpcError, InferenceServerException):
            pass  # a server that does not close it in time: cancel after all
    stream.cancel()
