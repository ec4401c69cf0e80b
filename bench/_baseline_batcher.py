"""The hand-made continuous batcher (the `llm` model before vLLM: a worktree of 887cf36) served on a given
checkpoint, same requests as bench/serving_throughput.py; prints one JSON line {level: [tok/s per run]}. Run
with a Python where that checkout is installed, e.g. a venv that sees this one's packages:

    git worktree add ../baseline 887cf36 && python3 -m venv ../basevenv
    echo $PWD/.venv/lib/python3.11/site-packages > ../basevenv/lib/python3.11/site-packages/main.pth
    ../basevenv/bin/pip install setuptools==78.1.1 && ../basevenv/bin/pip install --no-deps --no-build-isolation -e ../baseline
    .venv/bin/python bench/serving_throughput.py --baseline-python ../basevenv/bin/python --baseline-source ../baseline
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_throughput import _requests, served  # noqa: E402

from stepaudio2.serving.ports import unused_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--task", choices=("chat", "asr"), default="chat")
    ap.add_argument("--sampling", choices=("greedy", "preset"), default="greedy")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from stepaudio2.serving.launcher import ServerConfig, TritonProcess

    reqs = _requests(max(args.levels), args.tokens, args.task, args.sampling)
    cfg = ServerConfig(checkpoint=Path(args.checkpoint), runtime=Path(tempfile.mkdtemp(prefix="stepaudio2-base-")),
                       grpc_port=unused_port(), http_port=unused_port(), metrics_port=unused_port())
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
