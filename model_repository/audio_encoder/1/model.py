"""Triton adapter for the audio encoder: requests in -> one padded batch -> core runner -> responses out.

Isolation: every item is checked on its own before it joins the batch (shape, finiteness, the encoder's
positional window), and if the batched run still fails, each item is retried alone so only the item that
cannot run gets the error; the rest of the dynamic batch is answered normally.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.audio import pad_mels
from stepaudio2.config import load_config
from stepaudio2.engines.runners import make_runner
from stepaudio2.serving.parameters import ModelParameters
from stepaudio2.serving.triton_utils import log_failure, required_input, triton_error
from stepaudio2.serving.validation import check_mel


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = ModelParameters.from_args(args)
        engine = params.choice("engine", ("onnx-cpu", "onnx-cuda", "tensorrt"))
        self.runner = make_runner(params.path("model_dir") / "audio_encoder.onnx", engine)
        audio = load_config(Path(args["model_repository"]).parent / "llm" / "1").audio
        self.n_mels = audio.n_mels
        # The stride-2 conv halves the frames before the learned positions: 2 x n_audio_ctx frames fit.
        self.max_frames = min(params.integer("max_mel_frames", minimum=1), 2 * audio.n_audio_ctx)
        # Warm before ready: the first run pays for graph optimisation and arena allocation.
        self._run([np.zeros((self.n_mels, 200), np.float32)], [200])

    def _run(self, mels: list[np.ndarray], lengths: list[int]) -> dict:
        batch, _ = pad_mels(mels)
        # Each request's own frame count is the batch length its item saw upstream (the pipeline pads a
        # request's chunks to their longest): the graph keeps every item as if it ran alone at that length.
        frames = np.array([m.shape[1] for m in mels], np.int64)
        return self.runner(mel=batch, mel_lengths=np.array(lengths, np.int64), mel_frames=frames)

    def _respond(self, out: dict, row: int):
        n = int(out["embed_lengths"][row])
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("audio_embeds", np.ascontiguousarray(out["audio_embeds"][row : row + 1, :n])),
            pb_utils.Tensor("embed_length", np.array([[n]], np.int64)),
        ])

    def execute(self, requests: list) -> list:
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                mel = required_input(pb_utils, request, "mel")
                length = int(required_input(pb_utils, request, "mel_length").reshape(-1)[0])
                check_mel(mel, length, self.n_mels, self.max_frames)
                parsed.append((i, mel[0], length))
            except Exception as exc:
                log_failure(pb_utils, "audio_encoder", request, exc)
                responses[i] = pb_utils.InferenceResponse(error=triton_error(pb_utils, exc))
        if not parsed:
            return responses
        try:
            out = self._run([m for _, m, _ in parsed], [n for _, _, n in parsed])
            for row, (i, _, _) in enumerate(parsed):
                responses[i] = self._respond(out, row)
        except Exception as batch_exc:
            log_failure(pb_utils, f"audio_encoder (batch of {len(parsed)}, retrying each item alone)",
                        requests[parsed[0][0]], batch_exc)
            for i, mel, length in parsed:
                try:
                    responses[i] = self._respond(self._run([mel], [length]), 0)
                except Exception as exc:
                    log_failure(pb_utils, "audio_encoder", requests[i], exc)
                    responses[i] = pb_utils.InferenceResponse(error=triton_error(pb_utils, exc))
        return responses
