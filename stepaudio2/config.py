"""Config dataclasses for the Hugging Face layout of Step-Audio-2 (spec §2.2).

`config.json` holds a `text_config` (a Qwen2 config) and an `audio_encoder_config` (Whisper-style encoder and
the adaptor). Every model dimension comes from here; nothing in the model code repeats these numbers.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from stepaudio2.errors import CheckpointError

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class AudioEncoderConfig:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    llm_dim: int
    kernel_size: int = 3
    adapter_stride: int = 2
    n_codebook_size: int = 4096  # unused at inference, kept for a faithful round trip


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class StepAudio2Config:
    text: TextConfig
    audio: AudioEncoderConfig
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _pick(section: dict[str, Any], cls: type, where: str) -> Any:
    names = {f.name for f in fields(cls)}
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [n for n in required if n not in section]
    if missing:
        raise CheckpointError(f"{CONFIG_FILE}: {where} lacks {', '.join(missing)}")
    return cls(**{k: v for k, v in section.items() if k in names})


def parse_config(raw: dict[str, Any]) -> StepAudio2Config:
    """Build the typed config from the parsed JSON of a real or tiny checkpoint."""
    for key in ("text_config", "audio_encoder_config"):
        if not isinstance(raw.get(key), dict):
            raise CheckpointError(f"{CONFIG_FILE}: missing object '{key}'")
    text = _pick(raw["text_config"], TextConfig, "text_config")
    audio = _pick(raw["audio_encoder_config"], AudioEncoderConfig, "audio_encoder_config")
    if audio.llm_dim != text.hidden_size:
        raise CheckpointError(
            f"{CONFIG_FILE}: audio_encoder_config.llm_dim={audio.llm_dim} != text_config.hidden_size={text.hidden_size}"
        )
    return StepAudio2Config(text=text, audio=audio, raw=raw)


def load_config(checkpoint_dir: str | Path) -> StepAudio2Config:
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint has no {CONFIG_FILE}: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    return parse_config(raw)


def qwen2_config(text: TextConfig):  # -> transformers.Qwen2Config (imported lazily: torch-free callers)
    """The Qwen2 config the LLM is built from, as configuration_step_audio_2.py derives it (spec §2.2)."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_theta,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    # SDPA keeps CPU decode fast and matches eager within fp32 rounding.
    cfg._attn_implementation = "sdpa"
    return cfg
