"""Triton adapter for the streaming pipeline: runs the core `run_pipeline` flow with the audio_encoder and llm
stages reached over BLS, and streams each event back as JSON. One worker thread per active request."""

from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.engines.scheduler import QueueFullError
from stepaudio2.errors import InvalidInputError
from stepaudio2.pipeline import GenerationResult, run_pipeline
from stepaudio2.request import request_from_json
from stepaudio2.serving.events import event_dict
from stepaudio2.serving.metrics import PipelineMetrics
from stepaudio2.serving.triton_utils import (
    bytes_tensor,
    bytes_value,
    json_value,
    optional_input,
    strip_status,
    triton_error,
)
from stepaudio2.text import StepAudio2Tokenizer, ToolCallEvent

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        llm_dir = Path(os.environ["STEPAUDIO2_RUNTIME"]) / "model_repository" / "llm" / "1"
        self.tokenizer = StepAudio2Tokenizer.from_dir(llm_dir)
        self.metrics = PipelineMetrics(pb_utils, args["model_name"])
        self.pool = ThreadPoolExecutor(int(params.get("max_concurrent_requests", 64)), thread_name_prefix="pipeline")

    # ---- stages over BLS ----------------------------------------------------------------------------------
    @staticmethod
    def _encode(mels: list[np.ndarray], lengths: list[int]) -> list[np.ndarray]:
        out = []
        for mel, n in zip(mels, lengths, strict=True):
            resp = pb_utils.InferenceRequest(
                model_name="audio_encoder",
                inputs=[pb_utils.Tensor("mel", mel[None].astype(np.float32)),
                        pb_utils.Tensor("mel_length", np.array([[n]], np.int64))],
                requested_output_names=["audio_embeds"],
            ).exec()
            _raise_for(resp, "audio_encoder")
            out.append(pb_utils.get_output_tensor_by_name(resp, "audio_embeds").as_numpy()[0])
        return out

    @staticmethod
    def _generate_with(request):
        def generate(ids, chunks, spans, sampling):
            inputs = [pb_utils.Tensor("input_ids", np.asarray(ids, np.int64))]
            if chunks:
                inputs += [pb_utils.Tensor("audio_embeds", np.concatenate(chunks, axis=0).astype(np.float32)),
                           pb_utils.Tensor("audio_spans", np.asarray(spans, np.int64).reshape(-1, 2))]
            inputs.append(bytes_tensor(pb_utils, "sampling", json.dumps(sampling.to_dict())))
            # Server-generated id: the handle to cancel this sequence (BLS response iterators of this Triton
            # version cannot cancel, so the pipeline tells the llm model directly).
            sequence_id = uuid.uuid4().hex
            inputs.append(bytes_tensor(pb_utils, "sequence_id", sequence_id))
            stream = pb_utils.InferenceRequest(
                model_name="llm", inputs=inputs, requested_output_names=["token_ids", "finish_reason"]
            ).exec(decoupled=True)
            for resp in stream:
                if request.is_cancelled():
                    _cancel_sequence(sequence_id)  # frees the LLM slot at its next step
                    for _ in stream:  # drain: the llm ends this stream with finish_reason "cancelled"
                        pass
                    raise _Cancelled()
                _raise_for(resp, "llm")
                tokens = pb_utils.get_output_tensor_by_name(resp, "token_ids")
                for tok in tokens.as_numpy().reshape(-1) if tokens is not None else ():
                    yield int(tok)
                reason = pb_utils.get_output_tensor_by_name(resp, "finish_reason")
                if reason is not None:
                    yield bytes_value(reason.as_numpy()).decode()
        return generate

    # ---- request handling ---------------------------------------------------------------------------------
    def _handle(self, request, sender) -> None:
        try:
            obj = json_value(optional_input(pb_utils, request, "request"), "request")
            req = request_from_json(obj, bytes_value(optional_input(pb_utils, request, "audio")))
            for item in run_pipeline(self.tokenizer, req, self._encode, self._generate_with(request)):
                payload = {"type": "result", **item.to_json()} if isinstance(item, GenerationResult) else event_dict(item)
                if isinstance(item, ToolCallEvent):
                    self.metrics.tool_call(item.call.name)
                if payload is not None:
                    sender.send(pb_utils.InferenceResponse(output_tensors=[
                        bytes_tensor(pb_utils, "event", json.dumps(payload, ensure_ascii=False))]))
            sender.send(flags=FINAL)
        except _Cancelled:
            sender.send(flags=FINAL)
        except Exception as exc:
            sender.send(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)), flags=FINAL)

    def execute(self, requests: list) -> None:
        for request in requests:
            self.pool.submit(self._handle, request, request.get_response_sender())
        return None

    def finalize(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _cancel_sequence(sequence_id: str) -> None:
    control = pb_utils.InferenceRequest(
        model_name="llm", inputs=[bytes_tensor(pb_utils, "cancel", sequence_id)], requested_output_names=[]
    )
    for _ in control.exec(decoupled=True):
        pass


def _raise_for(resp, stage: str) -> None:
    """Re-raise a stage's error with its status kept: a bad request stays INVALID_ARGUMENT for the client."""
    if not resp.has_error():
        return
    err = resp.error()
    _, message = strip_status(err.message())
    if err.code() == pb_utils.TritonError.INVALID_ARG:
        raise InvalidInputError(message)
    if err.code() == pb_utils.TritonError.UNAVAILABLE:
        raise QueueFullError(message)
    raise RuntimeError(f"{stage}: {message}")
