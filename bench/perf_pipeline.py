"""Triton's own perf_analyzer against the streaming `pipeline` (chat, N new tokens) on the vLLM-backed server:
requests/s and response (token event) throughput at several concurrencies. perf_analyzer 2.51 lives in its own
tools venv (ecosystem R2: it pins protobuf<5 / numpy<2 and links libcudart, which runs without a GPU):

    apt-get install -y libb64-0d
    python3 -m venv .build/tools && .build/tools/bin/pip install tritonclient==2.51.0 nvidia-cuda-runtime-cu12
    .venv/bin/python bench/perf_pipeline.py [--preset small] [--tokens 16] [--levels 1 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, checkpoint  # noqa: E402

from stepaudio2.serving.ports import unused_port  # noqa: E402

TOOLS = ROOT / ".build" / "tools"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--interval-ms", type=int, default=8000)
    args = ap.parse_args()

    from stepaudio2.serving.launcher import ServerConfig, TritonProcess

    pa = TOOLS / "bin" / "perf_analyzer"
    if not pa.is_file():
        sys.exit(f"no {pa}: see this script's docstring")
    work = Path(tempfile.mkdtemp(prefix="stepaudio2-pa-"))
    request = {"task": "chat", "text": "Tell me about the weather.",
               "sampling": {"temperature": 0, "max_new_tokens": args.tokens}}
    (work / "input.json").write_text(json.dumps({"data": [{"request": {"content": [json.dumps(request)],
                                                                       "shape": [1]}}]}))
    cfg = ServerConfig(checkpoint=checkpoint(args.preset), runtime=work / "runtime", grpc_port=unused_port(),
                       http_port=unused_port(), metrics_port=unused_port())
    server = TritonProcess(cfg)
    server.start()
    cudart = next((TOOLS / "lib").glob("python3*/site-packages/nvidia/cuda_runtime/lib"))
    env = {**os.environ, "LD_LIBRARY_PATH": str(cudart)}
    try:
        for level in args.levels:
            csv = work / f"c{level}.csv"
            out = subprocess.run(
                [str(pa), "-m", "pipeline", "-u", f"127.0.0.1:{cfg.grpc_port}", "-i", "grpc", "--streaming",
                 "--input-data", str(work / "input.json"), "--concurrency-range", f"{level}:{level}",
                 "--measurement-interval", str(args.interval_ms), "-f", str(csv),
                 # This shared 2-core VM drifts: 10 % (the default) failed to stabilise in one of four levels.
                 "--stability-percentage", "25"],
                env=env, capture_output=True, text=True, timeout=600)
            lines = [ln.strip() for ln in out.stdout.splitlines()
                     if "hroughput" in ln or "latency" in ln.lower() or "Concurrency:" in ln]
            print(f"--- concurrency {level} (rc={out.returncode})")
            print("\n".join(lines[-6:]) if lines and out.returncode == 0 else out.stdout[-2000:] + out.stderr[-2000:])
            if csv.is_file():  # responses/s: every streamed event (text deltas and the result) counts
                header, row = csv.read_text().splitlines()[:2]
                cols = dict(zip(header.split(","), row.split(","), strict=True))
                print(f"requests/s {float(cols['Inferences/Second']):.2f}, "
                      f"responses/s {float(cols['Response Throughput']):.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
