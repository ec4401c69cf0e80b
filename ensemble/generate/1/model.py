"""Triton adapter for request/response generation: `serve_request` over BLS, collected into one result. Speech
replies are synthesised offline (whole reply, batched with other requests in token2wav) into `audio_out`."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.serving.bls import BlsStages, ServerThreadStages
from stepaudio2.serving.limits import RequestLimits, check_request, parse_request
from stepaudio2.serving.parameters import ModelParameters
from stepaudio2.serving.remote_stages import stages_from_parameters
from stepaudio2.serving.served_request import serve_request
from stepaudio2.serving.triton_utils import (
    RequestWorker,
    bytes_tensor,
    bytes_value,
    bytes_values,
    log_failure,
    on_this_thread,
    optional_input,
    triton_error,
)
from stepaudio2.text import StepAudio2Tokenizer


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        # The audio front end's imports (soundfile, tables): paid here, not by the first request.
        import stepaudio2.audio  # noqa: F401

        params = ModelParameters.from_args(args)
        self.tokenizer = StepAudio2Tokenizer.from_dir(params.path("tokenizer_dir"))
        # Each stage in this server (BLS) or at the address of its `remote_<stage>` parameter (gRPC).
        remotes = {"audio_encoder": params.text("remote_audio_encoder"), "llm": params.text("remote_llm"),
                   "voice_prompt": params.text("remote_voice_prompt"), "token2wav": params.text("remote_token2wav")}
        # Per-request limits (stepaudio2/serving/limits.py), each a config.pbtxt parameter.
        self.limits = RequestLimits(
            max_request_bytes=params.integer("max_request_bytes", minimum=1),
            max_json_depth=params.integer("max_json_depth", minimum=1),
            max_audio_bytes=params.integer("max_audio_bytes", minimum=1),
            max_audio_seconds=params.number("max_audio_seconds", minimum=0),
            max_text_chars=params.integer("max_text_chars", minimum=1),
            max_new_tokens=params.integer("max_new_tokens", minimum=1),
        )
        # A front with remote stages serves off `execute` (`RequestWorker` says why), side by side when the llm
        # is remote; one server serves in `execute`, so a stub that dies fails its request at once.
        split = any(address.strip() for address in remotes.values())
        side_by_side = bool(remotes["llm"].strip())
        self.worker = RequestWorker(self._handle, "generate-requests", concurrent=side_by_side) if split else None
        self.on_server = self.worker.on_server if self.worker is not None else on_this_thread
        bls = ServerThreadStages(BlsStages(pb_utils), self.on_server) if side_by_side else BlsStages(pb_utils)
        self.stages = stages_from_parameters(bls, remotes, params.number("remote_timeout_s", minimum=0.001))

    def execute(self, requests: list) -> None:
        """Answer each request through its response sender, here or on the worker thread. Inputs are read here
        either way: their shared memory belongs to this call."""
        for request in requests:
            try:
                inputs = (bytes_value(optional_input(pb_utils, request, "request")),
                          bytes_values(optional_input(pb_utils, request, "audio")))
            except Exception as exc:  # noqa: BLE001 (answered like every other error)
                inputs = exc
            job = (request, request.get_response_sender(), inputs)
            if self.worker is None:
                self._handle(*job)
            else:
                self.worker.submit(*job)
        return None

    def _handle(self, request, sender, inputs: tuple | Exception) -> None:
        pcm: list[np.ndarray] = []
        on_server = self.on_server
        try:
            if isinstance(inputs, Exception):
                raise inputs
            raw, clips = inputs
            obj = parse_request(raw, self.limits)
            check_request(obj, clips, None, self.limits)
            payload = serve_request(
                self.tokenizer, self.stages, obj, clips, None,
                lambda _event, chunk, out=pcm: out.append(chunk) if chunk is not None else None,
                is_cancelled=lambda: on_server(request.is_cancelled), sessions=None, speech_default="offline",
            )
            audio = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
            on_server(_send_result, sender, json.dumps(payload, ensure_ascii=False), audio.astype(np.float32))
        except Exception as exc:
            on_server(log_failure, pb_utils, "generate", request, exc)
            on_server(_send_error, sender, exc)

    def finalize(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _send_result(sender, result_json: str, audio: np.ndarray) -> None:
    response = pb_utils.InferenceResponse(output_tensors=[bytes_tensor(pb_utils, "result", result_json),
                                                          pb_utils.Tensor("audio_out", audio)])
    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _send_error(sender, exc: Exception) -> None:
    sender.send(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
