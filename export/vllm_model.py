"""The LLM half of a Step-Audio-2 checkpoint as a plain Hugging Face `Qwen2ForCausalLM` folder for vLLM.

vLLM serves the `llm` model from prompt embeddings (audio is spliced in before the engine sees the prompt), so
it needs only the Qwen2 decoder: config.json (`Qwen2ForCausalLM`, from the checkpoint's `text_config`) and the
decoder tensors, one output shard per input shard so a 16 GB checkpoint never sits in memory at once.
The encoder and adaptor tensors stay out: vLLM's loader would reject names its Qwen2 does not have.
"""

from __future__ import annotations

import json
from pathlib import Path

from stepaudio2.checkpoint import INDEX_FILE, weight_map

# Step-Audio-2 name prefix -> Qwen2ForCausalLM name prefix. The decoder already uses transformers' Qwen2 names
# (spec §2.3), so the map is the identity on these prefixes and drops everything else (encoder., adapter.).
KEY_PREFIXES = {"model.": "model.", "lm_head.": "lm_head."}


def map_key(name: str) -> str | None:
    """The Qwen2ForCausalLM name of a checkpoint tensor, or None when it is not part of the decoder."""
    for src, dst in KEY_PREFIXES.items():
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def qwen2_config_dict(checkpoint: Path) -> dict:
    from stepaudio2.config import load_config, qwen2_config

    cfg = load_config(checkpoint)
    out = qwen2_config(cfg.text).to_dict()
    out.pop("_attn_implementation", None)
    eos = cfg.text.eos_token_id
    out.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", torch_dtype="bfloat16",
               eos_token_id=eos, bos_token_id=None)
    return out


def write_qwen2_folder(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write config.json + filtered safetensors shards + index into `out_dir` (replaced if present)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt, out = Path(checkpoint), Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map(ckpt).items():
        if map_key(name) is not None:
            by_shard.setdefault(shard, []).append(name)
    index: dict[str, str] = {}
    total = 0
    for k, (shard, names) in enumerate(sorted(by_shard.items())):
        target = f"model-{k + 1:05d}-of-{len(by_shard):05d}.safetensors"
        with safe_open(ckpt / shard, framework="pt") as f:
            part = {map_key(n): f.get_tensor(n) for n in names}
        save_file(part, str(out / target), metadata={"format": "pt"})
        for n, t in part.items():
            index[n] = target
            total += t.numel() * t.element_size()
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))
    (out / "config.json").write_text(json.dumps(qwen2_config_dict(ckpt), indent=2) + "\n")
    return out
