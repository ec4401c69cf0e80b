"""HiFT vocoder: strict hift.pt loading (both weight-norm namings), shapes, seeded randomness, streaming cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepaudio2.errors import CheckpointError, InvalidInputError
from stepaudio2.token2wav.hift import HiFTConfig, HiFTGenerator, load_hift
from stepaudio2.token2wav.tiny_hift import write_tiny_hift

HOP = 480


@pytest.fixture(scope="module")
def hift_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hift(tmp_path_factory.mktemp("hift"), seed=0, preset="tiny")


@pytest.fixture(scope="module")
def hift(hift_path: Path) -> HiFTGenerator:
    return load_hift(hift_path)


def mel(frames: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 80, frames, generator=g) - 4.0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """hift.pt as older torch (nn.utils.weight_norm) saved it: weight_g / weight_v."""
    out = {}
    for k, v in state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                 "weight_v")
        out[k] = v
    return out


def test_file_layout_matches_upstream_names(hift_path: Path) -> None:
    state = torch.load(hift_path, weights_only=True)
    assert all(k.startswith("generator.") for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    names = {k[len("generator."):] for k in state}
    for expected in (
        "m_source.l_linear.weight",
        "conv_pre.parametrizations.weight.original0",
        "conv_pre.parametrizations.weight.original1",
        "ups.2.parametrizations.weight.original1",
        "source_downs.0.weight",
        "source_resblocks.2.convs1.2.parametrizations.weight.original1",
        "source_resblocks.0.activations2.1.alpha",
        "resblocks.8.convs2.2.parametrizations.weight.original0",
        "conv_post.parametrizations.weight.original1",
        "f0_predictor.condnet.8.parametrizations.weight.original1",
        "f0_predictor.classifier.weight",
    ):
        assert expected in names
    assert not any(n.startswith("resblocks.9.") or n.startswith("f0_predictor.condnet.10.") for n in names)


def test_real_architecture_shapes() -> None:
    shapes = {k: tuple(v.shape) for k, v in HiFTGenerator(HiFTConfig()).state_dict().items()}
    assert shapes["m_source.l_linear.weight"] == (1, 9)
    assert shapes["conv_pre.parametrizations.weight.original1"] == (512, 80, 7)
    assert shapes["ups.0.parametrizations.weight.original1"] == (512, 256, 16)
    assert shapes["ups.2.parametrizations.weight.original1"] == (128, 64, 7)
    assert shapes["source_downs.0.weight"] == (256, 18, 30)
    assert shapes["source_downs.1.weight"] == (128, 18, 6)
    assert shapes["source_downs.2.weight"] == (64, 18, 1)
    assert shapes["source_resblocks.2.convs1.0.parametrizations.weight.original1"] == (64, 64, 11)
    assert shapes["conv_post.parametrizations.weight.original1"] == (18, 64, 7)
    assert shapes["f0_predictor.condnet.0.parametrizations.weight.original1"] == (512, 80, 3)
    assert shapes["f0_predictor.classifier.weight"] == (1, 512)
    assert HiFTConfig().hop_length == HOP


@pytest.mark.parametrize("frames", [1, 7, 50])
def test_frames_to_samples(hift: HiFTGenerator, frames: int) -> None:
    wav, source = hift.inference(mel(frames), None, gen(0))
    assert wav.shape == (1, frames * HOP)
    assert source.shape == (1, 1, frames * HOP)
    assert wav.dtype == torch.float32
    assert torch.isfinite(wav).all()
    assert float(wav.abs().max()) <= float(torch.tensor(0.99))  # the clamp, at float32 precision
    assert float(wav.std()) > 1e-3  # the tiny vocoder makes sound, not silence


def test_batch(hift: HiFTGenerator) -> None:
    m = mel(20, batch=3)
    wav, source = hift.inference(m, None, gen(0))
    assert wav.shape == (3, 20 * HOP) and source.shape == (3, 1, 20 * HOP)
    # Each row equals that row alone given the same excitation (passed as a full-length cache_source): batching
    # changes only float summation order.
    for i in range(3):
        alone, alone_source = hift.inference(m[i : i + 1], source[i : i + 1], gen(99))
        assert torch.equal(alone_source, source[i : i + 1])
        torch.testing.assert_close(alone, wav[i : i + 1], rtol=0, atol=1e-5)


def test_batch_with_a_generator_per_row_equals_each_row_alone(hift: HiFTGenerator) -> None:
    """Several streams vocoded in one call: row i draws from its own generator exactly what it draws alone, and
    each generator ends where it would end alone (the stream's next chunk continues from there)."""
    m = mel(20, batch=3)
    cache = 0.1 * torch.randn(3, 1, 8 * HOP, generator=gen(7))
    gens = [gen(11), gen(12), gen(13)]
    wav, source = hift.inference(m, cache, gens)
    for i in range(3):
        alone_gen = gen(11 + i)
        alone, alone_source = hift.inference(m[i : i + 1], cache[i : i + 1], alone_gen)
        # Batched convolutions sum in another order: F0 moves by ulps, which the sine phase integrates. Rows
        # given each other's generators differ by about 1e-2 (source) and 1e-1 (samples).
        torch.testing.assert_close(alone_source, source[i : i + 1], rtol=0, atol=1e-4)
        torch.testing.assert_close(alone, wav[i : i + 1], rtol=0, atol=1e-3)
        assert torch.equal(alone_gen.get_state(), gens[i].get_state())
    with pytest.raises(InvalidInputError, match="2 generators for a batch of 3"):
        hift.inference(m, None, gens[:2])


def test_generator_seed_controls_randomness(hift: HiFTGenerator) -> None:
    m = mel(30)
    a, _ = hift.inference(m, None, gen(1))
    b, _ = hift.inference(m, None, gen(1))
    c, _ = hift.inference(m, None, gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-4)


def test_streams_do_not_disturb_each_other(hift: HiFTGenerator) -> None:
    ga = gen(5)
    first, _ = hift.inference(mel(10, 1), None, ga)
    second, _ = hift.inference(mel(10, 2), None, ga)
    ga2, gb = gen(5), gen(9)
    assert torch.equal(hift.inference(mel(10, 1), None, ga2)[0], first)
    hift.inference(mel(10, 3), None, gb)  # another stream in between
    assert torch.equal(hift.inference(mel(10, 2), None, ga2)[0], second)


def test_cache_source_replaces_start_of_excitation(hift: HiFTGenerator) -> None:
    g = gen(3)
    m = mel(40)
    _, src1 = hift.inference(m[:, :, :25], None, g)
    cache = src1[:, :, -8 * HOP:]
    wav2, src2 = hift.inference(m[:, :, 17:], cache, g)  # 8 overlap frames + 15 new ones
    assert wav2.shape == (1, 23 * HOP)
    assert torch.equal(src2[:, :, : 8 * HOP], cache)
    empty = torch.zeros(1, 1, 0)
    assert hift.inference(m[:, :, :5], empty, gen(0))[0].shape == (1, 5 * HOP)
    with pytest.raises(InvalidInputError, match="cache_source"):
        hift.inference(m[:, :, :2], cache, g)  # cache longer than the chunk
    with pytest.raises(InvalidInputError, match="cache_source"):
        hift.inference(m[:, :, :10], torch.zeros(2, 1, 100), g)


def test_bad_mel_shapes(hift: HiFTGenerator) -> None:
    with pytest.raises(InvalidInputError, match="80"):
        hift.inference(torch.zeros(1, 81, 10), None, gen(0))
    with pytest.raises(InvalidInputError):
        hift.inference(torch.zeros(80, 10), None, gen(0))
    with pytest.raises(InvalidInputError, match="empty"):
        hift.inference(torch.zeros(1, 80, 0), None, gen(0))


def test_old_and_new_weight_norm_names_load_the_same(hift_path: Path, tmp_path: Path) -> None:
    state = torch.load(hift_path, weights_only=True)
    old = tmp_path / "old.pt"
    torch.save(legacy_names(state), old)
    assert any(k.endswith("weight_g") for k in torch.load(old, weights_only=True))
    bare = tmp_path / "bare.pt"
    torch.save({k[len("generator."):]: v for k, v in state.items()}, bare)
    m = mel(12)
    ref = load_hift(hift_path).inference(m, None, gen(4))[0]
    assert torch.equal(load_hift(old).inference(m, None, gen(4))[0], ref)
    assert torch.equal(load_hift(bare).inference(m, None, gen(4))[0], ref)


def test_folded_weight_norm_matches_parametrized(hift_path: Path) -> None:
    m = mel(12)
    folded = load_hift(hift_path).inference(m, None, gen(4))[0]
    plain = load_hift(hift_path, fold_weight_norm=False).inference(m, None, gen(4))[0]
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-5)


