"""gRPC streaming client of the `pipeline` model: send a request (JSON + optional audio), get events back."""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


class ClientError(Exception):
    """The server refused or failed a request; `status` is the gRPC status name (e.g. INVALID_ARGUMENT)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


# gRPC's reconnect backoff grows to 120 s by default, so a client that saw the server restart (about 45 s on a
# small CPU) kept failing for a minute after the server was back. Every channel of ours uses these.
RECONNECT_BACKOFF = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                     ("grpc.max_reconnect_backoff_ms", 2000)]


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's own channel options plus RECONNECT_BACKOFF."""
    keepalive = grpcclient.KeepAliveOptions()
    size = 2**31 - 1  # tritonclient's own message size limit
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        *RECONNECT_BACKOFF,
    ]


def error_from(exc: InferenceServerException) -> ClientError:
    """Status from gRPC, or, on streams (which carry only a message), from the server's "[STATUS] " prefix."""
    message = exc.message() or ""
    status = str(exc.status() or "").split(".")[-1]
    while message.startswith("[") and "] " in message:  # prefixes may nest when a stage's error is relayed
        head, rest = message[1:].split("] ", 1)
        if not (head.replace("_", "").isalpha() and head.isupper()):
            break
        status = status if status not in ("", "UNKNOWN") else head
        message = rest
    return ClientError(status or "UNKNOWN", message)


def request_inputs(request: dict[str, Any], audio: bytes | list[bytes] | None, voice: bytes | None = None) -> list:
    """The `pipeline` model's inputs: the JSON request, the audio clips and the optional voice reference wav.
    `audio`: one clip, or every clip of a conversation (message audio items refer to them by index). Also used by
    the HTTP gateway (tritonclient's aio client takes the same InferInput objects)."""
    req = grpcclient.InferInput("request", [1], "BYTES")
    req.set_data_from_numpy(np.array([json.dumps(request, ensure_ascii=False).encode()], dtype=np.object_))
    inputs = [req]
    clips = [audio] if isinstance(audio, (bytes, bytearray)) else list(audio or [])
    for name, data in (("audio", clips or None), ("voice", [voice] if voice is not None else None)):
        if data is not None:
            t = grpcclient.InferInput(name, [len(data)], "BYTES")
            t.set_data_from_numpy(np.array(data, dtype=np.object_))
            inputs.append(t)
    return inputs


class StepAudio2Client:
    def __init__(self, url: str = "127.0.0.1:8001", model: str = "pipeline") -> None:
        self.url = url
        self.model = model
        self._grpc = grpcclient.InferenceServerClient(url=url, channel_args=channel_args())

    def close(self) -> None:
        self._grpc.close()

    def __enter__(self) -> StepAudio2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_ready(self) -> bool:
        return self._grpc.is_server_ready() and self._grpc.is_model_ready(self.model)

    def stream(
        self, request: dict[str, Any], audio: bytes | list[bytes] | None = None, timeout: float = 300.0,
        voice: bytes | None = None,
    ) -> Iterator[dict]:
        """Yield the server's events as they arrive; the last one has type "result". `voice`: a reference wav
        for speech replies (default: the server's voice). Audio events carry their float32 24 kHz PCM in "pcm".

        Leaving the iterator early cancels the request on the server (its LLM slot is freed at the next step).
        """
        events: queue.Queue = queue.Queue()

        def callback(result, error):
            events.put((result, error))

        finished = False
        try:
            # Both raise when the connection broke (e.g. the server restarted): a ClientError like any other.
            self._grpc.start_stream(callback=callback)
            self._grpc.async_stream_infer(
                self.model, request_inputs(request, audio, voice), request_id=uuid.uuid4().hex,
                enable_empty_final_response=True,
            )
        except InferenceServerException as exc:
            self._grpc.stop_stream(cancel_requests=True)
            # "The stream is no longer in valid state": the cause (e.g. UNAVAILABLE) went to the callback.
            try:
                _, cause = events.get_nowait()
            except queue.Empty:
                cause = None
            raise error_from(cause if isinstance(cause, InferenceServerException) else exc) from exc
        try:
            while True:
                try:
                    result, error = events.get(timeout=timeout)
                except queue.Empty as exc:
                    raise ClientError("DEADLINE_EXCEEDED", f"no event for {timeout} s") from exc
                if error is not None:
                    finished = True
                    raise error_from(error)
                response = result.get_response()
                out = result.as_numpy("event")
                if out is not None and out.size:
                    event = json.loads(out.reshape(-1)[0])
                    if event.get("type") == "audio":
                        event["pcm"] = result.as_numpy("audio_chunk")
                    yield event
                if response.parameters["triton_final_response"].bool_param:
                    finished = True
                    return
        finally:
            self._grpc.stop_stream(cancel_requests=not finished)

    def generate_unary(
        self, request: dict[str, Any], audio: bytes | list[bytes] | None = None, model: str = "text_generate",
        timeout: float = 300.0,
    ) -> dict:
        """One request, one response, through the request/response ensemble (no stream). A speech reply's
        audio (offline synthesis, float32 at 24 kHz) is in "pcm"."""
        inputs = request_inputs(request, audio or b"")
        try:
            result = self._grpc.infer(model, inputs, client_timeout=timeout)
        except InferenceServerException as exc:
            raise error_from(exc) from exc
        out = json.loads(result.as_numpy("result").reshape(-1)[0])
        pcm = result.as_numpy("audio_out")
        if pcm is not None and pcm.size:
            out["pcm"] = pcm
        return out

    def generate(
        self, request: dict[str, Any], audio: bytes | list[bytes] | None = None, timeout: float = 300.0,
        voice: bytes | None = None,
    ) -> dict:
        """The final result object (same fields as `stepaudio2 generate --json`); a spoken reply's streamed audio
        is joined into "pcm" (float32, 24 kHz)."""
        result, chunks = None, []
        for event in self.stream(request, audio, timeout, voice):
            if event.get("type") == "audio":
                chunks.append(event["pcm"])
            if event.get("type") == "result":
                result = event
        if result is None:
            raise ClientError("INTERNAL", "stream ended without a result")
        if chunks:
            result["pcm"] = np.concatenate(chunks)
        return result
