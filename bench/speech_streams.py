"""Streaming speech replies through the served pipeline (real tritonserver, gRPC): time to first audio and
real-time factor at 1, 4 and 8 concurrent voice-chat streams, with token2wav's cross-stream batching on and off
(the `batching` parameter of model_repository/token2wav/config.pbtxt). One machine, one run of this script.

    .venv/bin/python bench/speech_streams.py [--preset small] [--tokens 160] [--levels 1 4 8] [--runs 3]

Stream i sends clip i mod 3 with sampling seed 1000 + i, so each run and each configuration gets the same
replies. Definitions (client side): TTFA = first audio chunk received - request sent; RTF = (last event - request sent)
/ seconds of audio received (below 1: the reply is produced faster than it plays). The server's own TTFA (request
arrival -> first chunk sent, from the result's `audio` summary) is shown next to it: the gap is gRPC and client.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, checkpoint  # noqa: E402

from stepaudio2.serving.ports import unused_port  # noqa: E402

CLIPS = ["hello_en.wav", "weather_en.wav", "nihao_zh.wav"]




def _one_stream(url: str, audio: bytes, tokens: int, out: list, i: int) -> None:
    from stepaudio2_client import StepAudio2Client

    with StepAudio2Client(url) as c:
        t0, first, samples, underruns, server_ttfa = time.perf_counter(), None, 0, 0, float("nan")
        # Seeded by stream index: every layout and run gets the same replies (unseeded, the preset's temperature
        # moved single-stream TTFA between 0.47 and 1.03 s from run to run on one server).
        request = {"task": "voice-chat", "sampling": {"max_new_tokens": tokens, "seed": 1000 + i}}
        for event in c.stream(request, audio):
            if event["type"] == "audio":
                first = first if first is not None else time.perf_counter() - t0
                samples += event["samples"]
            elif event["type"] == "result" and event.get("audio"):
                underruns = event["audio"]["underruns"]
                server_ttfa = event["audio"].get("time_to_first_audio_s") or float("nan")
        total = time.perf_counter() - t0
    out[i] = (first, total / (samples / 24000) if samples else float("nan"), samples / 24000, underruns,
              server_ttfa)


def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run_level(url: str, level: int, runs: int, tokens: int) -> dict[str, list[float]]:
    clips = [(ROOT / "stepaudio2" / "assets" / CLIPS[i % len(CLIPS)]).read_bytes() for i in range(level)]
    stats: dict[str, list[float]] = {"p50": [], "p95": [], "server_p95": [], "rtf": [], "audio_s": [],
                                     "underruns": []}
    for _ in range(runs):
        out: list = [None] * level
        threads = [threading.Thread(target=_one_stream, args=(url, clips[i], tokens, out, i)) for i in range(level)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ttfa = [o[0] for o in out if o and o[0] is not None]
        if len(ttfa) != level:
            raise RuntimeError(f"{level - len(ttfa)} stream(s) produced no audio")
        stats["p50"].append(_p(ttfa, 0.5))
        stats["p95"].append(_p(ttfa, 0.95))
        stats["server_p95"].append(_p([o[4] for o in out], 0.95))
        stats["rtf"].append(statistics.median(o[1] for o in out))
        stats["audio_s"].append(statistics.median(o[2] for o in out))
        stats["underruns"].append(sum(o[3] for o in out))
    return stats


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f} .. {max(values):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from stepaudio2.serving.launcher import ServerConfig, TritonProcess

    ckpt = checkpoint(args.preset)
    results: dict[tuple[str, int], dict[str, list[float]]] = {}
    for batching in ("true", "false"):
        cfg = ServerConfig(checkpoint=ckpt, runtime=Path(tempfile.mkdtemp(prefix="stepaudio2-bench-speech-")),
                           grpc_port=unused_port(), http_port=unused_port(), metrics_port=unused_port(),
                           model_parameters={"token2wav": {"batching": batching}})
        server = TritonProcess(cfg)
        server.start()
        try:
            url = f"127.0.0.1:{cfg.grpc_port}"
            run_level(url, 1, 1, args.tokens)  # warm-up: first-call costs stay out of the figures
            for level in args.levels:
                results[(batching, level)] = run_level(url, level, args.runs, args.tokens)
        finally:
            server.stop()

    print(f"preset={args.preset} max_new_tokens={args.tokens} runs={args.runs}; medians [min .. max] over runs "
          "(CPU, torch token2wav in the Python backend)")
    print("| batching | streams | TTFA p50 s | TTFA p95 s | server TTFA p95 s | RTF | audio s/stream | underruns/run |")
    print("|---|---|---|---|---|---|---|---|")
    for (batching, level), st in results.items():
        print(f"| {'on' if batching == 'true' else 'off'} | {level} | {_cell(st['p50'])} | {_cell(st['p95'])} | "
              f"{_cell(st['server_p95'])} | {_cell(st['rtf'])} | {statistics.median(st['audio_s']):.2f} | "
              f"{statistics.median(st['underruns']):g} |")
    lo, hi = min(args.levels), max(args.levels)
    for batching in ("true", "false"):
        ratio = statistics.median(results[(batching, hi)]["p95"]) / statistics.median(results[(batching, lo)]["p95"])
        print(f"TTFA p95 at {hi} / at {lo} streams, batching {'on' if batching == 'true' else 'off'}: x{ratio:.2f}")


if __name__ == "__main__":
    main()
