"""Triton adapter for request/response generation: `run_pipeline` over BLS, collected into one result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils

from stepaudio2.pipeline import GenerationResult, run_pipeline
from stepaudio2.request import request_from_json
from stepaudio2.serving.bls import BlsStages
from stepaudio2.serving.triton_utils import (
    bytes_tensor,
    bytes_value,
    json_value,
    optional_input,
    triton_error,
)
from stepaudio2.text import StepAudio2Tokenizer


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        llm_dir = Path(os.environ["STEPAUDIO2_RUNTIME"]) / "model_repository" / "llm" / "1"
        self.tokenizer = StepAudio2Tokenizer.from_dir(llm_dir)
        self.stages = BlsStages(pb_utils)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                obj = json_value(optional_input(pb_utils, request, "request"), "request")
                req = request_from_json(obj, bytes_value(optional_input(pb_utils, request, "audio")))
                *_, result = run_pipeline(self.tokenizer, req, self.stages.encode,
                                          self.stages.generator(request.is_cancelled))
                assert isinstance(result, GenerationResult)
                payload = json.dumps({"type": "result", **result.to_json()}, ensure_ascii=False)
                responses.append(pb_utils.InferenceResponse(output_tensors=[bytes_tensor(pb_utils, "result", payload)]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)))
        return responses
