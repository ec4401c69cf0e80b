"""What the OpenAI-compatible gateway adds: time to first audio byte and total time of voice-chat streams through
the gateway (HTTP + SSE, base64 pcm16 deltas) vs straight to Triton's `pipeline` over gRPC, at 1 and 8
concurrent streams. Real tritonserver, real gateway process (uvicorn), one machine, one run of this script.

    .venv/bin/python bench/gateway_overhead.py [--checkpoint DIR] [--levels 1 8] [--runs 3] [--tokens 400]

Default checkpoint: the taught tiny one (its voice-chat reply is fixed: 58 speech codes, 2.32 s of audio).
Definitions (client side): TTFA = first audio byte received - request sent; total = last byte (gRPC: the result
event; HTTP: `data: [DONE]`) - request sent. Runs alternate direct and gateway so that drift hits both alike.

Where the time goes: the mean TTFA of the same streams seen by the gateway (request received -> first audio delta
written, its `/metrics`) and by the pipeline (request arrived in Triton -> first PCM chunk sent, Triton's
`/metrics`), from the histograms' sum and count before and after each run.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402

from stepaudio2.serving.ports import unused_port  # noqa: E402

CLIP = ROOT / "stepaudio2" / "assets" / "hello_en.wav"




def _direct(url: str, audio: bytes, tokens: int) -> tuple[float, float, int]:
    from stepaudio2_client import StepAudio2Client
    from stepaudio2_gateway.prompts import SAMPLING_DEFAULTS

    # The sampling the gateway sends for a chat completion without sampling fields: both paths do the same work.
    sampling = {**SAMPLING_DEFAULTS["speech"], "max_new_tokens": tokens}
    with StepAudio2Client(url) as c:
        t0, first, samples = time.perf_counter(), None, 0
        for event in c.stream({"task": "voice-chat", "sampling": sampling}, audio):
            if event["type"] == "audio":
                first = first if first is not None else time.perf_counter() - t0
                samples += event["samples"]
        return first, time.perf_counter() - t0, samples


def _gateway(url: str, audio: bytes, tokens: int) -> tuple[float, float, int]:
    import httpx

    body = {"model": "step-audio-2-mini", "stream": True, "modalities": ["text", "audio"], "max_tokens": tokens,
            "audio": {"voice": "default", "format": "pcm16"},
            "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}]}]}
    payload = json.dumps(body).encode()  # encoded before the clock starts, as the gRPC client's inputs are
    # The HTTP client is made before the clock starts, as the gRPC client is in _direct: httpx.Client() alone
    # takes about 26 ms here (it loads the CA bundle for TLS), which an application pays once, not per request.
    with httpx.Client(timeout=600) as client:
        t0, first, samples, pending = time.perf_counter(), None, 0, b""
        with client.stream("POST", f"{url}/v1/chat/completions", content=payload,
                           headers={"content-type": "application/json"}) as resp:
            resp.raise_for_status()
            # SSE events split on bytes: httpx's iter_lines() on these long base64 lines cost the 8 client threads of
            # this one process more than the gateway did (first audio written by the gateway -> read here: 1.3 s).
            for chunk in resp.iter_bytes():
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: {"):
                        continue
                    msg = json.loads(event[6:])
                    delta = msg["choices"][0]["delta"] if msg.get("choices") else {}
                    data = (delta.get("audio") or {}).get("data")
                    if data:
                        first = first if first is not None else time.perf_counter() - t0
                        samples += len(base64.b64decode(data)) // 2
        return first, time.perf_counter() - t0, samples


def _level(fn, url: str, level: int, tokens: int) -> list[tuple[float, float, int]]:
    audio = CLIP.read_bytes()
    out: list = [None] * level

    def one(i: int) -> None:
        out[i] = fn(url, audio, tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(level)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(o is None or o[0] is None for o in out):
        raise RuntimeError("a stream produced no audio")
    return out


def _histogram(url: str, name: str) -> tuple[float, float]:
    """(sum, count) of a histogram on a Prometheus text endpoint, over all its label sets."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def _mean_between(before: tuple[float, float], after: tuple[float, float]) -> float:
    n = after[1] - before[1]
    return (after[0] - before[0]) / n if n else float("nan")


