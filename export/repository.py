"""`stepaudio2 export`: checkpoint -> ONNX graphs (+ runtime files) inside the Triton model repository.

Layout written (version folder 1 of each stage; build outputs, git-ignored):

    <repo>/audio_encoder/1/audio_encoder.onnx
    <repo>/llm/1/llm_decoder.onnx, embed_tokens.npy, config.json + tokenizer files
    <repo>/llm/1/qwen2/   the decoder as a Qwen2ForCausalLM folder (config.json + safetensors) for vLLM
    <repo>/token2wav/1/flow.yaml, flow.pt, hift.pt, campplus.onnx, speech_tokenizer_v2_25hz.onnx (when the
                       checkpoint has token2wav/; read by the token2wav and voice_prompt models), and the graphs
                       flow_encoder.onnx, flow_encoder_chunk.onnx, flow_estimator.onnx,
                       flow_estimator_chunk.onnx, hift_f0.onnx, hift_decoder.onnx (HiFT's seeded source
                       module stays in the runtime)
    <repo>/export.json   manifest: checkpoint hash, graph hashes, I/O shapes, opset, precision, versions

Re-running with an unchanged checkpoint and code is a no-op (the manifest's input hash matches).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from stepaudio2.errors import InvalidInputError

MANIFEST = "export.json"
EXPORT_FORMAT_VERSION = 3  # bump when the graphs' signatures change, to force a re-export
RUNTIME_FILES = (
    "config.json", "vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json", "tokenizer.json",
)
TOKEN2WAV_FILES = ("flow.yaml", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2_25hz.onnx")
# ONNX graphs are exported in fp32 (the CPU embedded default). fp16/bf16 are TensorRT builder precisions
# (`stepaudio2 build-engines --precision`), applied when plans are built from these graphs on a GPU.
PRECISIONS = ("fp32",)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_hash(checkpoint: Path) -> str:
    """Content hash over every file of the checkpoint (names + bytes), stable across copies."""
    h = hashlib.sha256()
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(checkpoint)).encode())
        h.update(file_sha256(path).encode())
    return h.hexdigest()


def _code_hash() -> str:
    """Hash of the export code and the model code it traces, so a code change re-exports."""
    import stepaudio2

    pkg = Path(stepaudio2.__file__).parent
    roots = [Path(__file__).parent, pkg / "models", pkg / "token2wav"]
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            h.update(path.read_bytes())
    return h.hexdigest()


def graph_sha256(path: Path) -> str:
    """Hash of an ONNX graph and of its external weights file (`<name>.onnx.data`), which the dynamo exporter
    writes beside it: the weights change without the graph file changing."""
    data = path.with_name(path.name + ".data")
    if not data.is_file():
        return file_sha256(path)
    return hashlib.sha256(f"{file_sha256(path)}:{file_sha256(data)}".encode()).hexdigest()


def _graph_entry(path: Path, repo: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def dims(values) -> dict[str, list]:
        return {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values
        }

    return {
        "path": str(path.relative_to(repo)),
        "sha256": graph_sha256(path),
        "inputs": dims(model.graph.input),
        "outputs": dims(model.graph.output),
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
    }


def _load_token2wav(src: Path):
    """(flow, hift) torch modules of a checkpoint's token2wav/; any missing file or bad tensor is an error
    naming it."""
    from stepaudio2.errors import CheckpointError
    from stepaudio2.token2wav.flow import load_flow
    from stepaudio2.token2wav.hift import load_hift

    for name in TOKEN2WAV_FILES:
        if not (src / name).is_file():
            raise InvalidInputError(f"checkpoint token2wav/ has no {name}")
    try:
        return load_flow(src), load_hift(src / "hift.pt")
    except CheckpointError as exc:
        raise CheckpointError(f"token2wav: {exc}") from exc


def export_checkpoint(
    checkpoint: str | Path, repository: str | Path, precision: str = "fp32", force: bool = False
) -> dict[str, Any]:
    """Export every stage (LLM side, and token2wav when the checkpoint has it); returns the manifest
    (unchanged inputs: the existing manifest, no work)."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch
    import transformers

    from stepaudio2.export.llm_graphs import export_audio_encoder, export_decoder
    from stepaudio2.models.step_audio2 import load_model

    if precision not in PRECISIONS:
        raise InvalidInputError(
            f"ONNX export precision '{precision}' is not supported (ONNX graphs are {', '.join(PRECISIONS)}; "
            "fp16/bf16 apply when building TensorRT engines)"
        )
    ckpt, repo = Path(checkpoint), Path(repository)
    inputs_hash = hashlib.sha256(
        f"{checkpoint_hash(ckpt)}:{_code_hash()}:{precision}:{EXPORT_FORMAT_VERSION}".encode()
    ).hexdigest()
    manifest_path = repo / MANIFEST
    if not force and manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("inputs_hash") == inputs_hash and all(
            (repo / g["path"]).is_file() and graph_sha256(repo / g["path"]) == g["sha256"] for g in old["graphs"].values()
        ) and (repo / old.get("files", {}).get("vllm_model", "-") / "config.json").is_file():
            old["skipped"] = True
            return old

    t0 = time.perf_counter()
    t2w_src = ckpt / "token2wav"
    # Load (strictly) before writing anything, so a broken token2wav/ fails fast, naming the file and tensor.
    t2w = _load_token2wav(t2w_src) if t2w_src.is_dir() else None
    model = load_model(ckpt)
    enc_dir, llm_dir = repo / "audio_encoder" / "1", repo / "llm" / "1"
    enc_dir.mkdir(parents=True, exist_ok=True)
    llm_dir.mkdir(parents=True, exist_ok=True)
    graphs = {"audio_encoder": enc_dir / "audio_encoder.onnx", "llm_decoder": llm_dir / "llm_decoder.onnx"}
    export_audio_encoder(model, graphs["audio_encoder"])
    export_decoder(model, graphs["llm_decoder"])
    with torch.inference_mode():
        np.save(llm_dir / "embed_tokens.npy", model.model.embed_tokens.weight.numpy())
    for name in RUNTIME_FILES:
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, llm_dir / name)
    from stepaudio2.export.vllm_model import write_qwen2_folder

    write_qwen2_folder(ckpt, llm_dir / "qwen2")
    seconds: dict[str, float] = {}
    if t2w is not None:
        from stepaudio2.export.token2wav_graphs import export_token2wav_graphs

        t2w_dir = repo / "token2wav" / "1"
        t2w_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKEN2WAV_FILES:
            shutil.copy2(t2w_src / name, t2w_dir / name)
        graphs.update(export_token2wav_graphs(*t2w, t2w_dir, log=lambda n, s: seconds.__setitem__(n, round(s, 2))))

    manifest = {
        "format_version": EXPORT_FORMAT_VERSION,
        "inputs_hash": inputs_hash,
        "checkpoint": str(ckpt.resolve()),
        "checkpoint_sha256": checkpoint_hash(ckpt),
        "precision": precision,
        "graphs": {name: _graph_entry(path, repo) for name, path in graphs.items()},
        "files": {"embed_tokens": str((llm_dir / "embed_tokens.npy").relative_to(repo)),
                  "vllm_model": str((llm_dir / "qwen2").relative_to(repo))},
        "token2wav_seconds": seconds,
        "notes": {"hift": "hift_f0 + hift_decoder; the seeded source module runs in the runtime"} if t2w else {},
        "versions": {
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__,
        },
        "export_seconds": round(time.perf_counter() - t0, 2),
        "skipped": False,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
