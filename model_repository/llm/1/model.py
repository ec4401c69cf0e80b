"""Triton adapter for the LLM: each request becomes a sequence in the core ContinuousBatcher, which runs in a
background thread and streams one response per token through the request's response sender."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.engines.llm import OnnxBackend, splice_audio
from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.engines.scheduler import ContinuousBatcher, QueueFullError, SequenceRequest
from stepaudio2.errors import InvalidInputError
from stepaudio2.request import stop_ids
from stepaudio2.serving.metrics import LLMMetrics
from stepaudio2.serving.parameters import ModelParameters
from stepaudio2.serving.triton_utils import (
    bytes_tensor,
    bytes_value,
    json_value,
    optional_input,
    required_input,
    triton_error,
)
from stepaudio2.text import StepAudio2Tokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = ModelParameters.from_args(args)
        repo = Path(args["model_repository"]).parent
        self.backend = OnnxBackend(repo, params.choice("engine", ("onnx-cpu", "onnx-cuda", "tensorrt")))
        self.tokenizer = StepAudio2Tokenizer.from_dir(repo / "llm" / "1")
        from stepaudio2.config import load_config

        self.config = load_config(repo / "llm" / "1")
        t = self.config.text
        self.vocab_size = t.vocab_size
        self.batcher = ContinuousBatcher(
            self.backend.decoder,
            self.backend.embed,
            (t.num_hidden_layers, t.num_key_value_heads, t.head_dim, t.max_position_embeddings),
            max_slots=params.integer("max_slots", minimum=1),
            max_queue=params.integer("max_queue", minimum=0),
            on_step=self._on_step,
        )
        self.metrics = LLMMetrics(pb_utils, args["model_name"])
        self.metrics.slots_total.set(self.batcher.max_slots)
        self.send_lock = threading.RLock()
        self.cancelled: set[str] = set()  # sequence ids cancelled by the pipeline (thread-safe set ops)
        self.worker = threading.Thread(target=self.batcher.run, name="llm-continuous-batching", daemon=True)
        self.worker.start()

    def _on_step(self, batch_size: int, active: int, waiting: int) -> None:
        if batch_size:
            self.metrics.batch.observe(batch_size)
        self.metrics.active.set(active)  # one KV slot per running sequence
        self.metrics.queue.set(waiting)

    def _sequence(self, request, sender, arrived: float) -> SequenceRequest:
        ids = required_input(pb_utils, request, "input_ids").reshape(-1).astype(np.int64)
        if ids.size == 0:
            raise InvalidInputError("'input_ids' is empty")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidInputError(f"'input_ids' has ids outside [0, {self.vocab_size})")
        embeds = optional_input(pb_utils, request, "audio_embeds")
        spans = optional_input(pb_utils, request, "audio_spans")
        chunks, span_list = [], []
        if spans is not None and spans.size:
            span_list = [(int(a), int(b)) for a, b in spans.reshape(-1, 2)]
            if embeds is None or embeds.ndim != 2:
                raise InvalidInputError("'audio_spans' given without 2-D 'audio_embeds' [N, hidden]")
            if any(a < 0 or a + b > ids.size for a, b in span_list):
                raise InvalidInputError("'audio_spans' point outside 'input_ids'")
            if sum(b for _, b in span_list) != embeds.shape[0]:
                raise InvalidInputError("'audio_spans' counts do not add up to the rows of 'audio_embeds'")
            offsets = np.cumsum([0] + [b for _, b in span_list])
            chunks = [embeds[offsets[k] : offsets[k + 1]] for k in range(len(span_list))]
        prompt = splice_audio(self.backend.embed(ids.tolist()), chunks, span_list)
        sampling = SamplingParams.from_dict(json_value(optional_input(pb_utils, request, "sampling"), "sampling") or {})
        seq_id = (bytes_value(optional_input(pb_utils, request, "sequence_id")) or b"").decode() or None
        state = {"last": arrived, "first": True}

        def on_token(token: int) -> None:
            now = time.perf_counter()
            (self.metrics.ttft if state["first"] else self.metrics.inter_token).observe(now - state["last"])
            state.update(last=now, first=False)
            self.metrics.tokens.increment(1)
            self._send(sender, pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("token_ids", np.array([token], np.int64)),
            ]))

        def on_finish(reason: str) -> None:
            self.cancelled.discard(seq_id)
            self.metrics.finished(reason)
            if reason.startswith("error"):
                self._send(sender, pb_utils.InferenceResponse(error=pb_utils.TritonError(reason)), flags=FINAL)
            else:
                self._send(sender, pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("token_ids", np.zeros(0, np.int64)), bytes_tensor(pb_utils, "finish_reason", reason),
                ]), flags=FINAL)

        return SequenceRequest(
            request_id=request.request_id() or "",
            prompt_embeds=prompt,
            prompt_ids=ids.tolist(),
            sampling=sampling,
            stop_ids=frozenset(stop_ids(self.tokenizer, self.config, sampling)),
            on_token=on_token,
            on_finish=on_finish,
            is_cancelled=lambda: (seq_id is not None and seq_id in self.cancelled) or self._request_cancelled(request),
        )

    def _request_cancelled(self, request) -> bool:
        with self.send_lock:
            return request.is_cancelled()

    def _send(self, sender, response=None, flags: int = 0) -> None:
        # One send at a time per stub (the batcher thread and execute() both answer): concurrent sends crashed
        # this Triton version's Python backend.
        with self.send_lock:
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            cancel = bytes_value(optional_input(pb_utils, request, "cancel"))
            if cancel is not None:  # control request: mark, answer at once; the slot frees at the next step
                self.cancelled.add(cancel.decode())
                self._send(sender, flags=FINAL)
                continue
            try:
                self.batcher.submit(self._sequence(request, sender, time.perf_counter()))
            except Exception as exc:
                if isinstance(exc, QueueFullError):
                    self.metrics.rejected.increment(1)
                self._send(sender, pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)), flags=FINAL)
        return None

    def finalize(self) -> None:
        self.batcher.stop()
        self.worker.join(10)
