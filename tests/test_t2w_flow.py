"""token2wav flow: config parsing, key names, strict loading, offline and streaming inference, batched steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from stepaudio2.errors import CheckpointError, InvalidInputError
from stepaudio2.token2wav.config import (
    CFMConfig,
    DiTConfig,
    EncoderConfig,
    FlowConfig,
    load_flow_config,
    load_yaml_values,
    parse_flow_config,
)
from stepaudio2.token2wav.flow import (
    CONFORMER_CACHE_KEEP_TOKENS,
    ESTIMATOR_CACHE_KEEP_FRAMES,
    CausalMaskedDiffWithXvec,
    FlowStreamState,
    load_flow,
)
from stepaudio2.token2wav.tiny_flow import write_tiny_flow

from .conftest import TORCH_EXTRA, require_module
from .flow_oracle import spec_offline

# Batched steps differ from single-stream steps only in the last bits: CPU GEMM kernels pick a different
# blocking for a different number of rows (e.g. the timestep conditioning has one row per batch row), so the
# rounding depends on the batch size. Padding itself is exact (valid keys are packed first). Bound: 1e-6 of the
# tensor's largest magnitude, i.e. a few float32 ulps.
BATCH_REL = 1e-6


def assert_batch_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    assert diff <= BATCH_REL * max(1.0, float(ref.abs().max())), diff


@dataclass(frozen=True)
class FakePrompt:
    """Shaped like stepaudio2.token2wav.prompt.VoicePrompt."""

    tokens: np.ndarray
    xvector: np.ndarray
    mel: np.ndarray
    key: str = ""


def make_prompt(seed: int, n_tokens: int, mel_frames: int | None = None) -> FakePrompt:
    rng = np.random.default_rng(seed)
    frames = 2 * n_tokens if mel_frames is None else mel_frames
    return FakePrompt(
        tokens=rng.integers(0, 6561, n_tokens).astype(np.int64),
        xvector=rng.standard_normal(192).astype(np.float32),
        mel=rng.standard_normal((frames, 80)).astype(np.float32) - 5.0,
        key=f"fake-{seed}-{n_tokens}-{frames}",
    )


def make_codes(seed: int, n: int) -> list[int]:
    return [int(c) for c in np.random.default_rng(seed).integers(0, 6561, n)]


def plan(codes: list[int]) -> list[tuple[list[int], bool]]:
    """The client chunk rule: 25 codes + 3 lookahead per chunk, the rest as the last chunk."""
    buf, out = list(codes), []
    while len(buf) >= 28:
        out.append((buf[:28], False))
        buf = buf[25:]
    return out + [(buf, True)]


def run_stream(flow: CausalMaskedDiffWithXvec, state: FlowStreamState, codes: list[int]) -> list[torch.Tensor]:
    return [flow.stream_chunk(state, chunk, last) for chunk, last in plan(codes)]


@pytest.fixture(scope="session")
def flow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_flow(tmp_path_factory.mktemp("t2w_flow"), seed=0, preset="tiny")


@pytest.fixture(scope="session")
def flow(flow_dir: Path) -> CausalMaskedDiffWithXvec:
    return load_flow(flow_dir)


# ---- config ---------------------------------------------------------------------------------------------------


def test_tiny_yaml_has_the_real_tags_and_parses(flow_dir: Path) -> None:
    text = (flow_dir / "flow.yaml").read_text()
    for tag in ("!new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec", "!new:cosyvoice2.flow.decoder_dit.DiT",
                "!new:cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2",
                "!new:cosyvoice2.flow.flow_matching.CausalConditionalCFM"):
        assert tag in text
    cfg = load_flow_config(flow_dir)
    assert cfg.encoder.output_size == 64 and cfg.decoder.estimator.depth == 2
    assert (cfg.output_size, cfg.spk_embed_dim, cfg.vocab_size) == (80, 192, 6561)
    assert cfg.pre_lookahead_len == 3 and cfg.token_mel_ratio == 2


REAL_STYLE_YAML = """
__set_seed1: !apply:random.seed [1986]
sample_rate: 24000
model_dim: 512
llm: !name:some.module.Factory
flow: !new:cosyvoice2.flow.flow.CausalMaskedDiffWithXvec
    input_size: !ref <model_dim>
    output_size: 80
    spk_embed_dim: 192
    output_type: 'mel'
    vocab_size: 6561
    encoder: !new:cosyvoice2.transformer.upsample_encoder_v2.UpsampleConformerEncoderV2
        input_size: 512
        output_size: 512
        input_layer: 'linear'
        pre_lookahead_len: 3
        num_blocks: 6
        num_up_blocks: 4
        up_stride: 2
        up_scale_factor: 2
        attention_heads: 8
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        key_bias: true
        linear_units: 2048
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: true
    decoder: !new:cosyvoice2.flow.flow_matching.CausalConditionalCFM
        inference_cfg_rate: 0.7
        estimator: !new:cosyvoice2.flow.decoder_dit.DiT
            in_channels: 320
            out_channels: 80
            mlp_ratio: 4.0
            depth: 16
            num_heads: 8
            head_dim: 64
            hidden_size: 512