def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f} .. {max(values):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", help="default: the taught tiny checkpoint")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=400)
    args = ap.parse_args()

    from stepaudio2.serving.gateway_process import GatewayProcess
    from stepaudio2.serving.launcher import ServerConfig, TritonProcess

    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        from stepaudio2.export.taught import ensure_taught_checkpoint

        ckpt = ensure_taught_checkpoint()
    runtime = Path(tempfile.mkdtemp(prefix="stepaudio2-bench-gateway-"))
    cfg = ServerConfig(checkpoint=ckpt, runtime=runtime, grpc_port=unused_port(), http_port=unused_port(), metrics_port=unused_port())
    exported = ckpt.parent / f"{ckpt.name}-onnx"
    if exported.is_dir():  # the tests' cached export: the launcher's hash check then skips exporting
        import shutil

        shutil.copytree(exported, runtime / "model_repository")
    server = TritonProcess(cfg)
    server.start()
    grpc_url = f"127.0.0.1:{cfg.grpc_port}"
    gateway = GatewayProcess(grpc_url, "127.0.0.1", unused_port(), runtime / "gateway.log")
    gateway.start()
    paths = {"direct gRPC": (_direct, grpc_url), "gateway HTTP/SSE": (_gateway, gateway.url)}
    server_ttfa = (f"http://127.0.0.1:{cfg.metrics_port}/metrics", "stepaudio2_time_to_first_audio_seconds")
    gateway_ttfa = (f"{gateway.url}/metrics", "stepaudio2_gateway_time_to_first_audio_seconds")
    stats: dict[tuple[str, int], dict[str, list[float]]] = {}
    try:
        for fn, url in paths.values():  # warm-up: first-call costs stay out of the figures
            _level(fn, url, 1, args.tokens)
        for level in args.levels:
            for _ in range(args.runs):
                for name, (fn, url) in paths.items():
                    seen = {"server": _histogram(*server_ttfa), "gateway": _histogram(*gateway_ttfa)}
                    out = _level(fn, url, level, args.tokens)
                    st = stats.setdefault((name, level), {"ttfa50": [], "ttfa95": [], "total95": [], "audio": [],
                                                          "client_mean": [], "gateway_mean": [], "server_mean": []})
                    st["client_mean"].append(statistics.mean(o[0] for o in out))
                    st["server_mean"].append(_mean_between(seen["server"], _histogram(*server_ttfa)))
                    st["gateway_mean"].append(_mean_between(seen["gateway"], _histogram(*gateway_ttfa)))
                    st["ttfa50"].append(_p([o[0] for o in out], 0.5))
                    st["ttfa95"].append(_p([o[0] for o in out], 0.95))
                    st["total95"].append(_p([o[1] for o in out], 0.95))
                    st["audio"].append(statistics.median(o[2] / 24000 for o in out))
    finally:
        gateway.stop()
        server.stop()
    print(f"checkpoint={ckpt.name} runs={args.runs}; medians [min .. max] over runs; client-side times in s")
    print("| path | streams | TTFA p50 | TTFA p95 | total p95 | audio s/stream |")
    print("|---|---|---|---|---|---|")
    for (name, level), st in stats.items():
        print(f"| {name} | {level} | {_cell(st['ttfa50'])} | {_cell(st['ttfa95'])} | {_cell(st['total95'])} | "
              f"{statistics.median(st['audio']):.2f} |")
    print("Mean TTFA of the same streams, as each hop saw it (nan: that hop was not on the path)")
    print("| path | streams | client | gateway | pipeline (server) |")
    print("|---|---|---|---|---|")
    for (name, level), st in stats.items():
        print(f"| {name} | {level} | {_cell(st['client_mean'])} | {_cell(st['gateway_mean'])} | "
              f"{_cell(st['server_mean'])} |")
    for level in args.levels:
        d, g = stats[("direct gRPC", level)], stats[("gateway HTTP/SSE", level)]
        for key, label in (("ttfa95", "TTFA p95"), ("total95", "total p95")):
            ratio = statistics.median(g[key]) / statistics.median(d[key])
            print(f"{level} stream(s): gateway / direct {label} = x{ratio:.3f} ({(ratio - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
