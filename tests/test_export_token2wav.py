"""ONNX export of token2wav: each graph vs torch on several shapes, batched chunks vs single ones, synthesis
and `generate` on the ONNX engine vs torch, manifest no-op, broken token2wav checkpoints."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stepaudio2.engines.runners import OrtRunner
from stepaudio2.errors import CheckpointError, InvalidInputError
from stepaudio2.export.repository import MANIFEST, export_checkpoint
from stepaudio2.token2wav.flow import load_flow
from stepaudio2.token2wav.graphs import GRAPHS, SIGNATURES, graph_modules
from stepaudio2.token2wav.hift import load_hift
from stepaudio2.token2wav.prompt import VoicePrompt
from stepaudio2.token2wav.synth import Token2Wav

from .conftest import ASSETS, hardware_skipif

TOL = 1e-4  # every graph vs torch, fp32
# Synthesis, ONNX engine vs torch: the graphs agree to ~1e-6, but HiFT integrates F0 into the sine phase over
# the whole utterance (phase ~ 2*pi*150 Hz*seconds, so one float32 ulp of F0 is ~1e-4 rad), which turns
# those ulps into ~1e-3 in the samples (measured 1.3e-3 offline over 2.8 s, 3e-4 streamed). Same mechanism
# as BATCH_ATOL in tests/test_t2w_synth.py.
SYNTH_ATOL = 3e-3
SYNTH_RMS = 2e-4  # ... while on average the samples agree far more closely


@pytest.fixture(scope="module")
def repository(tiny_full_export: Path) -> Path:
    return tiny_full_export  # the session's export of tiny_checkpoint_full (read only here)


@pytest.fixture(scope="module")
def modules(tiny_checkpoint_full: Path) -> dict[str, torch.nn.Module]:
    t2w = tiny_checkpoint_full / "token2wav"
    return graph_modules(load_flow(t2w), load_hift(t2w / "hift.pt"))


def _check(repository: Path, modules: dict, name: str, args: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    """Run graph `name` on ONNX Runtime and in torch; assert every output agrees within TOL."""
    inputs, outputs = SIGNATURES[name]
    out = OrtRunner(repository / "token2wav" / "1" / f"{name}.onnx")(
        **{n: a.numpy() for n, a in zip(inputs, args, strict=True)}
    )
    with torch.no_grad():
        ref = modules[name](*args)
    ref = (ref,) if isinstance(ref, torch.Tensor) else ref
    for n, r in zip(outputs, ref, strict=True):
        assert out[n].shape == tuple(r.shape), n
        assert np.abs(out[n] - r.numpy()).max() <= TOL, (name, n, np.abs(out[n] - r.numpy()).max())
    return out


def test_manifest_lists_token2wav_graphs_and_rerun_is_noop(tiny_checkpoint_full: Path, repository: Path) -> None:
    manifest = json.loads((repository / MANIFEST).read_text())
    assert set(GRAPHS) <= set(manifest["graphs"])
    for name in GRAPHS:
        entry = manifest["graphs"][name]
        assert entry["path"] == f"token2wav/1/{name}.onnx" and (repository / entry["path"]).is_file()
        assert entry["opset"] >= 17 and len(entry["sha256"]) == 64
        assert list(entry["inputs"]) == SIGNATURES[name][0] and list(entry["outputs"]) == SIGNATURES[name][1]
        # Batch and length axes are symbolic, not the trace's sizes.
        first = entry["inputs"][SIGNATURES[name][0][0]]
        assert isinstance(first[0], str) and isinstance(first[-1], str), (name, first)
    chunk = manifest["graphs"]["flow_estimator_chunk"]["inputs"]["att_cache"]
    assert isinstance(chunk[1], str) and isinstance(chunk[3], str)  # batch of streams, cache length
    first = export_checkpoint(tiny_checkpoint_full, repository)  # up to date (unless the code changed since)
    again = export_checkpoint(tiny_checkpoint_full, repository)
    assert again["skipped"] is True and again["graphs"] == first["graphs"]


def test_code_hash_covers_token2wav(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stepaudio2
    from stepaudio2.export import repository as repo_mod

    pkg = tmp_path / "stepaudio2"
    for sub in ("models", "token2wav"):
        shutil.copytree(Path(stepaudio2.__file__).parent / sub, pkg / sub, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(stepaudio2, "__file__", str(pkg / "__init__.py"))
    before = repo_mod._code_hash()
    with open(pkg / "token2wav" / "dit.py", "a") as f:
        f.write("\n# changed\n")
    assert repo_mod._code_hash() != before


@pytest.mark.parametrize("lengths", [[9], [17, 6, 11], [13]])  # batch 1, ragged batch, odd length
def test_flow_encoder_matches_torch(repository: Path, modules: dict, lengths: list[int]) -> None:
    g = torch.Generator().manual_seed(sum(lengths))
    tokens = torch.randint(0, 6561, (len(lengths), max(lengths)), generator=g)  # padding holds junk codes
    out = _check(repository, modules, "flow_encoder", (tokens, torch.tensor(lengths)))
    assert out["mel_lengths"].tolist() == [2 * n for n in lengths]


def _encoder_chunk_args(modules: dict, counts: list[int], tokens: int, cache: int, seed: int) -> tuple:
    enc = modules["flow_encoder_chunk"].flow.cfg.encoder
    g = torch.Generator().manual_seed(seed)
    b, d, heads = len(counts), enc.output_size, enc.attention_heads
    width = 2 * (d // heads)
    return (torch.randint(0, 6561, (b, tokens), generator=g), torch.tensor(counts),
            torch.randn(b, d, 2, generator=g), torch.randn(b, d, 2 * enc.up_stride, generator=g),
            torch.randn(enc.num_blocks, b, heads, cache, width, generator=g),
            torch.randn(enc.num_up_blocks, b, heads, 2 * cache, width, generator=g))


# batch 1 first chunk (empty caches); 3 rows, one with its last 2 codes zeroed (as for an ending stream);
# odd length
@pytest.mark.parametrize(("counts", "tokens", "cache"), [([28], 28, 0), ([28, 26, 28], 28, 40), ([17], 17, 131)])
def test_flow_encoder_chunk_matches_torch(repository: Path, modules: dict, counts: list[int], tokens: int,
                                          cache: int) -> None:
    out = _check(repository, modules, "flow_encoder_chunk", _encoder_chunk_args(modules, counts, tokens, cache, tokens))
    assert out["mu"].shape[2] == 2 * (tokens - 3) and out["new_att_cache"].shape[3] == cache + tokens - 3


def test_flow_encoder_chunk_graph_ends_a_stream_like_torch(repository: Path, modules: dict) -> None:
    """Last chunk: the graph's zeroed stand-in codes equal the torch path's zero-padded lookahead."""
    flow = modules["flow_encoder_chunk"].flow
    tokens, _, *caches = _encoder_chunk_args(modules, [11], 11, 23, 5)
    runner = OrtRunner(repository / "token2wav" / "1" / "flow_encoder_chunk.onnx")
    names, outputs = SIGNATURES["flow_encoder_chunk"]
    padded = torch.cat([tokens, torch.zeros(1, 3, dtype=torch.int64)], dim=1)
    got = runner(**{n: a.numpy() for n, a in zip(names, (padded, torch.tensor([11]), *caches), strict=True)})
    with torch.no_grad():
        ref = flow.encode_chunk(tokens, True, *caches)
    assert got["mu"].shape == (1, 80, 22)
    for n, r in zip(outputs, ref, strict=True):
        assert np.abs(got[n] - r.numpy()).max() <= TOL, n


@pytest.mark.parametrize(("rows", "frames"), [([20], 20), ([31, 12, 25], 31), ([45], 45)])
def test_flow_estimator_matches_torch(repository: Path, modules: dict, rows: list[int], frames: int) -> None:
    g = torch.Generator().manual_seed(frames)
    b = 2 * len(rows)  # CFG-doubled: conditioned rows, then unconditioned ones
    valid = torch.tensor(rows * 2).unsqueeze(1)
    mask = (torch.arange(frames).unsqueeze(0) < valid).float().unsqueeze(1)
    args = (torch.randn(b, 80, frames, generator=g), mask, torch.randn(b, 80, frames, generator=g),
            torch.rand(b, generator=g), torch.randn(b, 80, generator=g), torch.randn(b, 80, frames, generator=g))
    _check(repository, modules, "flow_estimator", args)


def _chunk_args(modules: dict, caches: list[int], chunks: list[int], seed: int) -> tuple[torch.Tensor, ...]:
    est = modules["flow_estimator_chunk"].estimator
    depth, heads, width = len(est.blocks), est.cfg.num_heads, est.att_cache_width
    g = torch.Generator().manual_seed(seed)
    b, c, big_l = len(chunks), max(chunks), max(caches)
    return (torch.randn(b, 80, c, generator=g), torch.randn(b, 80, c, generator=g), torch.rand(b, generator=g),
            torch.randn(b, 80, generator=g), torch.randn(b, 80, c, generator=g),
            torch.randn(depth, b, est.cnn_cache_channels, 2, generator=g),
            torch.randn(depth, b, heads, big_l, width, generator=g), torch.tensor(caches), torch.tensor(chunks))


@pytest.mark.parametrize(("caches", "chunks"), [([0], [13]), ([40, 7, 23], [50, 28, 9]), ([101, 101], [27, 27])])
def test_flow_estimator_chunk_matches_torch(repository: Path, modules: dict, caches: list[int],
                                            chunks: list[int]) -> None:
    _check(repository, modules, "flow_estimator_chunk", _chunk_args(modules, caches, chunks, len(chunks)))


def test_chunk_graph_batch3_equals_three_single_calls(repository: Path, modules: dict) -> None:
    """Chunks of three streams with their own cache and chunk lengths, in one call, equal three calls."""
    caches, chunks = [37, 0, 12], [13, 28, 5]
    args = _chunk_args(modules, caches, chunks, 7)
    runner = OrtRunner(repository / "token2wav" / "1" / "flow_estimator_chunk.onnx")
    names = SIGNATURES["flow_estimator_chunk"][0]
    batched = runner(**{n: a.numpy() for n, a in zip(names, args, strict=True)})
    x, mu, t, spks, cond, cnn, att, _, _ = args
    for i, (l_i, c_i) in enumerate(zip(caches, chunks, strict=True)):
        one = runner(**{n: a.numpy() for n, a in zip(names, (
            x[i:i + 1, :, :c_i], mu[i:i + 1, :, :c_i], t[i:i + 1], spks[i:i + 1], cond[i:i + 1, :, :c_i],
            cnn[:, i:i + 1], att[:, i:i + 1, :, :l_i], torch.tensor([l_i]), torch.tensor([c_i])), strict=True)})
        np.testing.assert_allclose(batched["velocity"][i, :, :c_i], one["velocity"][0], rtol=0, atol=TOL)
        np.testing.assert_allclose(batched["new_cnn_cache"][:, i], one["new_cnn_cache"][:, 0], rtol=0, atol=TOL)
        np.testing.assert_allclose(batched["new_att_cache"][:, i, :, : l_i + c_i], one["new_att_cache"][:, 0],
                                   rtol=0, atol=TOL)


@pytest.mark.parametrize("frames", [[10], [17, 6, 12], [33]])  # batch 1, ragged batch (padded mel), odd length
def test_hift_graphs_match_torch(repository: Path, modules: dict, frames: list[int]) -> None:
    g = torch.Generator().manual_seed(sum(frames))
    mel = torch.full((len(frames), 80, max(frames)), -11.5)  # padding: log-mel silence
    for i, f in enumerate(frames):
        mel[i, :, :f] = torch.randn(80, f, generator=g) - 4
    f0 = _check(repository, modules, "hift_f0", (mel,))["f0"]
    assert f0.shape == (len(frames), max(frames)) and (f0 >= 0).all()
    source = 0.1 * torch.randn(len(frames), 1, 480 * max(frames), generator=g)
    wav = _check(repository, modules, "hift_decoder", (mel, source))["waveform"]
    assert wav.shape == (len(frames), 480 * max(frames))


def test_hift_decoder_graph_module_equals_torch_decode(modules: dict) -> None:
    """The conv-based STFT/iSTFT of the graph wrapper equals torch.stft/istft in the torch decode."""
    dec = modules["hift_decoder"]
    g = torch.Generator().manual_seed(3)
    mel, source = torch.randn(2, 80, 21, generator=g) - 4, 0.1 * torch.randn(2, 1, 480 * 21, generator=g)
    with torch.no_grad():
        assert torch.allclose(dec.stft(source), dec.hift._stft(source), atol=1e-5, rtol=0)
        assert (dec(mel, source) - dec.hift.decode(mel, source)).abs().max() <= TOL


def _prompt(seed: int, n: int) -> VoicePrompt:
    rng = np.random.default_rng(seed)
    return VoicePrompt(tokens=rng.integers(0, 6561, n).astype(np.int64),
                       xvector=rng.standard_normal(192).astype(np.float32),
                       mel=(rng.standard_normal((2 * n, 80)) * 0.5 - 5).astype(np.float32), key=f"voice{seed}")


def _assert_audio_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.size > 0
    diff = np.abs(a - b)
    assert diff.max() <= SYNTH_ATOL and np.sqrt(np.mean(diff**2)) <= SYNTH_RMS, (diff.max(), np.sqrt(np.mean(diff**2)))


@pytest.fixture(scope="module")
def engines(tiny_checkpoint_full: Path, repository: Path) -> tuple[Token2Wav, Token2Wav]:
    return Token2Wav(tiny_checkpoint_full / "token2wav"), Token2Wav(repository / "token2wav" / "1", engine="onnx-cpu")


def test_offline_synthesis_onnx_engine_equals_torch(engines: tuple[Token2Wav, Token2Wav]) -> None:
    torch_t2w, onnx_t2w = engines
    assert onnx_t2w.flow.engine is not None and torch_t2w.flow.engine is None
    codes = np.random.default_rng(1).integers(0, 6561, 45).tolist()
    _assert_audio_close(onnx_t2w.offline(codes, _prompt(2, 14), seed=4), torch_t2w.offline(codes, _prompt(2, 14), seed=4))


def test_streaming_synthesis_onnx_engine_equals_torch(engines: tuple[Token2Wav, Token2Wav]) -> None:
    """Three streams pushed together (batched chunk graph, ragged caches) equal the torch engine."""
    prompts = [_prompt(5, 20), _prompt(6, 9), _prompt(7, 31)]
    codes = [np.random.default_rng(10 + i).integers(0, 6561, n).tolist() for i, n in enumerate([70, 33, 58])]
    outs = []
    for t2w in engines:
        sessions = [t2w.start_stream(p, seed=i) for i, p in enumerate(prompts)]
        got: list[list[np.ndarray]] = [[], [], []]
        for lo, hi, last in [(0, 30, False), (30, 80, True)]:
            for i, o in enumerate(t2w.push_many(sessions, [c[lo:hi] for c in codes], [last] * 3)):
                got[i].append(o)
        outs.append([np.concatenate(g) for g in got])
    for a, b in zip(*outs, strict=True):
        _assert_audio_close(a, b)


def test_generate_onnx_equals_torch_with_speech(tiny_checkpoint_full: Path, repository: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    import soundfile as sf

    from stepaudio2.cli import main

    def generate(engine: str) -> tuple[dict, np.ndarray]:
        wav = tmp_path / f"{engine}.wav"
        rc = main(["generate", "--checkpoint", str(tiny_checkpoint_full), "--task", "voice-chat", "--audio",
                   str(ASSETS / "hello_en.wav"), "--temperature", "0", "--max-new-tokens", "80", "--out-wav",
                   str(wav), "--json", "--engine", engine, "--repository", str(repository)])
        assert rc == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return result, sf.read(wav, dtype="float32")[0]

    ref, ref_wav = generate("torch")
    got, got_wav = generate("onnx")
    assert got["token_ids"] == ref["token_ids"] and got["audio_codes"] == ref["audio_codes"]
    assert len([c for c in ref["audio_codes"] if c < 6561]) > 10  # a real spoken reply, not an empty wav
    _assert_audio_close(got_wav, ref_wav)


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_export_rejects_missing_flow_weights(tiny_checkpoint_full: Path, tmp_path: Path) -> None:
    ckpt = _broken_copy(tiny_checkpoint_full, tmp_path / "ckpt")
    (ckpt / "token2wav" / "flow.pt").unlink()
    with pytest.raises(InvalidInputError, match="flow.pt"):
        export_checkpoint(ckpt, tmp_path / "repo")
    assert not (tmp_path / "repo" / MANIFEST).exists()


def test_export_rejects_misshaped_token2wav_tensors(tiny_checkpoint_full: Path, tmp_path: Path) -> None:
    ckpt = _broken_copy(tiny_checkpoint_full, tmp_path / "ckpt")
    flow_pt = ckpt / "token2wav" / "flow.pt"
    state = torch.load(flow_pt, weights_only=True)
    state["decoder.estimator.in_proj.weight"] = state["decoder.estimator.in_proj.weight"][:, :-1].clone()
    torch.save(state, flow_pt)
    with pytest.raises(CheckpointError, match=r"token2wav: .*decoder\.estimator\.in_proj\.weight"):
        export_checkpoint(ckpt, tmp_path / "repo")

    shutil.copy2(tiny_checkpoint_full / "token2wav" / "flow.pt", flow_pt)
    hift_pt = ckpt / "token2wav" / "hift.pt"
    state = torch.load(hift_pt, weights_only=True)
    name = next(k for k in state if "conv_post" in k and k.endswith(("weight_v", "original1", "weight")))
    state[name] = state[name][:-1].clone()
    torch.save(state, hift_pt)
    with pytest.raises(CheckpointError, match="conv_post"):
        export_checkpoint(ckpt, tmp_path / "repo")
    assert not (tmp_path / "repo" / MANIFEST).exists()


@pytest.mark.parametrize("max_batch", [1, 8])
def test_tensorrt_profiles_cover_token2wav_graphs(repository: Path, max_batch: int) -> None:
    from stepaudio2.export.tensorrt_build import profiles

    manifest = json.loads((repository / MANIFEST).read_text())
    for name in GRAPHS:
        dims = manifest["graphs"][name]["inputs"]
        prof = profiles(name, dims, max_batch, {})
        assert set(prof) == set(dims), name
        for inp, (lo, opt, hi) in prof.items():
            assert len(lo) == len(opt) == len(hi) == len(dims[inp]), (name, inp)
            for d, a, b, c in zip(dims[inp], lo, opt, hi, strict=True):
                assert a <= b <= c and (not isinstance(d, int) or a == b == c == d), (name, inp, lo, opt, hi)
    chunk = profiles("flow_estimator_chunk", manifest["graphs"]["flow_estimator_chunk"]["inputs"], max_batch, {})
    assert chunk["att_cache"][0][3] == 0 and chunk["att_cache"][2][3] >= 1000  # spec: cache lengths 0-1000+
    assert chunk["x"][2][0] == 2 * max_batch and chunk["x"][2][2] >= 1500  # CFG rows; a 30 s prompt at setup
    dec = profiles("hift_decoder", manifest["graphs"]["hift_decoder"]["inputs"], max_batch, {})
    assert all(s[2] == 480 * m[2] for s, m in zip(dec["source"], dec["mel"], strict=True))


@hardware_skipif(importlib.util.find_spec("tensorrt") is not None, "TensorRT present: the refusal path is for machines without it")
def test_build_engines_refuses_cleanly_without_tensorrt(repository: Path) -> None:
    from stepaudio2.engines.runners import EngineUnavailableError
    from stepaudio2.export.tensorrt_build import build_engines

    before = (repository / MANIFEST).read_text()
    with pytest.raises(EngineUnavailableError, match="TensorRT is not installed"):
        build_engines(repository, precision="fp16", max_batch=4)
    assert (repository / MANIFEST).read_text() == before


def test_engine_switch_refuses_missing_graphs_and_unknown_kinds(repository: Path, tiny_checkpoint_full: Path) -> None:
    from stepaudio2.engines.runners import EngineUnavailableError

    with pytest.raises(EngineUnavailableError, match="build-engines"):  # no plan in the manifest yet
        Token2Wav(repository / "token2wav" / "1", engine="tensorrt")
    with pytest.raises(EngineUnavailableError, match="stepaudio2 export"):  # the checkpoint has no graphs
        Token2Wav(tiny_checkpoint_full / "token2wav", engine="onnx-cpu")
    with pytest.raises(EngineUnavailableError, match="unknown token2wav engine"):
        Token2Wav(repository / "token2wav" / "1", engine="onnx")