"""


def test_hyperpyyaml_tags_are_tolerated_and_refs_resolved() -> None:
    cfg = parse_flow_config(load_yaml_values(REAL_STYLE_YAML))
    assert cfg.input_size == 512 and cfg.encoder.num_up_blocks == 4 and cfg.decoder.estimator.hidden_size == 512
    assert cfg.decoder.inference_cfg_rate == pytest.approx(0.7)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(CheckpointError, match="num_blocks is missing"):
        parse_flow_config(load_yaml_values(REAL_STYLE_YAML.replace("        num_blocks: 6\n", "")))
    with pytest.raises(CheckpointError, match="estimator"):
        parse_flow_config(load_yaml_values(REAL_STYLE_YAML.replace("decoder_dit.DiT", "decoder.ConditionalDecoder")))
    with pytest.raises(CheckpointError, match="pos_enc_layer_type"):
        parse_flow_config(load_yaml_values(REAL_STYLE_YAML.replace("'rel_pos_espnet'", "'rel_pos'")))
    with pytest.raises(CheckpointError, match="in_channels"):
        parse_flow_config(load_yaml_values(REAL_STYLE_YAML.replace("in_channels: 320", "in_channels: 240")))


# ---- key names ------------------------------------------------------------------------------------------------


def _real_config() -> FlowConfig:
    enc = EncoderConfig(input_size=512, output_size=512, attention_heads=8, linear_units=2048, num_blocks=6,
                        num_up_blocks=4)
    dit = DiTConfig(in_channels=320, out_channels=80, depth=16, num_heads=8, head_dim=64, hidden_size=512)
    return FlowConfig(input_size=512, output_size=80, spk_embed_dim=192, vocab_size=6561, encoder=enc,
                      decoder=CFMConfig(estimator=dit))


def _spec_keys() -> dict[str, tuple[int, ...]]:
    """flow.pt names and shapes of spec §2.4, for the released dimensions."""
    keys: dict[str, tuple[int, ...]] = {
        "input_embedding.weight": (6561, 512),
        "spk_embed_affine_layer.weight": (80, 192), "spk_embed_affine_layer.bias": (80,),
        "encoder_proj.weight": (80, 512), "encoder_proj.bias": (80,),
        "encoder.pre_lookahead_layer.conv1.weight": (512, 512, 4), "encoder.pre_lookahead_layer.conv1.bias": (512,),
        "encoder.pre_lookahead_layer.conv2.weight": (512, 512, 3), "encoder.pre_lookahead_layer.conv2.bias": (512,),
        "encoder.up_layer.conv.weight": (512, 512, 5), "encoder.up_layer.conv.bias": (512,),
        "encoder.after_norm.weight": (512,), "encoder.after_norm.bias": (512,),
        "decoder.estimator.t_embedder.mlp.0.weight": (512, 256), "decoder.estimator.t_embedder.mlp.0.bias": (512,),
        "decoder.estimator.t_embedder.mlp.2.weight": (512, 512), "decoder.estimator.t_embedder.mlp.2.bias": (512,),
        "decoder.estimator.in_proj.weight": (512, 320), "decoder.estimator.in_proj.bias": (512,),
        "decoder.estimator.final_layer.adaLN_modulation.1.weight": (1024, 512),
        "decoder.estimator.final_layer.adaLN_modulation.1.bias": (1024,),
        "decoder.estimator.final_layer.linear.weight": (80, 512),
        "decoder.estimator.final_layer.linear.bias": (80,),
    }
    for emb in ("embed", "up_embed"):
        keys |= {f"encoder.{emb}.out.0.weight": (512, 512), f"encoder.{emb}.out.0.bias": (512,),
                 f"encoder.{emb}.out.1.weight": (512,), f"encoder.{emb}.out.1.bias": (512,)}
    blocks = [f"encoder.encoders.{i}" for i in range(6)] + [f"encoder.up_encoders.{i}" for i in range(4)]
    for b in blocks:
        for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
            keys |= {f"{b}.self_attn.{lin}.weight": (512, 512), f"{b}.self_attn.{lin}.bias": (512,)}
        keys |= {f"{b}.self_attn.linear_pos.weight": (512, 512), f"{b}.self_attn.pos_bias_u": (8, 64),
                 f"{b}.self_attn.pos_bias_v": (8, 64),
                 f"{b}.feed_forward.w_1.weight": (2048, 512), f"{b}.feed_forward.w_1.bias": (2048,),
                 f"{b}.feed_forward.w_2.weight": (512, 2048), f"{b}.feed_forward.w_2.bias": (512,)}
        for norm in ("norm_ff", "norm_mha"):
            keys |= {f"{b}.{norm}.weight": (512,), f"{b}.{norm}.bias": (512,)}
    for i in range(16):
        b = f"decoder.estimator.blocks.{i}"
        for lin in ("to_q", "to_k", "to_v", "proj"):
            keys |= {f"{b}.attn.{lin}.weight": (512, 512), f"{b}.attn.{lin}.bias": (512,)}
        for norm in ("q_norm", "k_norm"):
            keys |= {f"{b}.attn.{norm}.weight": (64,), f"{b}.attn.{norm}.bias": (64,)}
        keys |= {f"{b}.mlp.fc1.weight": (2048, 512), f"{b}.mlp.fc1.bias": (2048,),
                 f"{b}.mlp.fc2.weight": (512, 2048), f"{b}.mlp.fc2.bias": (512,),
                 f"{b}.conv.block.1.weight": (512, 512, 3), f"{b}.conv.block.1.bias": (512,),
                 f"{b}.conv.block.3.weight": (512,), f"{b}.conv.block.3.bias": (512,),
                 f"{b}.conv.block.6.weight": (512, 512, 3), f"{b}.conv.block.6.bias": (512,),
                 f"{b}.adaLN_modulation.1.weight": (4608, 512), f"{b}.adaLN_modulation.1.bias": (4608,)}
    return keys


def test_state_dict_names_and_shapes_are_the_released_ones() -> None:
    with torch.device("meta"):
        model = CausalMaskedDiffWithXvec(_real_config())
    found = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert found == _spec_keys()
    assert "decoder.rand_noise" not in found  # non-persistent


# ---- strict loading -------------------------------------------------------------------------------------------


def _copy_with(flow_dir: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "flow.yaml").write_text((flow_dir / "flow.yaml").read_text())
    state = torch.load(flow_dir / "flow.pt", weights_only=True)
    edit(state)
    torch.save(state, dst / "flow.pt")
    return dst


def test_strict_loading_names_missing_misshaped_and_unexpected(flow_dir: Path, tmp_path: Path) -> None:
    name = "decoder.estimator.blocks.1.attn.to_k.weight"
    d = _copy_with(flow_dir, tmp_path / "missing", lambda s: s.pop(name))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): " + name.replace(".", r"\.")):
        load_flow(d)
    shaped = "encoder.up_encoders.0.self_attn.pos_bias_u"
    d = _copy_with(flow_dir, tmp_path / "shape", lambda s: s.__setitem__(shaped, torch.zeros(4, 8)))
    with pytest.raises(CheckpointError, match=r"misshaped.*" + shaped.replace(".", r"\.")):
        load_flow(d)
    d = _copy_with(flow_dir, tmp_path / "extra", lambda s: s.__setitem__("encoder.embed.pos_enc.pe", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected.*encoder\.embed\.pos_enc\.pe"):
        load_flow(d)
    (tmp_path / "nofile").mkdir()
    with pytest.raises(CheckpointError, match="flow.yaml"):
        load_flow(tmp_path / "nofile")


def test_noise_buffer_is_fixed_and_not_stored(flow_dir: Path, flow: CausalMaskedDiffWithXvec) -> None:
    assert flow.decoder.rand_noise.shape == (1, 80, 50 * 600)
    assert torch.equal(load_flow(flow_dir).decoder.rand_noise, flow.decoder.rand_noise)
    assert "decoder.rand_noise" not in torch.load(flow_dir / "flow.pt", weights_only=True)


# ---- offline --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 33])
def test_offline_gives_two_frames_per_code(flow: CausalMaskedDiffWithXvec, n: int) -> None:
    codes, prompt = make_codes(n, n), make_prompt(1, 20)
    mel = flow.inference(codes, prompt)
    assert mel.shape == (80, 2 * n) and torch.isfinite(mel).all()
    torch.testing.assert_close(mel, spec_offline(flow, codes, prompt), rtol=1e-5, atol=1e-5)



def test_offline_is_deterministic_and_uses_the_prompt(flow: CausalMaskedDiffWithXvec) -> None:
    codes = make_codes(2, 30)
    a = flow.inference(codes, make_prompt(1, 20))
    assert torch.equal(a, flow.inference(codes, make_prompt(1, 20)))
    assert not torch.allclose(a, flow.inference(codes, make_prompt(3, 20)))


def test_offline_batch_matches_single_requests(flow: CausalMaskedDiffWithXvec) -> None:
    prompts = [make_prompt(4, 17), make_prompt(5, 30)]
    codes = [make_codes(6, 21), make_codes(7, 9)]
    batched = flow.inference_batch(codes, prompts)
    for b, c, p in zip(batched, codes, prompts, strict=True):
        torch.testing.assert_close(b, flow.inference(c, p), rtol=1e-5, atol=1e-5)


def test_misaligned_prompt_mel_is_trimmed(flow: CausalMaskedDiffWithXvec) -> None:
    p = make_prompt(8, 20, mel_frames=37)  # 18 whole tokens of mel
    assert flow.inference(make_codes(9, 10), p).shape == (80, 20)
    state = flow.setup_stream(p)
    assert state.prompt_tokens == 18 and state.prompt_mel_len == 36 and state.noise_offset == 36


def test_offline_rejects_bad_input(flow: CausalMaskedDiffWithXvec) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        flow.inference([], make_prompt(1, 10))
    with pytest.raises(InvalidInputError, match="6561"):
        flow.inference([1, 6561], make_prompt(1, 10))
    with pytest.raises(InvalidInputError, match="-3"):
        flow.inference([-3], make_prompt(1, 10))
    bad = FakePrompt(np.zeros(0, np.int64), np.zeros(192, np.float32), np.zeros((0, 80), np.float32))
    with pytest.raises(InvalidInputError, match="no speech tokens"):
        flow.inference([1], bad)
    with pytest.raises(InvalidInputError, match="xvector"):
        flow.inference([1], FakePrompt(np.zeros(4, np.int64), np.zeros(10, np.float32), np.zeros((8, 80), np.float32)))


# ---- module-level consistency ---------------------------------------------------------------------------------


def test_single_chunk_paths_equal_offline_paths(flow: CausalMaskedDiffWithXvec) -> None:
    """With no cache, one chunk sees the whole sequence: chunk and offline code paths must agree."""
    g = torch.Generator().manual_seed(0)
    enc = flow.encoder
    xs = torch.randn(1, 23, enc.cfg.input_size, generator=g)
    full, _ = enc(xs, torch.tensor([23]))
    chunk = enc.forward_chunk(xs, last=True)[0]
    torch.testing.assert_close(chunk, full, rtol=1e-5, atol=1e-5)

    est = flow.decoder.estimator
    b, t = 2, 19
    x, mu, cond = (torch.randn(b, 80, t, generator=g) for _ in range(3))
    tt, spks = torch.rand(b, generator=g), torch.randn(b, 80, generator=g)
    v = est(x, torch.ones(b, 1, t), mu, tt, spks, cond)
    cnn = torch.zeros(len(est.blocks), b, est.cnn_cache_channels, 2)
    att = torch.zeros(len(est.blocks), b, est.cfg.num_heads, 0, est.att_cache_width)
    vc, new_cnn, new_att = est.forward_chunk(x, mu, tt, spks, cond, cnn, att, torch.zeros(b, dtype=torch.long),
                                             torch.full((b,), t))
    torch.testing.assert_close(vc, v, rtol=1e-5, atol=1e-5)
    assert new_att.shape == (len(est.blocks), b, est.cfg.num_heads, t, est.att_cache_width)


def test_estimator_chunk_handles_ragged_rows(flow: CausalMaskedDiffWithXvec) -> None:
    """Rows with different cache and chunk lengths, padded into one call, equal one call per row."""
    est = flow.decoder.estimator
    g = torch.Generator().manual_seed(1)
    depth, heads, width = len(est.blocks), est.cfg.num_heads, est.att_cache_width
    rows = [(0, 9), (14, 4), (6, 1)]  # (cache length, chunk length)
    per_row = []
    for cl, ch in rows:
        per_row.append((torch.randn(1, 80, ch, generator=g), torch.randn(1, 80, ch, generator=g),
                        torch.rand(1, generator=g), torch.randn(1, 80, generator=g), torch.randn(1, 80, ch, generator=g),
                        torch.randn(depth, 1, est.cnn_cache_channels, 2, generator=g),
                        torch.randn(depth, 1, heads, cl, width, generator=g)))
    big_c, big_l = max(c for _, c in rows), max(c for c, _ in rows)

    def pad(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, size - x.shape[dim]])

    args = [
        torch.cat([pad(r[0], 2, big_c) for r in per_row]), torch.cat([pad(r[1], 2, big_c) for r in per_row]),
        torch.cat([r[2] for r in per_row]), torch.cat([r[3] for r in per_row]),
        torch.cat([pad(r[4], 2, big_c) for r in per_row]), torch.cat([r[5] for r in per_row], dim=1),
        torch.cat([pad(r[6], 3, big_l) for r in per_row], dim=1),
        torch.tensor([c for c, _ in rows]), torch.tensor([c for _, c in rows]),
    ]
    v, cnn, att = est.forward_chunk(*args)
    for i, ((cl, ch), r) in enumerate(zip(rows, per_row, strict=True)):
        v1, cnn1, att1 = est.forward_chunk(*r, torch.tensor([cl]), torch.tensor([ch]))
        assert_batch_close(v[i : i + 1, :, :ch], v1)
        assert_batch_close(cnn[:, i : i + 1], cnn1)
        assert_batch_close(att[:, i : i + 1, :, : cl + ch], att1)


# ---- streaming ------------------------------------------------------------------------------------------------


def test_streaming_gives_two_frames_per_code(flow: CausalMaskedDiffWithXvec) -> None:
    codes = make_codes(10, 83)
    state = flow.setup_stream(make_prompt(11, 25))
    mels = run_stream(flow, state, codes)
    assert [m.shape[1] for m in mels] == [50, 50, 50, 16]
    assert sum(m.shape[1] for m in mels) == 2 * len(codes) == state.frames_out
    assert state.finished
    offline = flow.inference(codes, make_prompt(11, 25))
    assert offline.shape == torch.cat(mels, dim=1).shape
    with pytest.raises(InvalidInputError, match="already"):
        flow.stream_chunk(state, [1, 2, 3, 4], False)


def test_stream_caches_stay_bounded(flow: CausalMaskedDiffWithXvec) -> None:
    p = make_prompt(12, 10)
    state = flow.setup_stream(p)
    buf = make_codes(13, 28 + 25 * 7)
    for _ in range(8):
        flow.stream_chunk(state, buf[:28], False)
        buf = buf[25:]
    assert state.noise_offset == 20 + ESTIMATOR_CACHE_KEEP_FRAMES
    assert state.att_cache.shape[3] == 10 + CONFORMER_CACHE_KEEP_TOKENS
    assert state.up_att_cache.shape[3] == 2 * (10 + CONFORMER_CACHE_KEEP_TOKENS)


def test_stream_chunk_rejects_bad_chunks(flow: CausalMaskedDiffWithXvec) -> None:
    state = flow.setup_stream(make_prompt(14, 12))
    before = state.estimator_att_cache
    with pytest.raises(InvalidInputError, match="lookahead"):
        flow.stream_chunk(state, [1, 2, 3], False)
    with pytest.raises(InvalidInputError, match="outside"):
        flow.stream_chunk(state, [1, 2, 3, 7000], False)
    assert state.estimator_att_cache is before and state.frames_out == 0  # untouched
    assert flow.stream_chunk(state, [], True).shape == (80, 0)


def test_interleaved_streams_equal_streams_alone(flow: CausalMaskedDiffWithXvec) -> None:
    pa, pb = make_prompt(15, 18), make_prompt(16, 26)
    ca, cb = make_codes(17, 70), make_codes(18, 55)
    alone_a = run_stream(flow, flow.setup_stream(pa), ca)
    alone_b = run_stream(flow, flow.setup_stream(pb), cb)
    sa, sb = flow.setup_stream(pa), flow.setup_stream(pb)
    plan_a, plan_b = plan(ca), plan(cb)
    got_a, got_b = [], []
    for k in range(max(len(plan_a), len(plan_b))):
        if k < len(plan_b):
            got_b.append(flow.stream_chunk(sb, *plan_b[k]))
        if k < len(plan_a):
            got_a.append(flow.stream_chunk(sa, *plan_a[k]))
    assert torch.equal(torch.cat(got_a, 1), torch.cat(alone_a, 1))
    assert torch.equal(torch.cat(got_b, 1), torch.cat(alone_b, 1))


def test_copied_voice_state_gives_the_same_stream(flow: CausalMaskedDiffWithXvec) -> None:
    template = flow.setup_stream(make_prompt(19, 15))
    codes = make_codes(20, 40)
    first = run_stream(flow, template.copy(), codes)
    second = run_stream(flow, template.copy(), codes)
    assert torch.equal(torch.cat(first, 1), torch.cat(second, 1))
    assert template.frames_out == 0 and not template.finished


def test_batched_step_over_three_streams_equals_each_alone(flow: CausalMaskedDiffWithXvec) -> None:
    prompts = [make_prompt(21, 20), make_prompt(22, 11), make_prompt(23, 31)]
    codes = [make_codes(24, 80), make_codes(25, 31), make_codes(26, 57)]
    alone = [torch.cat(run_stream(flow, flow.setup_stream(p), c), 1) for p, c in zip(prompts, codes, strict=True)]

    plans = [plan(c) for c in codes]
    states = [flow.setup_stream(p) for p in prompts]
    got: list[list[torch.Tensor]] = [[] for _ in prompts]
    for r in range(max(len(p) for p in plans)):
        idx = [i for i in range(3) if r < len(plans[i])]
        mels = flow.batched_stream_step([states[i] for i in idx], [plans[i][r][0] for i in idx],
                                        [plans[i][r][1] for i in idx])
        for i, m in zip(idx, mels, strict=True):
            got[i].append(m)
    for a, g in zip(alone, got, strict=True):
        assert_batch_close(torch.cat(g, 1), a)
    with pytest.raises(InvalidInputError, match="twice"):
        s = flow.setup_stream(prompts[0])
        flow.batched_stream_step([s, s], [codes[0][:28]] * 2, [False, False])


def test_estimator_chunk_exports_to_onnx_with_dynamic_batch(flow: CausalMaskedDiffWithXvec, tmp_path: Path) -> None:
    """Guards export-friendliness of the streaming estimator (ragged batch through ONNX Runtime)."""
    ort = require_module("onnxruntime", TORCH_EXTRA)
    from torch.export import Dim

    from stepaudio2.token2wav.dit import EstimatorChunk

    est = flow.decoder.estimator
    depth, heads, width = len(est.blocks), est.cfg.num_heads, est.att_cache_width

    def example(b: int, c: int, cache: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(b, 80, c, generator=g), torch.randn(b, 80, c, generator=g), torch.rand(b, generator=g),
                torch.randn(b, 80, generator=g), torch.zeros(b, 80, c),
                torch.randn(depth, b, est.cnn_cache_channels, 2, generator=g),
                torch.randn(depth, b, heads, cache, width, generator=g),
                torch.randint(0, cache + 1, (b,), generator=g), torch.randint(1, c + 1, (b,), generator=g))

    names = ["x", "mu", "t", "spks", "cond", "cnn_cache", "att_cache", "cache_lengths", "chunk_lengths"]
    b, c, p = Dim("batch", min=1, max=64), Dim("chunk", min=1, max=3000), Dim("prev", min=0, max=3000)
    path = tmp_path / "chunk.onnx"
    torch.onnx.export(
        EstimatorChunk(est).eval(), example(4, 13, 20, 0), str(path), dynamo=True, opset_version=18,
        input_names=names, output_names=["velocity", "new_cnn_cache", "new_att_cache"],
        dynamic_shapes={"x": {0: b, 2: c}, "mu": {0: b, 2: c}, "t": {0: b}, "spks": {0: b}, "cond": {0: b, 2: c},
                        "cnn_cache": {1: b}, "att_cache": {1: b, 3: p}, "cache_lengths": {0: b},
                        "chunk_lengths": {0: b}},
        verbose=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    args = example(6, 31, 47, 1)
    with torch.no_grad():
        ref = est.forward_chunk(*args)
    out = sess.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
    for r, o in zip(ref, out, strict=True):
        np.testing.assert_allclose(o, r.numpy(), rtol=1e-4, atol=1e-4)
