"""TensorRT runner: same call signature as OrtRunner, device buffers bound per call, run on the caller's stream.

Written to the TensorRT 10 Python API (named I/O tensors, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`). It needs a GPU and the `tensorrt` package (inside the NGC Triton image); it has NOT been
run on a GPU yet (see README, "What was verified where").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stepaudio2.engines.runners import EngineUnavailableError


def _require_tensorrt():
    try:
        import tensorrt as trt
        import torch
    except ImportError as exc:
        raise EngineUnavailableError(f"TensorRT runner needs the 'tensorrt' package and torch: {exc}") from exc
    if not torch.cuda.is_available():
        raise EngineUnavailableError("TensorRT runner needs a CUDA GPU; none is visible")
    return trt, torch


class TensorRTRunner:
    def __init__(self, plan_path: str | Path, stream=None) -> None:
        trt, torch = _require_tensorrt()
        self._trt, self._torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineUnavailableError(f"could not deserialize TensorRT plan {plan_path} (built for another GPU/TRT?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        # Run on the caller's stream (or the current torch stream) so surrounding torch work stays ordered.
        self.stream = stream

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        trt, torch = self._trt, self._torch
        stream = self.stream or torch.cuda.current_stream()
        keep = []
        for name in self.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}
