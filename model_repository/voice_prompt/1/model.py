"""Triton adapter for voice prompts: audio bytes (or a known voice_id, or nothing for the default voice) ->
the prompt features token2wav conditions on. Prompts are kept by content hash in a bounded LRU."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.audio import decode_audio
from stepaudio2.errors import AudioError, InvalidInputError
from stepaudio2.serving.parameters import ModelParameters
from stepaudio2.serving.triton_utils import (
    bytes_tensor,
    bytes_value,
    log_failure,
    optional_input,
    triton_error,
)
from stepaudio2.token2wav.prompt import VoicePrompt, VoicePromptEncoder, default_voice_path


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = ModelParameters.from_args(args)
        self.max_voices = params.integer("max_voices", minimum=1)
        self.max_seconds = params.number("max_prompt_seconds", minimum=0)
        self.min_seconds = params.number("min_prompt_seconds", minimum=0)
        self.encoder = VoicePromptEncoder(params.path("token2wav_dir"), cache_size=self.max_voices)
        self.voices: OrderedDict[str, VoicePrompt] = OrderedDict()
        self.lock = threading.Lock()
        self.default = self._keep(self.encoder.encode_file(default_voice_path()))

    def _keep(self, prompt: VoicePrompt) -> VoicePrompt:
        with self.lock:
            self.voices[prompt.key] = prompt
            self.voices.move_to_end(prompt.key)
            while len(self.voices) > self.max_voices:
                self.voices.popitem(last=False)
        return prompt

    def _prompt(self, request) -> VoicePrompt:
        audio = optional_input(pb_utils, request, "audio")
        voice_id = bytes_value(optional_input(pb_utils, request, "voice_id"))
        if audio is not None:
            data = bytes_value(audio) or b""
            if not data:
                raise InvalidInputError("voice prompt audio is empty")
            # Duration first (a cheap decode), so an over-long prompt is refused before the expensive encoding.
            try:
                samples, sr = decode_audio(data, mono="first")
            except AudioError as exc:
                raise AudioError(f"voice prompt: {exc}") from None  # which input could not be read
            seconds = samples.shape[0] / sr
            if seconds > self.max_seconds:
                raise InvalidInputError(f"voice prompt is {seconds:.1f} s long, over the limit "
                                        f"max_prompt_seconds={self.max_seconds:g}")
            if seconds < self.min_seconds:
                raise InvalidInputError(f"voice prompt is {seconds:.2f} s long, under the limit "
                                        f"min_prompt_seconds={self.min_seconds:g}")
            return self._keep(self.encoder.encode_bytes(data))
        if voice_id:
            key = voice_id.decode("utf-8", "replace")
            with self.lock:
                prompt = self.voices.get(key)
            if prompt is None:
                raise InvalidInputError(f"voice_id '{key[:80]}' is not known here (send the voice audio again)")
            return prompt
        return self.default

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                p = self._prompt(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    bytes_tensor(pb_utils, "voice_id", p.key),
                    pb_utils.Tensor("prompt_tokens", np.asarray(p.tokens, np.int64)),
                    pb_utils.Tensor("prompt_mel", np.asarray(p.mel, np.float32)),
                    pb_utils.Tensor("prompt_xvector", np.asarray(p.xvector, np.float32)),
                ]))
            except Exception as exc:
                log_failure(pb_utils, "voice_prompt", request, exc)
                responses.append(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)))
        return responses