def test_missing_tensor_is_named(hift_path: Path, tmp_path: Path) -> None:
    state = torch.load(hift_path, weights_only=True)
    del state["generator.resblocks.4.convs1.1.parametrizations.weight.original0"]
    bad = tmp_path / "hift.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"missing.*resblocks\.4\.convs1\.1\.parametrizations\.weight\.original0"):
        load_hift(bad)


def test_misshaped_tensor_is_named(hift_path: Path, tmp_path: Path) -> None:
    state = torch.load(hift_path, weights_only=True)
    state["generator.source_downs.1.weight"] = state["generator.source_downs.1.weight"][:, :, :-1].clone()
    bad = tmp_path / "hift.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"misshaped.*source_downs\.1\.weight"):
        load_hift(bad)


def test_unexpected_tensor_is_named(hift_path: Path, tmp_path: Path) -> None:
    state = torch.load(hift_path, weights_only=True)
    state["generator.extra_head.weight"] = torch.zeros(3)
    bad = tmp_path / "hift.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"unexpected.*extra_head\.weight"):
        load_hift(bad)


def test_missing_shape_source_is_named(hift_path: Path, tmp_path: Path) -> None:
    state = torch.load(hift_path, weights_only=True)
    del state["generator.conv_pre.parametrizations.weight.original1"]
    bad = tmp_path / "hift.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"conv_pre\.parametrizations\.weight\.original1"):
        load_hift(bad)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        load_hift(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_hift(junk)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match="state dict"):
        load_hift(listed)


def test_channels_come_from_the_file(tmp_path: Path) -> None:
    small = load_hift(write_tiny_hift(tmp_path, seed=1, preset="small"))
    assert small.cfg.base_channels == 128 and small.cfg.f0_channels == 128
    assert small.inference(mel(3), None, gen(0))[0].shape == (1, 3 * HOP)


def test_writer_is_deterministic(tmp_path: Path, hift_path: Path) -> None:
    again = torch.load(write_tiny_hift(tmp_path, seed=0), weights_only=True)
    ref = torch.load(hift_path, weights_only=True)
    assert again.keys() == ref.keys()
    assert all(torch.equal(again[k], ref[k]) for k in ref)
    other = torch.load(write_tiny_hift(tmp_path / "s1", seed=1), weights_only=True)
    assert not torch.equal(other["generator.conv_pre.parametrizations.weight.original1"],
                           ref["generator.conv_pre.parametrizations.weight.original1"])
