"""Engine switch of token2wav: the flow's and HiFT's networks on exported graphs through Runners.

`GraphEngine` has the signatures of the graphs (stepaudio2.token2wav.graphs), taking and returning torch
tensors, so the flow and the vocoder run unchanged around it (`FlowModel.set_engine`, `HiFTGenerator.engine`).
What stays in torch: the speaker embedding (one small linear), the Euler loop, cache trimming and batching,
and HiFT's seeded source module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stepaudio2.engines.runners import EngineUnavailableError, OrtRunner, Runner, make_runner
from stepaudio2.token2wav.graphs import (
    FLOW_ENCODER,
    FLOW_ENCODER_CHUNK,
    FLOW_ESTIMATOR,
    FLOW_ESTIMATOR_CHUNK,
    GRAPHS,
    HIFT_DECODER,
    HIFT_F0,
    SIGNATURES,
)

ENGINES = ("torch", "onnx-cpu", "onnx-cuda", "tensorrt")
MANIFEST = "export.json"  # at the model repository root, two levels above <repo>/token2wav/1


def graph_path(graph_dir: str | Path, name: str, kind: str) -> Path:
    """The file a runner of `kind` loads for graph `name`: `<dir>/<name>.onnx`, or for TensorRT the plan the
    manifest records (plans are named by content, see export/tensorrt_build.py)."""
    d = Path(graph_dir)
    if kind != "tensorrt":
        path = d / f"{name}.onnx"
        if not path.is_file():
            raise EngineUnavailableError(f"{path} is missing: run `stepaudio2 export` for this checkpoint first")
        return path
    manifest = d.parent.parent / MANIFEST
    engines = json.loads(manifest.read_text()).get("engines", {}) if manifest.is_file() else {}
    if name not in engines:
        raise EngineUnavailableError(
            f"no TensorRT plan for '{name}' in {manifest}: run `stepaudio2 build-engines` on this GPU first"
        )
    return d.parent.parent / engines[name]["path"]


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return np.ascontiguousarray((t.float() if t.is_floating_point() else t.long()).numpy())


class GraphEngine:
    """Runners for every token2wav graph of a version folder (`<repo>/token2wav/1`)."""

    def __init__(self, graph_dir: str | Path, kind: str = "onnx-cpu") -> None:
        if kind not in ENGINES[1:]:
            raise EngineUnavailableError(f"unknown token2wav engine '{kind}' (choose from {', '.join(ENGINES)})")
        self.kind = kind
        self.runners: dict[str, Runner] = {n: self._runner(graph_path(graph_dir, n, kind), kind) for n in GRAPHS}

    @staticmethod
    def _runner(path: Path, kind: str) -> Runner:
        if kind == "tensorrt":
            return make_runner(path, kind)
        # The graphs alternate with torch work (conformer, Euler loop, HiFT source): no spinning ORT workers.
        return OrtRunner(path, "cuda" if kind == "onnx-cuda" else "cpu", spin=False)

    def _run(self, name: str, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, outputs = SIGNATURES[name]
        out = self.runners[name](**{n: _np(a) for n, a in zip(inputs, args, strict=True)})
        device = args[0].device
        return tuple(torch.from_numpy(out[n]).to(device) for n in outputs)

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, mel_lengths = self._run(FLOW_ENCODER, tokens, lengths)
        return mu, mel_lengths

    def encode_chunk(
        self, tokens: torch.Tensor, token_count: torch.Tensor, *caches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, la, up, att, up_att = self._run(FLOW_ENCODER_CHUNK, tokens, token_count, *caches)
        return mu, la, up, att, up_att

    def velocity(self, *args: torch.Tensor) -> torch.Tensor:
        return self._run(FLOW_ESTIMATOR, *args)[0]

    def velocity_chunk(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v, cnn, att = self._run(FLOW_ESTIMATOR_CHUNK, *args)
        return v, cnn, att

    def f0(self, mel: torch.Tensor) -> torch.Tensor:
        return self._run(HIFT_F0, mel)[0]

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self._run(HIFT_DECODER, mel, source)[0]
