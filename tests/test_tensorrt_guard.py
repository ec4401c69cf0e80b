"""TensorRT paths: refused with a clear message where TensorRT or a GPU is missing; run only on a GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from stepaudio2.engines.runners import EngineUnavailableError, make_runner

from .conftest import hardware_skipif

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@hardware_skipif(HAS_TRT, "this machine has TensorRT; the refusal path is for machines without it")
def test_build_engines_refuses_without_tensorrt(tmp_path: Path) -> None:
    (tmp_path / "export.json").write_text('{"graphs": {}}')
    proc = subprocess.run(
        [sys.executable, "-m", "stepaudio2.cli", "build-engines", "--repository", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "TensorRT is not installed" in proc.stderr


def test_build_engines_needs_an_export_first(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stepaudio2.cli", "build-engines", "--repository", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "stepaudio2 export" in proc.stderr


@hardware_skipif(HAS_TRT, "this machine has TensorRT; the refusal path is for machines without it")
def test_tensorrt_runner_refuses_without_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailableError, match="tensorrt"):
        make_runner(tmp_path / "x.plan", "tensorrt")


@hardware_skipif(not HAS_TRT, "needs TensorRT and a CUDA GPU (NGC Triton container); not on this machine")
def test_tensorrt_plans_match_onnx_runtime(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import numpy as np

    from stepaudio2.export.repository import export_checkpoint
    from stepaudio2.export.tensorrt_build import build_engines

    export_checkpoint(tiny_checkpoint, tmp_path)
    manifest = build_engines(tmp_path, precision="fp32", max_batch=4)
    enc = manifest["engines"]["audio_encoder"]
    trt = make_runner(tmp_path / enc["path"], "tensorrt")
    ort = make_runner(tmp_path / manifest["graphs"]["audio_encoder"]["path"], "onnx-cpu")
    mel = np.random.default_rng(0).standard_normal((2, 128, 300)).astype(np.float32)
    lens = np.array([298, 150], np.int64)
    a, b = trt(mel=mel, mel_lengths=lens), ort(mel=mel, mel_lengths=lens)
    assert np.abs(a["audio_embeds"] - b["audio_embeds"]).max() < 1e-3
