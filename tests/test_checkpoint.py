"""The tiny checkpoint has the real layout and names; strict loading names every bad tensor."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepaudio2.checkpoint import INDEX_FILE, read_state_dict, tensor_shapes, weight_map
from stepaudio2.config import load_config
from stepaudio2.errors import CheckpointError
from stepaudio2.models.step_audio2 import load_model

# Spec §2.3, written out: every key family with its shape as a function of the config.
# (E = n_audio_state, M = n_mels, A = adapter hidden, H = hidden, I = intermediate, V = vocab, KV = kv width)
FAMILIES = [
    (r"encoder\.conv1\.weight", "E,M,3"), (r"encoder\.conv1\.bias", "E"),
    (r"encoder\.conv2\.weight", "E,E,3"), (r"encoder\.conv2\.bias", "E"),
    (r"encoder\.positional_embedding\.weight", "C,E"),
    (r"encoder\.blocks\.\d+\.attn\.query\.weight", "E,E"), (r"encoder\.blocks\.\d+\.attn\.query\.bias", "E"),
    (r"encoder\.blocks\.\d+\.attn\.key\.weight", "E,E"),
    (r"encoder\.blocks\.\d+\.attn\.value\.weight", "E,E"), (r"encoder\.blocks\.\d+\.attn\.value\.bias", "E"),
    (r"encoder\.blocks\.\d+\.attn\.out\.weight", "E,E"), (r"encoder\.blocks\.\d+\.attn\.out\.bias", "E"),
    (r"encoder\.blocks\.\d+\.(attn_ln|mlp_ln)\.(weight|bias)", "E"),
    (r"encoder\.blocks\.\d+\.mlp\.0\.weight", "4E,E"), (r"encoder\.blocks\.\d+\.mlp\.0\.bias", "4E"),
    (r"encoder\.blocks\.\d+\.mlp\.2\.weight", "E,4E"), (r"encoder\.blocks\.\d+\.mlp\.2\.bias", "E"),
    (r"encoder\.after_norm\.(weight|bias)", "E"),
    (r"adapter\.conv\.weight", "E,E,3"), (r"adapter\.conv\.bias", "E"),
    (r"adapter\.linear1\.weight", "A,E"), (r"adapter\.linear1\.bias", "A"),
    (r"adapter\.linear2\.weight", "H,A"), (r"adapter\.linear2\.bias", "H"),
    (r"model\.embed_tokens\.weight", "V,H"),
    (r"model\.layers\.\d+\.self_attn\.q_proj\.weight", "H,H"), (r"model\.layers\.\d+\.self_attn\.q_proj\.bias", "H"),
    (r"model\.layers\.\d+\.self_attn\.(k|v)_proj\.weight", "KV,H"),
    (r"model\.layers\.\d+\.self_attn\.(k|v)_proj\.bias", "KV"),
    (r"model\.layers\.\d+\.self_attn\.o_proj\.weight", "H,H"),
    (r"model\.layers\.\d+\.mlp\.(gate|up)_proj\.weight", "I,H"),
    (r"model\.layers\.\d+\.mlp\.down_proj\.weight", "H,I"),
    (r"model\.layers\.\d+\.(input|post_attention)_layernorm\.weight", "H"),
    (r"model\.norm\.weight", "H"),
    (r"lm_head\.weight", "V,H"),
]
PER_ENCODER_LAYER = 15  # query w/b, key w, value w/b, out w/b, attn_ln w/b, mlp_ln w/b, mlp.0 w/b, mlp.2 w/b
PER_LLM_LAYER = 12  # q/k/v w+b, o w, gate/up/down w, two norms


def _dims(ckpt: Path) -> dict[str, int]:
    cfg = load_config(ckpt)
    a, t = cfg.audio, cfg.text
    shapes = tensor_shapes(ckpt)
    return {
        "E": a.n_audio_state, "M": a.n_mels, "C": a.n_audio_ctx, "A": shapes["adapter.linear1.weight"][0],
        "H": t.hidden_size, "I": t.intermediate_size, "V": t.vocab_size,
        "KV": t.num_key_value_heads * t.head_dim, "4E": 4 * a.n_audio_state, "3": 3,
    }


def test_every_name_and_shape_follows_the_real_layout(tiny_checkpoint: Path) -> None:
    shapes = tensor_shapes(tiny_checkpoint)
    dims = _dims(tiny_checkpoint)
    cfg = load_config(tiny_checkpoint)
    unmatched = []
    for name, shape in shapes.items():
        for pattern, spec in FAMILIES:
            if re.fullmatch(pattern, name):
                assert shape == tuple(dims[d] for d in spec.split(",")), (name, shape, spec)
                break
        else:
            unmatched.append(name)
    assert unmatched == []
    # Every layer family exists at its tiny count, and nothing more.
    enc_layers = {int(m.group(1)) for n in shapes if (m := re.match(r"encoder\.blocks\.(\d+)\.", n))}
    llm_layers = {int(m.group(1)) for n in shapes if (m := re.match(r"model\.layers\.(\d+)\.", n))}
    assert enc_layers == set(range(cfg.audio.n_audio_layer))
    assert llm_layers == set(range(cfg.text.num_hidden_layers))
    for i in enc_layers:
        assert sum(n.startswith(f"encoder.blocks.{i}.") for n in shapes) == PER_ENCODER_LAYER
    for i in llm_layers:
        assert sum(n.startswith(f"model.layers.{i}.") for n in shapes) == PER_LLM_LAYER
    # conv1/conv2 w+b + positions, after_norm, adapter (6), embed_tokens + norm, lm_head
    assert len(shapes) == 5 + PER_ENCODER_LAYER * len(enc_layers) + 2 + 6 + 2 + PER_LLM_LAYER * len(llm_layers) + 1


def test_layout_files_and_bf16_storage(tiny_checkpoint: Path) -> None:
    for name in ("config.json", INDEX_FILE, "vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json"):
        assert (tiny_checkpoint / name).is_file(), name
    shards = sorted(set(weight_map(tiny_checkpoint).values()))
    assert len(shards) >= 2 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    assert raw["model_type"] == "step_audio_2" and raw["architectures"] == ["StepAudio2ForCausalLM"]
    assert set(raw["text_config"]) >= {"hidden_size", "num_attention_groups", "max_seq_len", "rope_theta"}
    stored = load_file(str(tiny_checkpoint / shards[0]))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert {t.dtype for t in read_state_dict(tiny_checkpoint).values()} == {torch.float32}


def _copy_with(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    wm = weight_map(dst)
    for shard in sorted(set(wm.values())):
        tensors = load_file(str(dst / shard))
        tensors = edit(tensors)
        save_file(tensors, str(dst / shard))
    # Keep the index consistent with the edited shards, as a real broken checkpoint would be.
    index = json.loads((dst / INDEX_FILE).read_text())
    index["weight_map"] = {
        n: s for s in sorted(set(wm.values())) for n in load_file(str(dst / s))
    }
    (dst / INDEX_FILE).write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize(
    ("victim", "edit", "message"),
    [
        ("model.layers.1.mlp.up_proj.weight", lambda t, k: t.pop(k), "missing tensor(s): model.layers.1.mlp.up_proj.weight"),
        ("encoder.blocks.0.attn.key.weight", lambda t, k: t.__setitem__("encoder.blocks.0.attn.kee.weight", t.pop(k)),
         "unexpected tensor(s): encoder.blocks.0.attn.kee.weight"),
        ("adapter.linear2.bias", lambda t, k: t.__setitem__(k, t[k][:-1].clone()), "misshaped tensor(s): adapter.linear2.bias"),
    ],
)
def test_strict_loading_names_the_bad_tensor(tiny_checkpoint: Path, tmp_path: Path, victim, edit, message) -> None:
    def apply(tensors: dict) -> dict:
        if victim in tensors:
            edit(tensors, victim)
        return tensors

    broken = _copy_with(tiny_checkpoint, tmp_path / "broken", apply)
    with pytest.raises(CheckpointError) as err:
        load_model(broken)
    assert message in str(err.value)
    if "kee" in message:  # a rename is both unexpected and missing
        assert "missing tensor(s): encoder.blocks.0.attn.key.weight" in str(err.value)


def test_missing_shard_and_config_are_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "noshard"
    shutil.copytree(tiny_checkpoint, broken)
    shard = sorted(set(weight_map(broken).values()))[-1]
    (broken / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        load_model(broken)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(broken)
