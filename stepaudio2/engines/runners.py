"""One Runner interface over the inference engines: ONNX Runtime (CPU or CUDA) and TensorRT.

A runner takes named numpy arrays and returns named numpy arrays; which engine runs is a config choice
(`make_runner(path, kind)`), never a code path in the callers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from stepaudio2.errors import StepAudio2Error


class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]: ...


class EngineUnavailableError(StepAudio2Error):
    """The requested engine (TensorRT, a CUDA provider, ...) is not installed or has no device here."""


class OrtRunner:
    """ONNX Runtime session. `device` is "cpu" or "cuda" (CUDA falls back to an error, never silently to CPU)."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, spin: bool = True) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:
            # Idle workers otherwise busy-wait after each run, starving torch work interleaved in the process.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineUnavailableError("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise EngineUnavailableError(f"unknown onnxruntime device '{device}' (cpu or cuda)")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))


def make_runner(path: str | Path, kind: str = "onnx-cpu") -> Runner:
    """kind: onnx-cpu | onnx-cuda | tensorrt."""
    if kind == "onnx-cpu":
        # A served graph shares the cores with vLLM's engine and the stubs: its idle workers sleep at once.
        return OrtRunner(path, "cpu", spin=False)
    if kind == "onnx-cuda":
        return OrtRunner(path, "cuda")
    if kind == "tensorrt":
        from stepaudio2.engines.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(path)
    raise EngineUnavailableError(f"unknown runner kind '{kind}' (onnx-cpu, onnx-cuda, tensorrt)")
