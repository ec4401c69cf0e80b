"""ONNX export of the LLM side: parity with torch on several shapes, KV greedy decode, manifest no-op."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stepaudio2.engines.runners import OrtRunner
from stepaudio2.export.llm_graphs import decoder_example
from stepaudio2.export.repository import MANIFEST, export_checkpoint
from stepaudio2.models.graphs import DecoderGraph

TOL = 1e-4  # fp32


@pytest.fixture(scope="module")
def repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    export_checkpoint(tiny_checkpoint, repo)
    return repo


def test_manifest_lists_graphs_and_rerun_is_noop(tiny_checkpoint: Path, repository: Path) -> None:
    import json

    manifest = json.loads((repository / MANIFEST).read_text())
    assert set(manifest["graphs"]) >= {"audio_encoder", "llm_decoder"}
    assert manifest["checkpoint_sha256"] and manifest["precision"] == "fp32"
    for g in manifest["graphs"].values():
        assert (repository / g["path"]).is_file() and g["opset"] >= 17
    assert export_checkpoint(tiny_checkpoint, repository)["skipped"] is True


# batch 1, ragged batch, odd length, the 3-frame chunk of a <= 160-sample tail (0 placeholders)
@pytest.mark.parametrize("frames", [[102], [203, 57, 150], [333], [2502, 3], [4]])
def test_audio_encoder_matches_torch(tiny_model, repository: Path, frames: list[int]) -> None:
    runner = OrtRunner(repository / "audio_encoder" / "1" / "audio_encoder.onnx")
    g = torch.Generator().manual_seed(len(frames))
    mel = torch.zeros(len(frames), 128, max(frames))
    for i, f in enumerate(frames):
        mel[i, :, :f] = torch.randn(128, f, generator=g)
    lengths = torch.tensor(frames) - 2
    own = torch.tensor(frames)  # each item as its own request (the served audio_encoder's dynamic batch)
    out = runner(mel=mel.numpy(), mel_lengths=lengths.numpy(), mel_frames=own.numpy())
    with torch.inference_mode():
        ref, n = tiny_model.encode_audio(mel, lengths, own)
    assert out["embed_lengths"].tolist() == n.tolist()
    assert np.abs(out["audio_embeds"] - ref.numpy()).max() <= TOL


@pytest.mark.parametrize(("batch", "seq", "past"), [(1, 7, 0), (3, 1, 9), (2, 5, 3)])
def test_decoder_matches_torch(tiny_model, repository: Path, batch: int, seq: int, past: int) -> None:
    runner = OrtRunner(repository / "llm" / "1" / "llm_decoder.onnx")
    torch.manual_seed(batch * 100 + seq)
    args = list(decoder_example(tiny_model, batch, seq, past))
    if past > 2:  # ragged batch: row 0 has two left-padded past slots
        args[1][0, :2] = 0
    names = ["inputs_embeds", "attention_mask", "position_ids", "past_keys", "past_values"]
    out = runner(**{n: a.numpy() for n, a in zip(names, args, strict=True)})
    with torch.inference_mode():
        ref = DecoderGraph(tiny_model)(*args)
    for name, r in zip(["logits", "present_keys", "present_values"], ref, strict=True):
        assert np.abs(out[name] - r.numpy()).max() <= TOL, name


def test_onnx_pipeline_greedy_decode_equals_torch(tiny_checkpoint: Path, repository: Path) -> None:
    from stepaudio2.engines.sampling import SamplingParams
    from stepaudio2.pipeline import GenerationRequest, ReferencePipeline, load_audio_input

    from .conftest import ASSETS

    req = GenerationRequest(task="asr", audio=load_audio_input(ASSETS / "hello_en.wav"),
                            sampling=SamplingParams(max_new_tokens=16))
    ref = ReferencePipeline(tiny_checkpoint, engine="torch").generate(req)
    onnx = ReferencePipeline(tiny_checkpoint, engine="onnx", repository=repository).generate(req)
    assert len(ref.token_ids) == 16 or ref.finish_reason == "stop"
    assert onnx.token_ids == ref.token_ids
