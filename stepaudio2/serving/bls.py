"""The pipeline's stage calls over BLS (audio_encoder, llm, voice_prompt, token2wav), shared by the streaming `pipeline` model and the
request/response `generate` model. pb_utils is passed in: it exists only inside the Python backend stub."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.errors import InvalidInputError, QueueFullError
from stepaudio2.serving.triton_utils import bytes_tensor, bytes_value, strip_status

PROMPT_OUTPUTS = ("voice_id", "prompt_tokens", "prompt_mel", "prompt_xvector")


class Cancelled(Exception):
    """The client cancelled the request that these stage calls serve."""


class BlsStages:
    def __init__(self, pb_utils: Any, encoder_model: str = "audio_encoder", llm_model: str = "llm") -> None:
        self.pb = pb_utils
        self.encoder_model = encoder_model
        self.llm_model = llm_model
        self.voice_model = "voice_prompt"
        self.token2wav_model = "token2wav"
        # True while the token just yielded by generate() is the last of its llm response.
        self.at_response_end = True

    def encode(self, mels: list[np.ndarray], lengths: list[int]) -> list[np.ndarray]:
        pb = self.pb
        out = []
        # Upstream encodes a request's chunks as one zero-padded batch; padding each chunk to the longest
        # gives the encoder the same per-item batch length (the audio_encoder model reads it off the shape).
        t_max = max((m.shape[1] for m in mels), default=0)
        for mel, n in zip(mels, lengths, strict=True):
            mel = np.pad(mel, ((0, 0), (0, t_max - mel.shape[1])))
            resp = pb.InferenceRequest(
                model_name=self.encoder_model,
                inputs=[pb.Tensor("mel", mel[None].astype(np.float32)),
                        pb.Tensor("mel_length", np.array([[n]], np.int64))],
                requested_output_names=["audio_embeds"],
            ).exec()
            self.raise_for(resp, self.encoder_model)
            out.append(pb.get_output_tensor_by_name(resp, "audio_embeds").as_numpy()[0].copy())
        return out

    def generator(self, is_cancelled: Callable[[], bool]):
        """A `run_pipeline` generate function that streams tokens from the llm model."""
        def generate(ids, chunks, spans, sampling: SamplingParams) -> Iterator[int | str]:
            return self.generate(ids, chunks, spans, sampling, is_cancelled)

        return generate

    def generate(self, ids, chunks, spans, sampling: SamplingParams, is_cancelled) -> Iterator[int | str]:
        pb = self.pb
        inputs = [pb.Tensor("input_ids", np.asarray(ids, np.int64))]
        if chunks:
            inputs += [pb.Tensor("audio_embeds", np.concatenate(chunks, axis=0).astype(np.float32)),
                       pb.Tensor("audio_spans", np.asarray(spans, np.int64).reshape(-1, 2))]
        inputs.append(bytes_tensor(pb, "sampling", json.dumps(sampling.to_dict())))
        # Server-generated id: the handle to cancel this sequence (BLS response iterators of this Triton
        # version cannot cancel, so the caller tells the llm model directly).
        sequence_id = uuid.uuid4().hex
        inputs.append(bytes_tensor(pb, "sequence_id", sequence_id))
        stream = pb.InferenceRequest(
            model_name=self.llm_model, inputs=inputs, requested_output_names=["token_ids", "finish_reason"]
        ).exec(decoupled=True)
        for resp in stream:
            if is_cancelled():
                self.cancel(sequence_id)  # frees the LLM slot at its next step
                for _ in stream:  # drain: the llm ends this stream with finish_reason "cancelled"
                    pass
                raise Cancelled()
            self.raise_for(resp, self.llm_model)
            tokens = pb.get_output_tensor_by_name(resp, "token_ids")
            ids = tokens.as_numpy().reshape(-1).tolist() if tokens is not None else []
            for k, tok in enumerate(ids):
                self.at_response_end = k == len(ids) - 1  # lets the caller flush merged events here
                yield int(tok)
            self.at_response_end = True
            reason = pb.get_output_tensor_by_name(resp, "finish_reason")
            if reason is not None:
                yield bytes_value(reason.as_numpy()).decode()

    def cancel(self, sequence_id: str) -> None:
        control = self.pb.InferenceRequest(
            model_name=self.llm_model, inputs=[bytes_tensor(self.pb, "cancel", sequence_id)],
            requested_output_names=[],
        )
        for _ in control.exec(decoupled=True):
            pass

    # ---- speech stages ----------------------------------------------------------------------------------------

    def voice(self, audio: bytes | None, voice_id: str | None) -> dict[str, np.ndarray]:
        """Prompt features from the voice_prompt model: new audio, a kept voice_id, or the default voice."""
        pb = self.pb
        inputs = []
        if audio is not None:
            inputs.append(bytes_tensor(pb, "audio", audio))
        elif voice_id:
            inputs.append(bytes_tensor(pb, "voice_id", voice_id))
        resp = pb.InferenceRequest(model_name=self.voice_model, inputs=inputs,
                                   requested_output_names=list(PROMPT_OUTPUTS)).exec()
        self.raise_for(resp, self.voice_model)
        # Copies: a BLS output lives in shared memory that is freed with its response.
        return {name: pb.get_output_tensor_by_name(resp, name).as_numpy().copy() for name in PROMPT_OUTPUTS}

    def _token2wav(self, inputs: list, outputs: list[str]) -> Any:
        """One call to token2wav (its dynamic batcher gathers concurrent calls into one synthesis round)."""
        pb = self.pb
        resp = pb.InferenceRequest(model_name=self.token2wav_model, inputs=[_batched(pb, t) for t in inputs],
                                   requested_output_names=outputs).exec()
        self.raise_for(resp, self.token2wav_model)
        return resp

    def _prompt_inputs(self, prompt: dict[str, np.ndarray]) -> list:
        pb = self.pb
        return [pb.Tensor("prompt_tokens", prompt["prompt_tokens"]), pb.Tensor("prompt_mel", prompt["prompt_mel"]),
                pb.Tensor("prompt_xvector", prompt["prompt_xvector"]), pb.Tensor("voice_id", prompt["voice_id"])]

    def _push_inputs(self, codes: list[int], last: bool) -> list:
        return [self.pb.Tensor("codes", np.asarray(codes, np.int64)), self.pb.Tensor("last", np.array([last], bool))]

    def speech_open(self, prompt: dict[str, np.ndarray], seed: int, codes: list[int], last: bool
                    ) -> tuple[str, np.ndarray]:
        pb = self.pb
        resp = self._token2wav([bytes_tensor(pb, "op", "start"), *self._prompt_inputs(prompt),
                                pb.Tensor("seed", np.array([seed], np.int64)), *self._push_inputs(codes, last)],
                               ["stream_id", "pcm"])
        return (bytes_value(pb.get_output_tensor_by_name(resp, "stream_id").as_numpy()).decode(),
                pb.get_output_tensor_by_name(resp, "pcm").as_numpy().reshape(-1).copy())

    def speech_push(self, stream_id: str, codes: list[int], last: bool) -> np.ndarray:
        pb = self.pb
        resp = self._token2wav([bytes_tensor(pb, "op", "push"), bytes_tensor(pb, "stream_id", stream_id),
                                *self._push_inputs(codes, last)], ["pcm"])
        return pb.get_output_tensor_by_name(resp, "pcm").as_numpy().reshape(-1).copy()

    def speech_cancel(self, stream_id: str) -> None:
        pb = self.pb
        self._token2wav([bytes_tensor(pb, "op", "cancel"), bytes_tensor(pb, "stream_id", stream_id)], [])

    def speech_offline(self, codes: list[int], prompt: dict[str, np.ndarray], seed: int) -> np.ndarray:
        pb = self.pb
        resp = self._token2wav([bytes_tensor(pb, "op", "offline"), pb.Tensor("codes", np.asarray(codes, np.int64)),
                                *self._prompt_inputs(prompt), pb.Tensor("seed", np.array([seed], np.int64))], ["pcm"])
        return pb.get_output_tensor_by_name(resp, "pcm").as_numpy().reshape(-1).copy()

    def raise_for(self, resp: Any, stage: str) -> None:
        """Re-raise a stage's error with its status kept: a bad request stays INVALID_ARGUMENT for the client."""
        if not resp.has_error():
            return
        err = resp.error()
        status, message = strip_status(err.message())  # the prefix survives where the code does not
        if err.code() == self.pb.TritonError.INVALID_ARG or status == "INVALID_ARGUMENT":
            raise InvalidInputError(message)
        if err.code() == self.pb.TritonError.UNAVAILABLE or status == "UNAVAILABLE":
            raise QueueFullError(message)
        raise RuntimeError(f"{stage}: {message}")


