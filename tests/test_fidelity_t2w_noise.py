"""Issue 14 item 8: token2wav's random draws equal upstream's.

Flow: upstream's flow.yaml seeds torch's global generator with 1986, then builds the conformer encoder, then the
DiT (default init + its initialize_weights), then the CFM draws `torch.randn([1, 80, 50 * 600])`. The recipe is
written out here layer by layer from upstream's constructors (our own code; shapes from the config), and the
buffer our flow holds must equal the one it leaves.

HiFT: upstream's SineGen2 draws rand(B, H) for the initial phases, then `randn_like(sine_waves)` where
sine_waves is a transposed view of (B, H, L) memory, and SourceModuleHnNSF2 then draws one unused
`randn_like(uv)`, (B, L, 1). Reproduced here with those very calls on torch's global generator.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepaudio2.token2wav.config import CFMConfig, DiTConfig, EncoderConfig, FlowConfig
from stepaudio2.token2wav.flow import load_flow
from stepaudio2.token2wav.hift import HiFTConfig, SourceModule, load_hift
from stepaudio2.token2wav.noise import upstream_noise_buffer
from stepaudio2.token2wav.tiny_flow import tiny_flow_config, write_tiny_flow
from stepaudio2.token2wav.tiny_hift import write_tiny_hift


def _linear(i: int, o: int, bias: bool = True) -> None:
    torch.empty(o, i).uniform_()  # kaiming_uniform_
    if bias:
        torch.empty(o).uniform_()


def _conv(i: int, o: int, k: int) -> None:
    torch.empty(o, i, k).uniform_()
    torch.empty(o).uniform_()


def upstream_flow_noise(cfg: FlowConfig) -> torch.Tensor:
    """Upstream's construction sequence for these dimensions, then its noise draw."""
    e, t = cfg.encoder, cfg.decoder.estimator
    d = e.output_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1986)
        # UpsampleConformerEncoderV2: embed (Linear + LayerNorm), after_norm (no draws), pre-lookahead convs,
        # conformer layers (attention q/k/v/out, linear_pos, xavier pos_bias_u/v; feed-forward w_1/w_2),
        # up_layer conv, up_embed, up conformer layers.
        def conformer_layer() -> None:
            _linear(d, d)
            _linear(d, d, bias=e.key_bias)
            _linear(d, d)
            _linear(d, d)
            _linear(d, d, bias=False)
            torch.empty(e.attention_heads, d // e.attention_heads).uniform_()
            torch.empty(e.attention_heads, d // e.attention_heads).uniform_()
            _linear(d, e.linear_units)
            _linear(e.linear_units, d)

        _linear(e.input_size, d)
        _conv(d, d, e.pre_lookahead_len + 1)
        _conv(d, d, 3)
        for _ in range(e.num_blocks):
            conformer_layer()
        _conv(d, d, 2 * e.up_stride + 1)
        _linear(e.input_size, d)
        for _ in range(e.num_up_blocks):
            conformer_layer()
        # DiT: t_embedder MLP, in_proj, blocks (attention, MLP, causal convs, adaLN), final layer ...
        h, inner, mlp = t.hidden_size, t.num_heads * t.head_dim, int(t.hidden_size * t.mlp_ratio)
        linears: list[tuple[int, int]] = []

        def lin(i: int, o: int) -> None:
            _linear(i, o)
            linears.append((i, o))

        lin(256, h)
        lin(h, h)
        lin(t.in_channels, h)
        for _ in range(t.depth):
            for _ in range(3):
                lin(h, inner)
            lin(inner, h)
            lin(h, mlp)
            lin(mlp, h)
            _conv(h, h, 3)
            _conv(h, h, 3)
            lin(h, 9 * h)
        lin(h, 2 * h)
        lin(h, t.out_channels)
        # ... then initialize_weights: xavier on every Linear, normal_ on the two timestep weights.
        for i, o in linears:
            torch.empty(o, i).uniform_()
        torch.empty(h, 256).normal_()
        torch.empty(h, h).normal_()
        return torch.randn([1, t.out_channels, 50 * 600])


def _real_config() -> FlowConfig:
    enc = EncoderConfig(input_size=512, output_size=512, attention_heads=8, linear_units=2048, num_blocks=6,
                        num_up_blocks=4)
    dit = DiTConfig(in_channels=320, out_channels=80, depth=16, num_heads=8, head_dim=64, hidden_size=512)
    return FlowConfig(input_size=512, output_size=80, spk_embed_dim=192, vocab_size=6561, encoder=enc,
                      decoder=CFMConfig(estimator=dit))


@pytest.mark.parametrize("preset", ["tiny", "small", "real"])
def test_flow_noise_buffer_equals_upstream(preset: str, tmp_path: Path) -> None:
    cfg = _real_config() if preset == "real" else tiny_flow_config(preset)
    expect = upstream_flow_noise(cfg)
    state = torch.get_rng_state()
    got = upstream_noise_buffer(cfg)
    assert torch.equal(torch.get_rng_state(), state)  # the process's generator is left alone
    assert got.shape == (1, 80, 30000) and torch.equal(got, expect)
    # The old draw (a fresh generator seeded 1986) is a different buffer: the test sees the difference.
    assert not torch.equal(expect, torch.randn(1, 80, 30000, generator=torch.Generator().manual_seed(1986)))
    if preset == "tiny":  # and the flow as loaded holds it
        assert torch.equal(load_flow(write_tiny_flow(tmp_path, seed=3)).decoder.rand_noise, expect)


def _recover_noise(source: SourceModule, f0: torch.Tensor, gen: torch.Generator, k: int) -> torch.Tensor:
    """Harmonic k's noise of one call: with f0 = 0 the excitation is pure noise of amplitude sine_amp / 3, and
    an l_linear that picks harmonic k makes the output tanh(amp / 3 * noise_k)."""
    with torch.no_grad():
        source.l_linear.weight.zero_()
        source.l_linear.weight[0, k] = 1.0
        source.l_linear.bias.zero_()
        out = source(f0, gen)
    return torch.atanh(out[..., 0].double()) * 3 / source.sine_amp


@pytest.mark.parametrize("which", ["default", "tiny"])
def test_hift_source_noise_equals_upstream_per_stream(which: str, tmp_path: Path) -> None:
    source = SourceModule(HiFTConfig()) if which == "default" else load_hift(write_tiny_hift(tmp_path, 0)).m_source
    b, length, h = 2, 960, source.num_harmonics
    f0 = torch.zeros(b, length, 1)
    with torch.random.fork_rng(devices=[]):  # upstream: torch's global generator, three draws per call
        torch.manual_seed(7)
        expect = []
        for _ in range(2):  # two consecutive calls, as for two streamed chunks
            torch.rand(b, h)
            sine_waves = torch.zeros(b, h, length).transpose(1, 2)
            expect.append(torch.randn_like(sine_waves))
            torch.randn_like(torch.zeros(b, length, 1))
        contiguous = torch.randn(b, length, h, generator=torch.Generator().manual_seed(7))
    for k in (0, 3, h - 1):
        gen = torch.Generator().manual_seed(7)  # one stream's generator across its calls
        for call in range(2):
            got = _recover_noise(source, f0, gen, k)
            torch.testing.assert_close(got, expect[call][..., k].double(), atol=1e-4, rtol=1e-4)
    # A contiguous randn of the same shape (the old draw) gives other values.
    assert not torch.allclose(expect[0], contiguous, atol=1e-3)
