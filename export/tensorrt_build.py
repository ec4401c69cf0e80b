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

# token2wav: (min, opt, max) per named dimension of the exported graphs (stepaudio2.export.token2wav_graphs).
# Streaming covers the spec's limits: chunks up to a whole 30 s voice prompt (stream setup), estimator caches up
# to prompt + 100 frames (the spec asks for at least 0-1000). Offline graphs stop at 60 s (prompt + reply,
# 3000 mel frames) per item: the ONNX graphs accept up to 600 s, but a TensorRT profile that large would reserve
# attention memory quadratic in it for every batch row; longer offline items go through streaming.
T2W_OFFLINE_TRT_TOKENS = 1500
T2W_OPT_TOKENS = 250  # 5 s prompt + 5 s reply
T2W_OPT_CHUNK = 50  # one 25-code chunk
T2W_OPT_CACHE = 350  # 5 s prompt + the 100 kept frames
T2W_OPT_CONF_CACHE = 253  # 5 s prompt + the 128 kept conformer tokens


def _t2w_dims(max_batch: int) -> dict[str, tuple[int, int, int]]:
    from stepaudio2.export.token2wav_graphs import (
        MAX_CACHE_FRAMES,
        MAX_CHUNK_FRAMES,
        MAX_CHUNK_TOKENS,
        MAX_CONFORMER_CACHE,
    )

    b = max_batch
    frames = 2 * T2W_OFFLINE_TRT_TOKENS
    return {
        "batch": (1, b // 2 or 1, b),
        "rows": (2, max(2, b), 2 * b),  # CFG-doubled: two rows per request or stream
        "tokens": (2, T2W_OPT_TOKENS, T2W_OFFLINE_TRT_TOKENS),
        "frames": (1, 2 * T2W_OPT_TOKENS, frames),
        "chunk": (1, T2W_OPT_CHUNK, MAX_CHUNK_FRAMES),
        "chunk_tokens": (4, T2W_OPT_CHUNK // 2 + 3, MAX_CHUNK_TOKENS),  # 25 codes + 3 lookahead
        "conf_cache": (0, T2W_OPT_CONF_CACHE, MAX_CONFORMER_CACHE),
        "up_conf_cache": (0, 2 * T2W_OPT_CONF_CACHE, 2 * MAX_CONFORMER_CACHE),
        "prev": (0, T2W_OPT_CACHE, MAX_CACHE_FRAMES),
        # HiFT: streaming calls see 8 overlap frames + a 50-frame chunk; offline up to the flow's output.
        "mel_frames": (1, 8 + T2W_OPT_CHUNK, frames),
    }


def _eval_dim(expr: str, values: dict[str, int]) -> int:
    """A symbolic ONNX dimension ('batch', '480*mel_frames', 'chunk + prev') at the given values."""
    import ast

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise InvalidInputError(f"no TensorRT profile value for dimension '{expr}'")

    return ev(ast.parse(expr, mode="eval"))


def token2wav_profiles(dims: dict[str, list], max_batch: int) -> dict[str, tuple]:
    """(min, opt, max) shape per input of a token2wav graph, from its manifest dims (static sizes kept)."""
    table = _t2w_dims(max_batch)
    out = {}
    for name, shape in dims.items():
        out[name] = tuple(
            tuple(d if isinstance(d, int) else _eval_dim(d, {k: v[i] for k, v in table.items()}) for d in shape)
            for i in range(3)
        )
    return out


def profiles(graph: str, dims: dict[str, list], max_batch: int, cfg: dict[str, Any]) -> dict[str, tuple]:
    """(min, opt, max) shape per dynamic input, up to the spec's limits."""
    from stepaudio2.token2wav.graphs import GRAPHS as T2W_GRAPHS

    b = max_batch
    if graph in T2W_GRAPHS:
        return token2wav_profiles(dims, max_batch)
    if graph == "audio_encoder":
        n_mels = cfg["audio_encoder_config"]["n_mels"]
        return {"mel": ((1, n_mels, 3), (b // 2 or 1, n_mels, 1000), (b, n_mels, 3000)), "mel_lengths": ((1,), (b // 2 or 1,), (b,)),
                "mel_frames": ((1,), (b // 2 or 1,), (b,))}
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
