"""StepAudio2ForCausalLM: audio encoder + adaptor + Qwen2 LLM with an untied lm_head (spec §1.5, §1.6, §2.3).

Top-level attribute names are the checkpoint prefixes: `encoder`, `adapter`, `model` (transformers' Qwen2Model)
and `lm_head`. The forward pass takes input embeddings, so adaptor outputs can be spliced in at the
`<audio_patch>` positions before the LLM runs; it returns logits and a KV cache for incremental decoding.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from stepaudio2.checkpoint import load_strict, read_state_dict, tensor_shapes
from stepaudio2.config import StepAudio2Config, load_config, qwen2_config
from stepaudio2.errors import CheckpointError
from stepaudio2.models.encoder import Adaptor, AudioEncoder

ADAPTER_HIDDEN_KEY = "adapter.linear1.weight"


def _cache_keyword() -> str:
    # transformers 5 renamed `past_key_values` to `cache`; accept both so GPU images with 4.x still work.
    from transformers import Qwen2Model

    params = inspect.signature(Qwen2Model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class StepAudio2ForCausalLM(nn.Module):
    def __init__(self, cfg: StepAudio2Config, adapter_hidden: int) -> None:
        super().__init__()
        from transformers import Qwen2Model

        self.cfg = cfg
        self.encoder = AudioEncoder(cfg.audio)
        self.adapter = Adaptor(cfg.audio, adapter_hidden)
        self.qwen2_config = qwen2_config(cfg.text)
        self.model = Qwen2Model(self.qwen2_config)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self._cache_kw = _cache_keyword()

    # ---- audio ---------------------------------------------------------------------------------------------
    def encode_audio(
        self, mels: torch.Tensor, mel_lengths: torch.Tensor, mel_frames: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded mels (B, n_mels, T) + valid mel lengths -> adaptor embeddings (B, N, H) and valid N per item.
        `mel_frames`: each item's own request batch length (see AudioEncoder.forward); None = one request."""
        hidden, enc_lengths = self.encoder(mels, mel_lengths, mel_frames)
        return self.adapter(hidden, enc_lengths)

    # ---- LLM -----------------------------------------------------------------------------------------------
    def new_cache(self):  # -> transformers.DynamicCache
        from transformers import DynamicCache

        return DynamicCache(config=self.qwen2_config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, object]:
        """(B, T, H) embeddings -> (B, T, V) logits and the updated cache (None when no cache was given)."""
        out = self.model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=cache is not None,
            **{self._cache_kw: cache},
        )
        return self.lm_head(out.last_hidden_state), cache


def load_model(checkpoint_dir: str | Path) -> StepAudio2ForCausalLM:
    """Build the model from config.json and load the safetensors shards strictly (fp32, CPU, eval mode)."""
    cfg = load_config(checkpoint_dir)
    shapes = tensor_shapes(checkpoint_dir)
    if ADAPTER_HIDDEN_KEY not in shapes:
        raise CheckpointError(f"checkpoint {checkpoint_dir}: missing tensor(s): {ADAPTER_HIDDEN_KEY}")
    model = StepAudio2ForCausalLM(cfg, adapter_hidden=shapes[ADAPTER_HIDDEN_KEY][0])
    load_strict(model, read_state_dict(checkpoint_dir), f"checkpoint {checkpoint_dir}")
    return model.eval()
