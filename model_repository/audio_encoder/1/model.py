"""Triton adapter for the audio encoder: requests in -> one padded batch -> core runner -> responses out."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.audio import pad_mels
from stepaudio2.engines.runners import make_runner
from stepaudio2.errors import InvalidInputError
from stepaudio2.serving.parameters import ModelParameters
from stepaudio2.serving.triton_utils import required_input, triton_error


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = ModelParameters.from_args(args)
        engine = params.choice("engine", ("onnx-cpu", "onnx-cuda", "tensorrt"))
        self.runner = make_runner(params.path("model_dir") / "audio_encoder.onnx", engine)

    def execute(self, requests: list) -> list:
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                mel = required_input(pb_utils, request, "mel")
                length = int(required_input(pb_utils, request, "mel_length").reshape(-1)[0])
                if mel.ndim != 3 or mel.shape[0] != 1:
                    raise InvalidInputError(f"'mel' must be [1, 128, frames], got {list(mel.shape)}")
                if not 1 <= length <= mel.shape[2]:
                    raise InvalidInputError(f"'mel_length' {length} is outside [1, {mel.shape[2]}]")
                if not np.isfinite(mel).all():
                    raise InvalidInputError("'mel' contains NaN or infinite values")
                parsed.append((i, mel[0], length))
            except Exception as exc:
                responses[i] = pb_utils.InferenceResponse(error=triton_error(pb_utils, exc))
        if parsed:
            batch, _ = pad_mels([m for _, m, _ in parsed])
            # Each request's own frame count is the batch length its item saw upstream (the pipeline pads a
            # request's chunks to their longest): the graph keeps every item as if it ran alone at that length.
            frames = np.array([m.shape[1] for _, m, _ in parsed], np.int64)
            out = self.runner(mel=batch, mel_lengths=np.array([n for _, _, n in parsed], np.int64), mel_frames=frames)
            for row, (i, _, _) in enumerate(parsed):
                n = int(out["embed_lengths"][row])
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("audio_embeds", np.ascontiguousarray(out["audio_embeds"][row : row + 1, :n])),
                    pb_utils.Tensor("embed_length", np.array([[n]], np.int64)),
                ])
        return responses
