"""Triton adapter for token2wav: requests become jobs of the core SynthesisScheduler, whose loop batches the
chunks of all open streams into one estimator call per Euler step and answers each request when its job is done.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.errors import InvalidInputError
from stepaudio2.serving.metrics import Token2WavMetrics
from stepaudio2.serving.synthesis import RoundStats, SynthesisScheduler
from stepaudio2.serving.triton_utils import (
    bytes_tensor,
    bytes_value,
    optional_input,
    required_input,
    triton_error,
)
from stepaudio2.token2wav.prompt import VoicePrompt

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _prompt(request) -> VoicePrompt:
    tokens = required_input(pb_utils, request, "prompt_tokens").astype(np.int64).reshape(-1)
    mel = required_input(pb_utils, request, "prompt_mel").astype(np.float32)
    xvector = required_input(pb_utils, request, "prompt_xvector").astype(np.float32).reshape(-1)
    if mel.ndim != 2 or mel.shape[0] != 2 * tokens.size:
        raise InvalidInputError(f"prompt_mel must be (2 x {tokens.size} prompt tokens, mel bins), got {mel.shape}")
    if not (np.all(np.isfinite(mel)) and np.all(np.isfinite(xvector))):
        raise InvalidInputError("prompt_mel / prompt_xvector contain NaN or infinite values")
    key = (bytes_value(optional_input(pb_utils, request, "voice_id")) or b"").decode("utf-8", "replace") or None
    return VoicePrompt(tokens=tokens, xvector=xvector, mel=mel, key=key)


def _seed(request) -> int:
    seed = optional_input(pb_utils, request, "seed")
    return 0 if seed is None or seed.size == 0 else int(seed.reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        from stepaudio2.token2wav.synth import Token2Wav

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if int(params.get("torch_threads", 0)) > 0:
            torch.set_num_threads(int(params["torch_threads"]))
        t2w = Token2Wav(Path(args["model_repository"]) / "1")
        self.metrics = Token2WavMetrics(pb_utils, args["model_name"])
        self.scheduler = SynthesisScheduler(
            t2w,
            batching=params.get("batching", "true").lower() == "true",
            max_batch=int(params.get("max_batch_streams", 16)),
            max_streams=int(params.get("max_streams", 256)),
            stream_ttl_s=float(params.get("stream_ttl_s", 120)),
            on_round=self._on_round,
        )

    def _on_round(self, stats: RoundStats) -> None:
        self.metrics.batch.observe(stats.estimator_batch)
        self.metrics.compute_seconds.increment(stats.compute_s)
        self.metrics.audio_seconds.increment(stats.audio_s)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.active.set(self.scheduler.active_streams)
        self.metrics.queue.set(self.scheduler.queue_depth)

    @staticmethod
    def _answer(sender):
        def done(pcm: np.ndarray | None, error: BaseException | None) -> None:
            if error is not None:
                sender.send(pb_utils.InferenceResponse(error=triton_error(pb_utils, error)), flags=FINAL)
            else:
                sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("pcm", pcm)]), flags=FINAL)

        return done

    def _handle(self, request, sender) -> None:
        op = (bytes_value(required_input(pb_utils, request, "op")) or b"").decode("utf-8", "replace")
        stream_id = (bytes_value(optional_input(pb_utils, request, "stream_id")) or b"").decode("utf-8", "replace")
        if op == "start":
            sid = self.scheduler.start_stream(_prompt(request), seed=_seed(request))
            sender.send(pb_utils.InferenceResponse(output_tensors=[bytes_tensor(pb_utils, "stream_id", sid)]),
                        flags=FINAL)
        elif op == "push":
            if not stream_id:
                raise InvalidInputError("op 'push' needs a stream_id")
            last = optional_input(pb_utils, request, "last")
            codes = optional_input(pb_utils, request, "codes")
            self.scheduler.push(stream_id, np.zeros(0, np.int64) if codes is None else codes.reshape(-1),
                                bool(last is not None and last.size and last.reshape(-1)[0]), self._answer(sender))
        elif op == "cancel":
            self.scheduler.cancel(stream_id)  # unknown ids are fine: the stream may have just finished
            sender.send(flags=FINAL)
        elif op == "offline":
            codes = required_input(pb_utils, request, "codes").reshape(-1)
            self.scheduler.offline(codes, _prompt(request), _seed(request), self._answer(sender))
        else:
            raise InvalidInputError(f"unknown op '{op[:32]}' (start, push, cancel or offline)")

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._handle(request, sender)
            except Exception as exc:
                sender.send(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)), flags=FINAL)
        self._gauges()
        return None

    def finalize(self) -> None:
        self.scheduler.close()
