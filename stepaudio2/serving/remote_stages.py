"""Stages by address: the pipeline's stage calls (audio_encoder, llm, voice_prompt, token2wav) over gRPC to
another tritonserver, with the same methods and contract as `BlsStages`, and `RoutedStages`, which picks BLS or
gRPC per stage from the pipeline's config.pbtxt parameters (`remote_<stage>` = HOST:PORT, empty = BLS).

Contract kept across the hop: the llm streams token ids (one response per token) and ends with finish_reason; a
client that leaves cancels the remote sequence (explicit `cancel` by sequence_id, then the gRPC stream); a
remote INVALID_ARGUMENT stays INVALID_ARGUMENT; a remote that is down or silent for `timeout_s` is UNAVAILABLE
(never a hang). The tritonclient threads never touch pb_utils, so the one-thread-per-stub rule still holds.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.errors import InvalidInputError, UnavailableError
from stepaudio2.serving.bls import PROMPT_OUTPUTS, Cancelled
from stepaudio2.serving.triton_utils import strip_status

STAGES = ("audio_encoder", "llm", "voice_prompt", "token2wav")


def _tensor(name: str, array: np.ndarray, batched: bool = False):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    array = np.asarray(array)
    if batched:  # token2wav has max_batch_size > 0: a leading batch dimension of 1
        array = array[None]
    dtype = "BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype)
    t = grpcclient.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def _push_inputs(codes: list[int], last: bool) -> list:
    return [_tensor("codes", np.asarray(codes, np.int64), True), _tensor("last", np.array([last], bool), True)]


def _text(name: str, value: str | bytes, batched: bool = False):
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _tensor(name, np.array([data], dtype=np.object_), batched)


class GrpcStages:
    """Every stage call of `BlsStages`, sent to the tritonserver at `url` (HOST:PORT)."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        self.timeout_s = timeout_s
        self._grpc = grpcclient
        self._unary = grpcclient.InferenceServerClient(url=url)
        self._reply = threading.local()  # per serving thread: a front may serve several replies side by side
        self._idle_clients: list[Any] = []  # stream clients of finished replies: their channels stay connected
        self._idle_lock = threading.Lock()

    @property
    def at_response_end(self) -> bool:
        """True while the token just yielded by generate() (on this thread) is the last of its llm response."""
        return getattr(self._reply, "at_response_end", True)

    @at_response_end.setter
    def at_response_end(self, value: bool) -> None:
        self._reply.at_response_end = value

    def close(self) -> None:
        self._unary.close()
        with self._idle_lock:
            idle, self._idle_clients = self._idle_clients, []
        for client in idle:
            client.close()

    def _stream_client(self) -> Any:
        """A client for one reply's stream (tritonclient runs one stream per client). A new one costs a channel, a
        TCP connection and its HTTP/2 handshake, so a cleanly finished reply's client is kept for the next."""
        with self._idle_lock:
            if self._idle_clients:
                return self._idle_clients.pop()
        return self._grpc.InferenceServerClient(url=self.url)

    def _keep_or_close(self, client: Any, clean: bool) -> None:
        if not clean:  # its stream broke or was cancelled: start the next reply on a fresh channel
            client.close()
            return
        with self._idle_lock:  # at most as many as replies ran at once
            self._idle_clients.append(client)

    def _error(self, exc: Any, stage: str) -> Exception:
        """The remote's error with its status kept (stream errors carry it as a "[STATUS] " prefix)."""
        grpc_status = str(getattr(exc, "status", lambda: "")() or "").split(".")[-1]
        status, message = strip_status(exc.message() or str(exc))
        status = status or grpc_status
        if status == "INVALID_ARGUMENT":
            return InvalidInputError(message)
        if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", ""):
            return UnavailableError(f"{stage} at {self.url} is unavailable: {message}")
        return RuntimeError(f"{stage} at {self.url}: [{status}] {message}")

    def _infer(self, model: str, inputs: list, outputs: list[str]) -> Any:
        from tritonclient.utils import InferenceServerException

        requested = [self._grpc.InferRequestedOutput(name) for name in outputs]
        try:
            return self._unary.infer(model, inputs, outputs=requested or None, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise self._error(exc, model) from None

    # ---- audio encoder + llm ------------------------------------------------------------------------------------

    def encode(self, mels: list[np.ndarray], lengths: list[int]) -> list[np.ndarray]:
        out = []
        t_max = max((m.shape[1] for m in mels), default=0)  # one padded batch per request, as BlsStages.encode
        for mel, n in zip(mels, lengths, strict=True):
            mel = np.pad(mel, ((0, 0), (0, t_max - mel.shape[1])))
            res = self._infer("audio_encoder", [_tensor("mel", mel[None].astype(np.float32)),
                                                _tensor("mel_length", np.array([[n]], np.int64))], ["audio_embeds"])
            out.append(res.as_numpy("audio_embeds")[0].copy())
        return out

    def generator(self, is_cancelled: Callable[[], bool]):
        def generate(ids, chunks, spans, sampling: SamplingParams) -> Iterator[int | str]:
            return self.generate(ids, chunks, spans, sampling, is_cancelled)

        return generate

    def generate(self, ids, chunks, spans, sampling: SamplingParams, is_cancelled) -> Iterator[int | str]:
        inputs = [_tensor("input_ids", np.asarray(ids, np.int64))]
        if chunks:
            inputs += [_tensor("audio_embeds", np.concatenate(chunks, axis=0).astype(np.float32)),
                       _tensor("audio_spans", np.asarray(spans, np.int64).reshape(-1, 2))]
        sequence_id = uuid.uuid4().hex
        inputs += [_text("sampling", json.dumps(sampling.to_dict())), _text("sequence_id", sequence_id)]
        responses: queue.Queue = queue.Queue()
        client = self._stream_client()  # one bidirectional stream per reply
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        finished = clean = False
        try:
            self._send(client, responses, inputs, sequence_id)
            while not finished:
                arrived = self._arrived(responses)
                if is_cancelled():  # asked once per batch: on a split front it is a hop to the server thread
                    self._cancel_remote(client, responses, sequence_id)
                    finished = True
                    raise Cancelled()
                for n, (result, error) in enumerate(arrived):
                    if error is not None:
                        finished = True
                        raise self._error(error, "llm")
                    last_here = n == len(arrived) - 1
                    tokens = result.as_numpy("token_ids")
                    ids = tokens.reshape(-1).tolist() if tokens is not None else []
                    for k, tok in enumerate(ids):
                        # lets the caller flush merged events where nothing more is waiting
                        self.at_response_end = last_here and k == len(ids) - 1
                        yield int(tok)
                    self.at_response_end = last_here
                    reason = result.as_numpy("finish_reason")
                    if reason is not None and reason.size:
                        yield bytes(reason.reshape(-1)[0]).decode()
                    finished = result.get_response().parameters["triton_final_response"].bool_param
                    if finished:
                        clean = True
                        break
        finally:
            client.stop_stream(cancel_requests=not finished)  # a generator closed early cancels the stream
            self._keep_or_close(client, clean)

    def _send(self, client: Any, responses: queue.Queue, inputs: list, request_id: str) -> None:
        """Queue one request on the stream; a stream that already broke raises here instead of in the callback."""
        from tritonclient.utils import InferenceServerException

        try:
            client.async_stream_infer("llm", inputs, request_id=request_id, enable_empty_final_response=True)
        except InferenceServerException as exc:
            try:  # the callback usually holds the real cause (e.g. the remote is down)
                _, error = responses.get_nowait()
            except queue.Empty:
                error = None
            raise self._error(error or exc, "llm") from None

    def _arrived(self, responses: queue.Queue) -> list[tuple[Any, Any]]:
        """The next response and every one already queued behind it. A front that fell behind the llm (its
        per-response hops cost more than a decode step) then pays them once for all of these, not per token."""
        arrived = [self._next(responses)]
        while True:
            try:
                arrived.append(responses.get_nowait())
            except queue.Empty:
                return arrived

    def _next(self, responses: queue.Queue) -> tuple[Any, Any]:
        try:
            return responses.get(timeout=self.timeout_s)
        except queue.Empty:
            raise UnavailableError(f"llm at {self.url} sent nothing for {self.timeout_s:g} s") from None

    def _cancel_remote(self, client: Any, responses: queue.Queue, sequence_id: str) -> None:
        """Free the remote KV slot at its next step, then drain until the llm ends the sequence."""
        try:
            self._send(client, responses, [_text("cancel", sequence_id)], f"cancel-{sequence_id}")
        except Exception:
            return  # the stream broke: stop_stream cancels what is left, and the remote frees the slot
        while True:
            try:
                result, error = self._next(responses)
            except UnavailableError:
                return  # stop_stream cancels whatever is left
            if error is not None:
                return
            resp = result.get_response()
            if resp.id == sequence_id and resp.parameters["triton_final_response"].bool_param:
                return

    def cancel(self, sequence_id: str) -> None:
        responses: queue.Queue = queue.Queue()
        client = self._grpc.InferenceServerClient(url=self.url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        try:
            self._send(client, responses, [_text("cancel", sequence_id)], f"cancel-{sequence_id}")
            self._next(responses)
        finally:
            client.stop_stream()
            client.close()

    # ---- speech stages ------------------------------------------------------------------------------------------

    def voice(self, audio: bytes | None, voice_id: str | None) -> dict[str, np.ndarray]:
        inputs = []
        if audio is not None:
            inputs.append(_text("audio", audio))
        elif voice_id:
            inputs.append(_text("voice_id", voice_id))
        res = self._infer("voice_prompt", inputs, list(PROMPT_OUTPUTS))
        return {name: res.as_numpy(name).copy() for name in PROMPT_OUTPUTS}

    def _prompt_inputs(self, prompt: dict[str, np.ndarray]) -> list:
        return [_tensor(name, prompt[name], batched=True)
                for name in ("prompt_tokens", "prompt_mel", "prompt_xvector", "voice_id")]

    def speech_open(self, prompt: dict[str, np.ndarray], seed: int, codes: list[int], last: bool
                    ) -> tuple[str, np.ndarray]:
        res = self._infer("token2wav", [_text("op", "start", True), *self._prompt_inputs(prompt),
                                        _tensor("seed", np.array([seed], np.int64), True),
                                        *_push_inputs(codes, last)], ["stream_id", "pcm"])
        return bytes(res.as_numpy("stream_id").reshape(-1)[0]).decode(), res.as_numpy("pcm").reshape(-1).copy()

    def speech_push(self, stream_id: str, codes: list[int], last: bool) -> np.ndarray:
        res = self._infer("token2wav", [_text("op", "push", True), _text("stream_id", stream_id, True),
                                        *_push_inputs(codes, last)], ["pcm"])
        return res.as_numpy("pcm").reshape(-1).copy()

    def speech_cancel(self, stream_id: str) -> None:
        self._infer("token2wav", [_text("op", "cancel", True), _text("stream_id", stream_id, True)], [])

    def speech_offline(self, codes: list[int], prompt: dict[str, np.ndarray], seed: int) -> np.ndarray:
        res = self._infer("token2wav", [_text("op", "offline", True), _tensor("codes", np.asarray(codes, np.int64), True),
                                        *self._prompt_inputs(prompt), _tensor("seed", np.array([seed], np.int64), True)],
                          ["pcm"])
        return res.as_numpy("pcm").reshape(-1).copy()


class RoutedStages:
    """Each stage call to the BLS stages or to the gRPC stages configured for that stage."""

    def __init__(self, local: Any, remote: dict[str, Any]) -> None:
        unknown = set(remote) - set(STAGES)
        if unknown:
            raise InvalidInputError(f"unknown remote stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
        self.by_stage = {stage: remote.get(stage, local) for stage in STAGES}

    @property
    def at_response_end(self) -> bool:
        return self.by_stage["llm"].at_response_end

    def encode(self, mels: list[np.ndarray], lengths: list[int]) -> list[np.ndarray]:
        return self.by_stage["audio_encoder"].encode(mels, lengths)

    def generator(self, is_cancelled: Callable[[], bool]):
        return self.by_stage["llm"].generator(is_cancelled)

    def voice(self, audio: bytes | None, voice_id: str | None) -> dict[str, np.ndarray]:
        return self.by_stage["voice_prompt"].voice(audio, voice_id)

    def speech_open(self, prompt: dict[str, np.ndarray], seed: int, codes: list[int], last: bool
                    ) -> tuple[str, np.ndarray]:
        return self.by_stage["token2wav"].speech_open(prompt, seed, codes, last)

    def speech_push(self, stream_id: str, codes: list[int], last: bool) -> np.ndarray:
        return self.by_stage["token2wav"].speech_push(stream_id, codes, last)

    def speech_cancel(self, stream_id: str) -> None:
        self.by_stage["token2wav"].speech_cancel(stream_id)

    def speech_offline(self, codes: list[int], prompt: dict[str, np.ndarray], seed: int) -> np.ndarray:
        return self.by_stage["token2wav"].speech_offline(codes, prompt, seed)


def stages_from_parameters(local: Any, remotes: dict[str, str], timeout_s: float) -> Any:
    """`local` (BLS) unless `remotes` (the `remote_<stage>` parameters) names an address for a stage; one gRPC
    client per address."""
    unknown = sorted(set(remotes) - set(STAGES))
    if unknown:
        raise InvalidInputError(f"remote stages {unknown}: stages are {', '.join(STAGES)}")
    clients: dict[str, GrpcStages] = {}
    remote = {}
    for stage in STAGES:
        url = (remotes.get(stage) or "").strip()
        if url:
            remote[stage] = clients.setdefault(url, GrpcStages(url, timeout_s))
    return RoutedStages(local, remote) if remote else local