def _batched(pb: Any, tensor: Any) -> Any:
    """The tensor with a leading batch dimension of 1 (token2wav has max_batch_size > 0)."""
    return pb.Tensor(tensor.name(), tensor.as_numpy()[None])


class ServerThreadStages:
    """`BlsStages` whose calls run through `on_server` (a `RequestWorker`'s server thread), for a front that
    serves its requests side by side: only its unary stages may be local then. A BLS llm stream would be waited
    on there and hold every other request's calls, so such fronts reach the llm over gRPC."""

    def __init__(self, stages: BlsStages, on_server: Callable[..., Any]) -> None:
        self.stages = stages
        self.on_server = on_server

    def encode(self, mels: list[np.ndarray], lengths: list[int]) -> list[np.ndarray]:
        return self.on_server(self.stages.encode, mels, lengths)

    def voice(self, audio: bytes | None, voice_id: str | None) -> dict[str, np.ndarray]:
        return self.on_server(self.stages.voice, audio, voice_id)

    def speech_open(self, prompt: dict[str, np.ndarray], seed: int, codes: list[int], last: bool
                    ) -> tuple[str, np.ndarray]:
        return self.on_server(self.stages.speech_open, prompt, seed, codes, last)

    def speech_push(self, stream_id: str, codes: list[int], last: bool) -> np.ndarray:
        return self.on_server(self.stages.speech_push, stream_id, codes, last)

    def speech_cancel(self, stream_id: str) -> None:
        self.on_server(self.stages.speech_cancel, stream_id)

    def speech_offline(self, codes: list[int], prompt: dict[str, np.ndarray], seed: int) -> np.ndarray:
        return self.on_server(self.stages.speech_offline, codes, prompt, seed)

    def generator(self, is_cancelled: Callable[[], bool]):
        raise RuntimeError("a front serving requests side by side reaches the llm over gRPC, not BLS")
