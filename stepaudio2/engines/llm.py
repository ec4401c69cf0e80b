"""LLM backends behind one narrow interface, so the reference pipeline (and later the server) runs the same
loop on the torch modules or on exported ONNX graphs.

    encode_audio(mels, lengths) -> one (N_k, H) array per chunk
    embed(ids) -> (T, H) token embeddings
    prefill(embeds) -> (logits (V,), state)      state: the request's KV cache and position
    decode(state, token) -> logits (V,)

Everything crossing the interface is numpy; the audio splice (`splice_audio`) is shared by all backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stepaudio2.errors import InvalidInputError


def splice_audio(
    embeds: np.ndarray, audio_chunks: Sequence[np.ndarray], audio_spans: Sequence[tuple[int, int]]
) -> np.ndarray:
    """Write audio chunk k over span k = (first patch index, count) of the token embeddings (spec §1.5)."""
    if len(audio_chunks) != len(audio_spans):
        raise InvalidInputError(
            f"prompt has {len(audio_spans)} audio block(s) but {len(audio_chunks)} audio chunk(s) were encoded"
        )
    if not audio_spans:
        return embeds
    out = np.array(embeds, copy=True)
    for k, ((start, count), chunk) in enumerate(zip(audio_spans, audio_chunks, strict=True)):
        if chunk.shape[0] != count:
            raise InvalidInputError(
                f"audio chunk {k} has {chunk.shape[0]} embeddings but its block has {count} placeholders"
            )
        out[start : start + count] = chunk
    return out


class LLMBackend(Protocol):
    def encode_audio(self, mels: Sequence[np.ndarray], lengths: Sequence[int]) -> list[np.ndarray]: ...
    def embed(self, ids: Sequence[int]) -> np.ndarray: ...
    def prefill(self, embeds: np.ndarray) -> tuple[np.ndarray, Any]: ...
    def decode(self, state: Any, token: int) -> np.ndarray: ...


class TorchBackend:
    """The core torch modules (fp32, CPU): the ground truth."""

    def __init__(self, checkpoint_dir: str | Path) -> None:
        from stepaudio2.models.step_audio2 import load_model

        self.model = load_model(checkpoint_dir)

    def encode_audio(self, mels: Sequence[np.ndarray], lengths: Sequence[int]) -> list[np.ndarray]:
        import torch

        from stepaudio2.audio import pad_mels

        if not mels:
            return []
        batch, _ = pad_mels(list(mels))
        with torch.inference_mode():
            emb, n = self.model.encode_audio(torch.from_numpy(batch), torch.as_tensor(list(lengths)))
        return [emb[i, : int(n[i])].numpy() for i in range(emb.shape[0])]

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.model.embed_tokens(torch.as_tensor(list(ids), dtype=torch.long)).numpy()

    def prefill(self, embeds: np.ndarray) -> tuple[np.ndarray, Any]:
        import torch

        state = _TorchState(self.model.new_cache(), embeds.shape[0])
        with torch.inference_mode():
            logits, _ = self.model(torch.from_numpy(embeds)[None], torch.arange(embeds.shape[0])[None], state.cache)
        return logits[0, -1].numpy(), state

    def decode(self, state: Any, token: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            emb = self.model.model.embed_tokens(torch.tensor([[token]]))
            logits, _ = self.model(emb, torch.tensor([[state.position]]), state.cache)
        state.position += 1
        return logits[0, -1].numpy()


@dataclass
class _TorchState:
    cache: Any
    position: int


class OnnxBackend:
    """The exported graphs of a model repository (`stepaudio2 export`), run through a Runner."""

    def __init__(self, repository: str | Path, runner_kind: str = "onnx-cpu") -> None:
        from stepaudio2.config import load_config
        from stepaudio2.engines.runners import make_runner

        self.repository = Path(repository)
        self.runner_kind = runner_kind
        llm_dir = self.repository / "llm" / "1"
        self.decoder = make_runner(llm_dir / "llm_decoder.onnx", runner_kind)
        self.table = np.load(llm_dir / "embed_tokens.npy", mmap_mode="r")
        self.text_config = load_config(llm_dir).text
        t = self.text_config
        self.kv_shape = (t.num_hidden_layers, 1, t.num_key_value_heads, 0, t.head_dim)
        self._encoder = None

    @property
    def encoder(self):  # the LLM stage of the server never needs it, so load on first use
        if self._encoder is None:
            from stepaudio2.engines.runners import make_runner

            path = self.repository / "audio_encoder" / "1" / "audio_encoder.onnx"
            self._encoder = make_runner(path, self.runner_kind)
        return self._encoder

    def encode_audio(self, mels: Sequence[np.ndarray], lengths: Sequence[int]) -> list[np.ndarray]:
        from stepaudio2.audio import pad_mels

        if not mels:
            return []
        batch, _ = pad_mels(list(mels))
        frames = np.full(len(mels), batch.shape[2], np.int64)  # one request: its chunks padded together
        out = self.encoder(mel=batch, mel_lengths=np.asarray(lengths, dtype=np.int64), mel_frames=frames)
        return [out["audio_embeds"][i, : int(n)] for i, n in enumerate(out["embed_lengths"])]

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.table[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def _run(self, state: _OnnxState, embeds: np.ndarray) -> np.ndarray:
        n = embeds.shape[0]
        past = state.keys.shape[3]
        out = self.decoder(
            inputs_embeds=embeds[None].astype(np.float32),
            attention_mask=np.ones((1, past + n), dtype=np.int64),
            position_ids=np.arange(past, past + n, dtype=np.int64)[None],
            past_keys=state.keys,
            past_values=state.values,
        )
        state.keys, state.values = out["present_keys"], out["present_values"]
        return out["logits"][0, -1]

    def prefill(self, embeds: np.ndarray) -> tuple[np.ndarray, Any]:
        state = _OnnxState(np.zeros(self.kv_shape, np.float32), np.zeros(self.kv_shape, np.float32))
        return self._run(state, embeds), state

    def decode(self, state: Any, token: int) -> np.ndarray:
        return self._run(state, self.embed([token]))


@dataclass
class _OnnxState:
    keys: np.ndarray
    values: np.ndarray


ENGINES = ("torch", "onnx")


def make_backend(checkpoint_dir: str | Path, engine: str = "torch", repository: str | Path | None = None) -> LLMBackend:
    """torch: the checkpoint's modules. onnx: the exported graphs in `repository` (exported on demand)."""
    if engine == "torch":
        return TorchBackend(checkpoint_dir)
    if engine == "onnx":
        from stepaudio2.export.repository import export_checkpoint

        ckpt = Path(checkpoint_dir)
        # Beside the checkpoint, not inside it: the checkpoint's content hash must not see its own exports.
        repo = Path(repository) if repository else ckpt.parent / f"{ckpt.name}-onnx"
        export_checkpoint(checkpoint_dir, repo)  # no-op when already exported from this checkpoint
        return OnnxBackend(repo)
    raise InvalidInputError(f"unknown engine '{engine}' (available: {', '.join(ENGINES)})")
