"""Triton adapter for the streaming pipeline: runs the core `run_pipeline` flow with the audio_encoder and llm
stages reached over BLS, and streams each event back as JSON. One worker thread per active request."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import triton_python_backend_utils as pb_utils

from stepaudio2.pipeline import GenerationResult, run_pipeline
from stepaudio2.request import request_from_json
from stepaudio2.serving.bls import BlsStages, Cancelled
from stepaudio2.serving.events import event_dict
from stepaudio2.serving.metrics import PipelineMetrics
from stepaudio2.serving.triton_utils import (
    bytes_tensor,
    bytes_value,
    json_value,
    optional_input,
    triton_error,
)
from stepaudio2.text import StepAudio2Tokenizer, ToolCallEvent

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        llm_dir = Path(os.environ["STEPAUDIO2_RUNTIME"]) / "model_repository" / "llm" / "1"
        self.tokenizer = StepAudio2Tokenizer.from_dir(llm_dir)
        self.stages = BlsStages(pb_utils)
        self.metrics = PipelineMetrics(pb_utils, args["model_name"])
        self.pool = ThreadPoolExecutor(int(params.get("max_concurrent_requests", 64)), thread_name_prefix="pipeline")

    def _handle(self, request, sender) -> None:
        try:
            obj = json_value(optional_input(pb_utils, request, "request"), "request")
            req = request_from_json(obj, bytes_value(optional_input(pb_utils, request, "audio")))
            flow = run_pipeline(self.tokenizer, req, self.stages.encode, self.stages.generator(request.is_cancelled))
            for item in flow:
                if isinstance(item, ToolCallEvent):
                    self.metrics.tool_call(item.call.name)
                payload = {"type": "result", **item.to_json()} if isinstance(item, GenerationResult) else event_dict(item)
                if payload is not None:
                    sender.send(pb_utils.InferenceResponse(output_tensors=[
                        bytes_tensor(pb_utils, "event", json.dumps(payload, ensure_ascii=False))]))
            sender.send(flags=FINAL)
        except Cancelled:
            sender.send(flags=FINAL)
        except Exception as exc:
            sender.send(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)), flags=FINAL)

    def execute(self, requests: list) -> None:
        for request in requests:
            self.pool.submit(self._handle, request, request.get_response_sender())
        return None

    def finalize(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
