"""Writer of a small random flow checkpoint (flow.yaml + flow.pt) with the real layout and key names.

The yaml has the structure and `!new:` tags of the released file with small dimensions; the mel (80), speaker
(192) and vocabulary (6561) sizes stay real so that prompts, codes and HiFT work unchanged.
"""

from __future__ import annotations

from pathlib import Path

from stepaudio2.errors import InvalidInputError
from stepaudio2.token2wav.config import (
    FLOW_YAML,
    CFMConfig,
    DiTConfig,
    EncoderConfig,
    FlowConfig,
    flow_config_to_yaml,
)

MEL_BINS = 80
SPK_EMBED_DIM = 192
SPEECH_VOCAB = 6561

# (model dim, encoder blocks, up blocks, heads, FFN width, DiT depth, DiT hidden, DiT heads, DiT head dim)
_PRESETS: dict[str, tuple[int, int, int, int, int, int, int, int, int]] = {
    "tiny": (64, 2, 2, 4, 128, 2, 64, 4, 16),
    "small": (256, 4, 2, 4, 1024, 6, 256, 4, 64),
}
PRESETS = tuple(_PRESETS)


def tiny_flow_config(preset: str = "tiny") -> FlowConfig:
    if preset not in _PRESETS:
        raise InvalidInputError(f"unknown flow preset '{preset}' (choose from {', '.join(PRESETS)})")
    d, blocks, up_blocks, heads, ffn, depth, hidden, dit_heads, head_dim = _PRESETS[preset]
    encoder = EncoderConfig(
        input_size=d,
        output_size=d,
        attention_heads=heads,
        linear_units=ffn,
        num_blocks=blocks,
        num_up_blocks=up_blocks,
        pre_lookahead_len=3,
        up_stride=2,
        up_scale_factor=2.0,
        dropout_rate=0.1,
        positional_dropout_rate=0.1,
        attention_dropout_rate=0.1,
    )
    estimator = DiTConfig(
        in_channels=4 * MEL_BINS,
        out_channels=MEL_BINS,
        depth=depth,
        num_heads=dit_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        mlp_ratio=4.0,
    )
    return FlowConfig(
        input_size=d,
        output_size=MEL_BINS,
        spk_embed_dim=SPK_EMBED_DIM,
        vocab_size=SPEECH_VOCAB,
        encoder=encoder,
        decoder=CFMConfig(estimator=estimator, inference_cfg_rate=0.7),
    )


def write_tiny_flow(token2wav_dir: str | Path, seed: int, preset: str = "tiny") -> Path:
    """Write `flow.yaml` and `flow.pt` (fp32, random from `seed`) into `token2wav_dir`; returns the dir."""
    import torch
    from torch import nn

    from stepaudio2.token2wav.flow import FLOW_WEIGHTS, CausalMaskedDiffWithXvec

    cfg = tiny_flow_config(preset)
    out = Path(token2wav_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = f"Random token2wav flow written by stepaudio2.token2wav.tiny_flow (preset {preset}, seed {seed})."
    (out / FLOW_YAML).write_text(flow_config_to_yaml(cfg, header), encoding="utf-8")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CausalMaskedDiffWithXvec(cfg)
        # Default init leaves LayerNorms at identity; perturb them so a load that mixes up scale and shift
        # would show in the output.
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                    m.weight.add_(0.1 * torch.randn_like(m.weight))
                    m.bias.add_(0.1 * torch.randn_like(m.bias))
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    torch.save(state, out / FLOW_WEIGHTS)
    return out
