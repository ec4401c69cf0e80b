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


def _error(exc: InferenceServerException) -> ClientError:
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


class StepAudio2Client:
    def __init__(self, url: str = "127.0.0.1:8001", model: str = "pipeline") -> None:
        self.url = url
        self.model = model
        self._grpc = grpcclient.InferenceServerClient(url=url)

    def close(self) -> None:
        self._grpc.close()

    def __enter__(self) -> StepAudio2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_ready(self) -> bool:
        return self._grpc.is_server_ready() and self._grpc.is_model_ready(self.model)

    @staticmethod
    def _inputs(request: dict[str, Any], audio: bytes | None) -> list:
        req = grpcclient.InferInput("request", [1], "BYTES")
        req.set_data_from_numpy(np.array([json.dumps(request, ensure_ascii=False).encode()], dtype=np.object_))
        inputs = [req]
        if audio is not None:
            a = grpcclient.InferInput("audio", [1], "BYTES")
            a.set_data_from_numpy(np.array([audio], dtype=np.object_))
            inputs.append(a)
        return inputs

    def stream(self, request: dict[str, Any], audio: bytes | None = None, timeout: float = 300.0) -> Iterator[dict]:
        """Yield the server's events as they arrive; the last one has type "result".

        Leaving the iterator early cancels the request on the server (its LLM slot is freed at the next step).
        """
        events: queue.Queue = queue.Queue()

        def callback(result, error):
            events.put((result, error))

        self._grpc.start_stream(callback=callback)
        finished = False
        try:
            self._grpc.async_stream_infer(
                self.model, self._inputs(request, audio), request_id=uuid.uuid4().hex,
                enable_empty_final_response=True,
            )
            while True:
                try:
                    result, error = events.get(timeout=timeout)
                except queue.Empty as exc:
                    raise ClientError("DEADLINE_EXCEEDED", f"no event for {timeout} s") from exc
                if error is not None:
                    finished = True
                    raise _error(error)
                response = result.get_response()
                out = result.as_numpy("event")
                if out is not None and out.size:
                    yield json.loads(out.reshape(-1)[0])
                if response.parameters["triton_final_response"].bool_param:
                    finished = True
                    return
        finally:
            self._grpc.stop_stream(cancel_requests=not finished)

    def generate_unary(
        self, request: dict[str, Any], audio: bytes | None = None, model: str = "text_generate", timeout: float = 300.0
    ) -> dict:
        """One request, one response, through the request/response ensemble (no stream)."""
        inputs = self._inputs(request, audio or b"")
        try:
            result = self._grpc.infer(model, inputs, client_timeout=timeout)
        except InferenceServerException as exc:
            raise _error(exc) from exc
        return json.loads(result.as_numpy("result").reshape(-1)[0])

    def generate(self, request: dict[str, Any], audio: bytes | None = None, timeout: float = 300.0) -> dict:
        """The final result object (same fields as `stepaudio2 generate --json`)."""
        result = None
        for event in self.stream(request, audio, timeout):
            if event.get("type") == "result":
                result = event
        if result is None:
            raise ClientError("INTERNAL", "stream ended without a result")
        return result
