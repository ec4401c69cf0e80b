"""Tiny checkpoint maker: a random Step-Audio-2 checkpoint in exactly the real layout, from a seed, in seconds.

Same files as the Hugging Face repository (spec §2.1): config.json with `text_config` and
`audio_encoder_config`, sharded bf16 `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`, the
Qwen2-style tokenizer files, and every real parameter name at small dimensions. The `small` preset is large
enough that compute, not per-call overhead, dominates a benchmark. Loading code does not know the difference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinyPreset:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    # 2048 as in the real checkpoint: upstream's remote code hard-codes the adaptor width (not in config.json),
    # so any other width makes the checkpoint unloadable there. Our loader reads it back from the tensor shapes.
    adapter_hidden: int
    base_vocab_size: int
    num_shards: int


PRESETS: dict[str, TinyPreset] = {
    # tiny: 2 query heads / 1 KV head, so head_dim is 32 (vLLM's CPU attention takes 32, 64, 80, ... 512).
    "tiny": TinyPreset(64, 128, 2, 1, 2, 64, 4, 2, 2048, 1024, 2),
    "small": TinyPreset(512, 1408, 8, 2, 8, 384, 6, 6, 2048, 1024, 3),
}

# Presets with the real model vocabulary (158,720 rows, real special-token ids; the tiny BPE leaves most ids
# unused), so logits, sampling and the LM head cost what they will cost with the real checkpoint.
REAL_VOCAB_PRESETS = frozenset({"small"})

# Fields of the real config.json (spec §2.2) that do not depend on the size.
N_MELS = 128
N_AUDIO_CTX = 1500  # kept real: 25 s chunks need 1251 of the 1500 learned positions
MAX_SEQ_LEN = 16384


def _config_json(p: TinyPreset, vocab_size: int, eos_id: int) -> dict:
    return {
        "architectures": ["StepAudio2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_step_audio_2.StepAudio2Config",
            "AutoModelForCausalLM": "modeling_step_audio_2.StepAudio2ForCausalLM",
        },
        "model_type": "step_audio_2",
        "torch_dtype": "bfloat16",
        "text_config": {
            "hidden_size": p.hidden_size,
            "intermediate_size": p.intermediate_size,
            "num_attention_heads": p.num_attention_heads,
            "num_attention_groups": p.num_key_value_heads,
            "num_key_value_heads": p.num_key_value_heads,
            "num_hidden_layers": p.num_hidden_layers,
            "max_seq_len": MAX_SEQ_LEN,
            "vocab_size": vocab_size,
            "rms_norm_eps": 1e-06,
            "eos_token_id": eos_id,
            "pad_token_id": eos_id,
            "rope_theta": 1000000.0,
            "max_position_embeddings": MAX_SEQ_LEN,
            "rope_scaling": None,
            "torch_dtype": "bfloat16",
        },
        "audio_encoder_config": {
            "n_mels": N_MELS,
            "n_audio_ctx": N_AUDIO_CTX,
            "n_audio_state": p.n_audio_state,
            "n_audio_head": p.n_audio_head,
            "n_audio_layer": p.n_audio_layer,
            "n_codebook_size": 4096,
            "llm_dim": p.hidden_size,
            "kernel_size": 3,
            "adapter_stride": 2,
        },
    }


def _write_shards(state: dict, out: Path, num_shards: int) -> None:
    import torch
    from safetensors.torch import save_file

    names = list(state)
    per = -(-len(names) // num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(num_shards):
        shard = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: state[n].detach().to(torch.bfloat16).contiguous() for n in names[k * per : (k + 1) * per]}
        save_file(part, str(out / shard), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = shard
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_tiny_checkpoint(
    out_dir: str | Path, seed: int = 0, preset: str = "tiny", with_token2wav: bool = True
) -> Path:
    """Write a random checkpoint with the real layout into `out_dir` and return its path.

    with_token2wav=False skips `token2wav/` (LLM-only tests don't need it and it is the slower part).
    """
    import torch

    from stepaudio2.config import parse_config
    from stepaudio2.errors import InvalidInputError
    from stepaudio2.models.step_audio2 import StepAudio2ForCausalLM
    from stepaudio2.text.build import write_tokenizer_files
    from stepaudio2.text.tokenizer import StepAudio2Tokenizer

    if preset not in PRESETS:
        raise InvalidInputError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    p = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from stepaudio2.text.tokens import REAL_BASE_VOCAB_SIZE

    first_added = REAL_BASE_VOCAB_SIZE if preset in REAL_VOCAB_PRESETS else None
    vocab_size = write_tokenizer_files(out, base_vocab_size=p.base_vocab_size, first_added_id=first_added)
    tok = StepAudio2Tokenizer.from_dir(out)
    raw = _config_json(p, vocab_size, tok.special.endoftext)
    (out / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")

    torch.manual_seed(seed)
    model = StepAudio2ForCausalLM(parse_config(raw), adapter_hidden=p.adapter_hidden)
    _write_shards(model.state_dict(), out, p.num_shards)
    if with_token2wav:
        _write_token2wav(out / "token2wav", seed, preset)
    return out


def _write_token2wav(t2w_dir: Path, seed: int, preset: str) -> None:
    """token2wav/ (flow.yaml, flow.pt, hift.pt, stand-in ONNX front ends) with the real key names."""
    from stepaudio2.token2wav.tiny_flow import write_tiny_flow
    from stepaudio2.token2wav.tiny_hift import write_standin_onnx, write_tiny_hift

    t2w_dir.mkdir(parents=True, exist_ok=True)
    write_tiny_flow(t2w_dir, seed, preset)
    write_tiny_hift(t2w_dir, seed, preset)
    write_standin_onnx(t2w_dir, seed)
