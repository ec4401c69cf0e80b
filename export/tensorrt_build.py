"""`stepaudio2 build-engines`: TensorRT plans from the exported ONNX graphs, with explicit optimisation profiles.

Plans are named by content, not by device: `<graph>.<precision>.<key>.plan` where key hashes the ONNX graph,
the GPU product name, the TensorRT version and the profile, and the manifest (`engines` in export.json)
records all of them. Needs TensorRT and a GPU (NGC Triton image); refuses clearly otherwise.
Written to the TensorRT 10 Python API; NOT yet run on a GPU (see README).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stepaudio2.engines.runners import EngineUnavailableError
from stepaudio2.errors import InvalidInputError
from stepaudio2.export.repository import MANIFEST

PRECISIONS = ("fp16", "bf16", "fp32")


def profiles(graph: str, dims: dict[str, list], max_batch: int, cfg: dict[str, Any]) -> dict[str, tuple]:
    """(min, opt, max) shape per dynamic input, up to the spec's limits."""
    b = max_batch
    if graph == "audio_encoder":
        n_mels = cfg["audio_encoder_config"]["n_mels"]
        return {"mel": ((1, n_mels, 8), (b // 2 or 1, n_mels, 1000), (b, n_mels, 3000)), "mel_lengths": ((1,), (b // 2 or 1,), (b,))}
    if graph == "llm_decoder":
        t = cfg["text_config"]
        h, L, kv = t["hidden_size"], t["num_hidden_layers"], t["num_key_value_heads"]
        d = h // t["num_attention_heads"]
        ctx = t["max_position_embeddings"]
        return {
            "inputs_embeds": ((1, 1, h), (b, 1, h), (b, 4096, h)),
            "attention_mask": ((1, 1), (b, 1024), (b, ctx)),
            "position_ids": ((1, 1), (b, 1), (b, 4096)),
            "past_keys": ((L, 1, kv, 0, d), (L, b, kv, 1024, d), (L, b, kv, ctx, d)),
            "past_values": ((L, 1, kv, 0, d), (L, b, kv, 1024, d), (L, b, kv, ctx, d)),
        }
    raise InvalidInputError(f"no TensorRT profile is defined for graph '{graph}'")


def _gpu_and_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineUnavailableError(
            "TensorRT is not installed here; build engines inside the NGC Triton container on a GPU "
            f"(pip cannot reach NVIDIA's index from this machine): {exc}"
        ) from exc
    try:
        import torch
    except ImportError as exc:
        raise EngineUnavailableError(f"building engines needs torch to query the GPU: {exc}") from exc
    if not torch.cuda.is_available():
        raise EngineUnavailableError("no CUDA GPU is visible; TensorRT engines are built on the GPU that runs them")
    return trt, torch.cuda.get_device_name(0)


def build_engines(repository: str | Path, precision: str = "fp16", max_batch: int = 8) -> dict[str, Any]:
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    if not 1 <= max_batch <= 64:
        raise InvalidInputError(f"--max-batch {max_batch} must be in [1, 64]")
    repo = Path(repository)
    manifest_path = repo / MANIFEST
    if not manifest_path.is_file():
        raise InvalidInputError(f"{repo} has no {MANIFEST}; run `stepaudio2 export` first")
    trt, gpu = _gpu_and_trt()
    manifest = json.loads(manifest_path.read_text())
    cfg = json.loads((repo / "llm" / "1" / "config.json").read_text())
    engines = manifest.setdefault("engines", {})
    logger = trt.Logger(trt.Logger.WARNING)
    for graph, entry in manifest["graphs"].items():
        prof = profiles(graph, entry["inputs"], max_batch, cfg)
        key = hashlib.sha256(json.dumps([entry["sha256"], gpu, trt.__version__, precision, prof]).encode()).hexdigest()[:16]
        onnx_path = repo / entry["path"]
        plan = onnx_path.with_name(f"{graph}.{precision}.{key}.plan")
        if not plan.is_file():
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise EngineUnavailableError(f"TensorRT could not parse {onnx_path}: {errors}")
            config = builder.create_builder_config()
            if precision == "fp16":
                config.set_flag(trt.BuilderFlag.FP16)
            elif precision == "bf16":
                config.set_flag(trt.BuilderFlag.BF16)
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in prof.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise EngineUnavailableError(f"TensorRT failed to build {graph}")
            plan.write_bytes(bytes(serialized))
        engines[graph] = {
            "path": str(plan.relative_to(repo)), "gpu": gpu, "tensorrt": trt.__version__,
            "precision": precision, "onnx_sha256": entry["sha256"], "profile": {k: list(v) for k, v in prof.items()},
        }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
