"""The hand-made continuous batcher (git main's `llm` model) served on a given checkpoint, same requests as
bench/serving_throughput.py. Run with main's own venv and PYTHONPATH=<main checkout>; prints one JSON line
{level: [tok/s per run]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_throughput import _port, _requests, served  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from stepaudio2.serving.launcher import ServerConfig, TritonProcess

    reqs = _requests(max(args.levels), args.tokens)
    cfg = ServerConfig(checkpoint=Path(args.checkpoint), runtime=Path(tempfile.mkdtemp(prefix="stepaudio2-base-")),
                       grpc_port=_port(), http_port=_port(), metrics_port=_port())
    server = TritonProcess(cfg)
    server.start(timeout_s=900)
    try:
        url = f"127.0.0.1:{cfg.grpc_port}"
        served(url, reqs, 1)  # warm-up
        out = {str(level): [served(url, reqs, level)[0] for _ in range(args.runs)] for level in args.levels}
    finally:
        server.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
