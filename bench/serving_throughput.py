"""Tokens per second through the served pipeline (real tritonserver, gRPC) at concurrency 1, 4 and 16,
against the in-process reference pipeline running the same requests one at a time. One run, one machine.

    .venv/bin/python bench/serving_throughput.py [--preset small] [--tokens 48] [--levels 1 4 16] [--runs 3]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, checkpoint, summary  # noqa: E402

CLIPS = ["hello_en.wav", "nihao_zh.wav", "weather_en.wav"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests(n: int, tokens: int) -> list[tuple[dict, bytes]]:
    assets = ROOT / "stepaudio2" / "assets"
    # Same requests on both sides; tokens/s counts the tokens each request really generated.
    return [({"task": "asr", "sampling": {"max_new_tokens": tokens}}, (assets / CLIPS[i % 3]).read_bytes())
            for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from stepaudio2.pipeline import ReferencePipeline
    from stepaudio2.request import request_from_json
    from stepaudio2.serving.launcher import ServerConfig, TritonProcess
    from stepaudio2_client import StepAudio2Client

    ckpt = checkpoint(args.preset)
    ref = ReferencePipeline(ckpt)
    reqs = _requests(max(args.levels), args.tokens)
    ref_tps = []
    for _ in range(args.runs):
        t0, n = time.perf_counter(), 0
        for obj, audio in reqs[: max(args.levels)]:
            n += len(ref.generate(request_from_json(obj, audio)).token_ids)
        ref_tps.append(n / (time.perf_counter() - t0))

    cfg = ServerConfig(checkpoint=ckpt, runtime=Path(tempfile.mkdtemp(prefix="stepaudio2-bench-")),
                       grpc_port=_port(), http_port=_port(), metrics_port=_port())
    server = TritonProcess(cfg)
    server.start()
    try:
        url = f"127.0.0.1:{cfg.grpc_port}"
        rows = []
        for level in args.levels:
            tps = []
            for _ in range(args.runs):
                counts = [0] * level

                def worker(i: int, out: list[int]) -> None:
                    with StepAudio2Client(url) as c:
                        obj, audio = reqs[i]
                        out[i] = len(c.generate(obj, audio)["token_ids"])

                threads = [threading.Thread(target=worker, args=(i, counts)) for i in range(level)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                tps.append(sum(counts) / (time.perf_counter() - t0))
            rows.append((level, tps))
    finally:
        server.stop()

    print(f"preset={args.preset} tokens/request={args.tokens} runs={args.runs} (CPU, ONNX Runtime in Triton)")
    print(f"reference, one at a time   {summary(ref_tps)} tok/s")
    base = sorted(rows[0][1])[len(rows[0][1]) // 2]
    for level, tps in rows:
        med = sorted(tps)[len(tps) // 2]
        print(f"served, concurrency {level:>3}   {summary(tps)} tok/s   x{med / base:.2f} vs concurrency "
              f"{rows[0][0]}")


if __name__ == "__main__":
    main()
