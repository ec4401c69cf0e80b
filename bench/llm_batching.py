"""Continuous batching vs one-at-a-time decoding of the LLM, same engine, same requests, one run.

    .venv/bin/python bench/llm_batching.py [--preset small] [--requests 8] [--tokens 64] [--runs 3]

Engine: the exported ONNX decoder through ONNX Runtime (the server's CPU path). Reports tokens/s for
max_slots=1 (sequential) and max_slots=N (continuous batching), and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint, summary  # noqa: E402


def run(backend, kv, prompts, tokens: int, slots: int) -> float:
    from stepaudio2.engines.sampling import SamplingParams
    from stepaudio2.engines.scheduler import ContinuousBatcher, SequenceRequest

    batcher = ContinuousBatcher(backend.decoder, backend.embed, kv, max_slots=slots, max_queue=len(prompts))
    for i, ids in enumerate(prompts):
        batcher.submit(SequenceRequest(str(i), backend.embed(ids), ids, SamplingParams(max_new_tokens=tokens),
                                       frozenset(), lambda _t: None, lambda _r: None))
    t0 = time.perf_counter()
    while batcher.step() or batcher.waiting:
        pass
    return len(prompts) * tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from stepaudio2.engines.llm import OnnxBackend
    from stepaudio2.export.repository import export_checkpoint

    ckpt = checkpoint(args.preset)
    repo = Path(tempfile.gettempdir()) / f"stepaudio2-bench-{args.preset}-repo"
    export_checkpoint(ckpt, repo)
    backend = OnnxBackend(repo)
    t = backend.text_config
    kv = (t.num_hidden_layers, t.num_key_value_heads, t.head_dim, t.max_position_embeddings)
    prompts = [list(range(10 + i, 10 + i + 40 + 7 * i)) for i in range(args.requests)]
    seq, cont = [], []
    for _ in range(args.runs):
        seq.append(run(backend, kv, prompts, args.tokens, 1))
        cont.append(run(backend, kv, prompts, args.tokens, args.requests))
    print(f"LLM preset={args.preset} requests={args.requests} tokens={args.tokens} (ONNX Runtime CPU)")
    print(f"sequential tokens/s    {summary(seq)}")
    print(f"continuous tokens/s    {summary(cont)}")
    print(f"speed-up               {summary([c / s for c, s in zip(cont, seq, strict=True)])}")


if __name__ == "__main__":
    main()
