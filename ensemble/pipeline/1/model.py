"""Triton adapter for the streaming pipeline: runs `serve_request` (the core `run_pipeline` flow with the
audio_encoder, llm, voice_prompt and token2wav stages reached over BLS, or over gRPC where a `remote_<stage>`
parameter names another server) and streams each event back as JSON, PCM chunks in `audio_chunk`. One server:
each instance (a process) serves one request at a time in `execute`, so concurrency comes from `instance_group`
count. A front with remote stages hands requests to a `RequestWorker` (its docstring says why); with the llm
remote, replies are served side by side. Either way one thread per stub talks to the server: the Python backend
of this Triton version crashed when several threads of one stub talked to the server at once."""

from __future__ import annotations

import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.errors import UnavailableError
from stepaudio2.serving.bls import BlsStages, Cancelled, ServerThreadStages
from stepaudio2.serving.limits import RequestLimits, check_request, parse_request
from stepaudio2.serving.metrics import PipelineMetrics, SpeechDeliveryMetrics
from stepaudio2.serving.parameters import ModelParameters
from stepaudio2.serving.remote_stages import stages_from_parameters
from stepaudio2.serving.served_request import serve_request
from stepaudio2.serving.session_store import open_store
from stepaudio2.serving.sessions import SessionStore
from stepaudio2.serving.shared_voices import SharedVoiceStages
from stepaudio2.serving.speech_route import SpeechRoute
from stepaudio2.serving.triton_utils import (
    RequestWorker,
    bytes_tensor,
    bytes_value,
    bytes_values,
    hold_until_exit,
    log_failure,
    on_this_thread,
    optional_input,
    triton_error,
)
from stepaudio2.text import StepAudio2Tokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        # The audio front end's imports (soundfile, tables): paid here, not by the first request.
        import stepaudio2.audio  # noqa: F401

        params = ModelParameters.from_args(args)
        self.tokenizer = StepAudio2Tokenizer.from_dir(params.path("tokenizer_dir"))
        self.metrics = PipelineMetrics(pb_utils, args["model_name"])
        self.speech_metrics = SpeechDeliveryMetrics(pb_utils, args["model_name"])
        hold_until_exit(self.metrics, self.speech_metrics)  # their teardown crashes this backend's stubs
        # Sessions and voices: files in `sessions_dir` (default, one server) or Redis (`session_store`), shared
        # by every instance (and, with Redis, every replica).
        store = open_store(params.text("session_store"), params.path("sessions_dir"),
                           max_sessions=params.integer("max_sessions", minimum=1),
                           ttl_s=params.number("session_ttl_s", minimum=0))
        self.sessions = SessionStore(store)
        # Each stage in this server (BLS) or at the address of its `remote_<stage>` parameter (gRPC).
        remotes = {"audio_encoder": params.text("remote_audio_encoder"), "llm": params.text("remote_llm"),
                   "voice_prompt": params.text("remote_voice_prompt"), "token2wav": params.text("remote_token2wav")}
        # A front with remote stages serves off `execute` (`RequestWorker` says why), side by side when the llm
        # is remote; one server serves in `execute`, so a stub that dies fails its request at once.
        split = any(address.strip() for address in remotes.values())
        side_by_side = bool(remotes["llm"].strip())
        self.worker = RequestWorker(self._handle, "pipeline-requests", concurrent=side_by_side) if split else None
        self.on_server = self.worker.on_server if self.worker is not None else on_this_thread
        bls = ServerThreadStages(BlsStages(pb_utils), self.on_server) if side_by_side else BlsStages(pb_utils)
        local = stages_from_parameters(bls, remotes, params.number("remote_timeout_s", minimum=0.001))
        self.stages = SharedVoiceStages(local, store)
        # Per-request limits (stepaudio2/serving/limits.py), each a config.pbtxt parameter.
        self.limits = RequestLimits(
            max_request_bytes=params.integer("max_request_bytes", minimum=1),
            max_json_depth=params.integer("max_json_depth", minimum=1),
            max_audio_bytes=params.integer("max_audio_bytes", minimum=1),
            max_audio_seconds=params.number("max_audio_seconds", minimum=0),
            max_text_chars=params.integer("max_text_chars", minimum=1),
            max_new_tokens=params.integer("max_new_tokens", minimum=1),
        )

    def _audio_done(self, route: SpeechRoute) -> None:
        self.on_server(self._observe_delivery, route)

    def _observe_delivery(self, route: SpeechRoute) -> None:
        clock = route.clock
        if clock.time_to_first_audio is not None:
            self.speech_metrics.ttfa.observe(clock.time_to_first_audio)
        for gap in clock.gaps:
            self.speech_metrics.chunk_gap.observe(gap)
        if clock.underruns:
            self.speech_metrics.underruns.increment(clock.underruns)

    def _handle(self, request, sender, arrived: float, inputs: tuple | Exception) -> None:
        on_server = self.on_server
        ended = False

        def emit(event: dict, pcm: np.ndarray | None) -> None:
            nonlocal ended
            # The result is the last event: it carries the FINAL flag itself, so no separate flag-only response
            # follows it (one response callback less per request in Triton's gRPC stream handler).
            last = event.get("type") == "result"
            on_server(_send_event, sender, json.dumps(event, ensure_ascii=False), pcm, last)
            ended = ended or last

        try:
            if isinstance(inputs, Exception):
                raise inputs
            raw, clips, voice = inputs
            obj = parse_request(raw, self.limits)
            check_request(obj, clips, voice, self.limits)
            serve_request(
                self.tokenizer, self.stages, obj, clips, voice,
                emit, is_cancelled=lambda: on_server(request.is_cancelled), sessions=self.sessions, arrived=arrived,
                on_tool_call=lambda name: on_server(self.metrics.tool_call, name), on_audio_done=self._audio_done,
            )
            if not ended:
                on_server(_send_final, sender)
        except Cancelled:
            on_server(_send_final, sender)
        except Exception as exc:
            on_server(log_failure, pb_utils, "pipeline", request, exc, arrived)
            if not ended:  # after the final result nothing more can be sent; the failure is only logged
                on_server(_send_error, sender, exc)
        finally:
            try:
                sessions = len(self.sessions)
            except UnavailableError:
                sessions = None  # the store is down: session requests say so; the gauge keeps its last value
            if sessions is not None:
                on_server(self.speech_metrics.sessions.set, sessions)

    def execute(self, requests: list) -> None:
        """Serve each request here, or hand it to the worker thread and return at once. Inputs are read here
        either way: their shared memory belongs to this call."""
        arrived = time.perf_counter()
        for request in requests:
            job = (request, request.get_response_sender(), arrived, _read_inputs(request))
            if self.worker is None:
                self._handle(*job)
            else:
                self.worker.submit(*job)
        return None

    def finalize(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _send_event(sender, event_json: str, pcm: np.ndarray | None, last: bool) -> None:
    tensors = [bytes_tensor(pb_utils, "event", event_json)]
    if pcm is not None:
        tensors.append(pb_utils.Tensor("audio_chunk", pcm))
    sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if last else 0)


def _send_final(sender) -> None:
    sender.send(flags=FINAL)


def _send_error(sender, exc: Exception) -> None:
    sender.send(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)), flags=FINAL)


def _read_inputs(request) -> tuple | Exception:
    """(request JSON bytes, audio clips, voice bytes), or the error reading them (answered by the worker)."""
    try:
        return (bytes_value(optional_input(pb_utils, request, "request")),
                bytes_values(optional_input(pb_utils, request, "audio")),
                _voice_bytes(optional_input(pb_utils, request, "voice")))
    except Exception as exc:  # noqa: BLE001 (the worker sends it as this request's error)
        return exc


def _voice_bytes(array: np.ndarray | None) -> bytes | None:
    """The voice input as bytes: absent -> None, present but empty -> b"" (rejected by name downstream)."""
    if array is None:
        return None
    return bytes_value(array) or b""
