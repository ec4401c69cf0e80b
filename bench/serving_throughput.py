"""LLM serving on vLLM: served tokens/s at concurrency 1, 4, 16 through the streaming pipeline (real
tritonserver, gRPC), TTFT p50/p95, server RSS idle and under load, and vLLM alone (in-process AsyncLLM, same
settings, same prompts) in the same run. Medians [min .. max] of --runs runs. Real-vocabulary `small` preset.

    .venv/bin/python bench/serving_throughput.py [--preset small] [--task chat|asr] [--tokens 64]
        [--levels 1 4 16] [--runs 3] [--baseline-python ../basevenv/bin/python --baseline-source ../baseline]

--task chat (default): text prompts, so served and alone do the same model work and the ratio is what serving
costs. --task asr: the shipped clips; served also runs the audio encoder (another model, about 60 ms of CPU per
clip on the small preset) that alone is spared, since alone is given the finished prompt embeddings.
TTFT: the random checkpoint's replies rarely decode to text, so no streamed event marks the first token; it is
timed as the time to the result of the same requests capped at one new token, `level` of them sent at once.

--baseline-*: also run the hand-made continuous batcher (commit 887cf36 in its own checkout and venv; set-up in
bench/_baseline_batcher.py) on the same checkpoint and requests, for the side-by-side ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, checkpoint, summary  # noqa: E402

from stepaudio2.serving.ports import unused_port  # noqa: E402

CLIPS = ["hello_en.wav", "nihao_zh.wav", "weather_en.wav"]




def _requests(n: int, tokens: int, task: str = "asr", sampling: str = "greedy") -> list[tuple[dict, bytes | None]]:
    """Requests of a fixed length (the random checkpoint rarely stops early; tokens/s counts the tokens each
    request really generated): ASR on the shipped clips, or text chat with a different question each. Greedy, or
    (`sampling="preset"`) the chat preset's sampling (temperature 0.7, top-p 0.9, repetition penalty 1.05, what
    chat and voice-chat traffic sends) seeded per request, so every engine draws the same stream each run."""
    def params(i: int) -> dict:
        if sampling == "greedy":
            return {"max_new_tokens": tokens}
        from stepaudio2.text.tasks import TASKS

        return {**TASKS["chat"].sampling, "max_new_tokens": tokens, "seed": i}

    if task == "chat":
        return [({"task": "chat", "text": f"Question {i}: what is the weather like in city number {i} today?",
                  "sampling": params(i)}, None) for i in range(n)]
    assets = ROOT / "stepaudio2" / "assets"
    return [({"task": "asr", "sampling": params(i)}, (assets / CLIPS[i % 3]).read_bytes()) for i in range(n)]


def one_token(reqs: list) -> list:
    """The same requests capped at one new token (the TTFT probe)."""
    return [({**obj, "sampling": {**obj["sampling"], "max_new_tokens": 1}}, audio) for obj, audio in reqs]


def _tree_rss_mib(pid: int) -> float:
    """RSS of a process and its whole session (tritonserver, Python stubs, vLLM's engine-core process)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[3]) != pid and int(entry.name) != pid:  # field 6 (session id) after the name
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1024


def served(url: str, reqs: list, level: int) -> tuple[float, list[float]]:
    """(tokens/s, per-request time to the result) for `level` concurrent streams."""
    from stepaudio2_client import StepAudio2Client

    counts, done = [0] * level, [0.0] * level

    def worker(i: int) -> None:
        obj, audio = reqs[i]
        with StepAudio2Client(url) as c:
            t0 = time.perf_counter()
            for event in c.stream(obj, audio):
                if event["type"] == "result":
                    counts[i], done[i] = len(event["token_ids"]), time.perf_counter() - t0

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(level)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0), done


def engine_prompts(ckpt: Path, reqs: list) -> list:
    """The exact prompt embeddings the served pipeline gives vLLM (reference prompt builder + audio encoder)."""
    import numpy as np

    from stepaudio2.engines.vllm_engine import build_prompt_embeds
    from stepaudio2.pipeline import ReferencePipeline
    from stepaudio2.request import request_from_json

    ref = ReferencePipeline(ckpt)
    table = ref.backend.model.model.embed_tokens.weight.detach().numpy()
    out = []
    for obj, audio in reqs:
        prompt = ref.build_prompt(request_from_json(obj, audio))
        chunks = ref.backend.encode_audio(prompt.mels, prompt.mel_lengths) if prompt.mels else []
        out.append(build_prompt_embeds(np.asarray(prompt.ids), table, table.shape[0],
                                       np.concatenate(chunks) if chunks else None,
                                       np.asarray(prompt.audio_spans) if chunks else None))
    return out


def engine_alone(qwen2_dir: Path, prompts: list, reqs: list, levels: list[int], runs: int, stops) -> dict:
    """vLLM's AsyncLLM in this process with the llm model's default settings, each prompt with its request's
    sampling: tokens/s and TTFT per level."""
    from stepaudio2.engines.sampling import SamplingParams
    from stepaudio2.engines.vllm_engine import EngineSettings, make_engine, vllm_sampling

    settings = EngineSettings(python_executable=sys.executable)
    params = [vllm_sampling(SamplingParams.from_dict(obj["sampling"]), stops) for obj, _ in reqs]

    async def one(engine, i: int, embeds, ttft: list, counts: list) -> None:
        t0, n = time.perf_counter(), 0
        async for out in engine.generate({"prompt_embeds": embeds}, params[i], request_id=f"r{i}-{time.time_ns()}"):
            n += len(out.outputs[0].token_ids)
            if n and not ttft[i]:
                ttft[i] = time.perf_counter() - t0
        counts[i] = n

    async def main() -> dict:
        engine = await make_engine(qwen2_dir, settings)
        try:
            await one(engine, 0, prompts[0], [0.0], [0])  # warm-up
            res: dict = {}
            for level in levels:
                for _ in range(runs):
                    ttft, counts = [0.0] * level, [0] * level
                    t0 = time.perf_counter()
                    await asyncio.gather(*(one(engine, i, prompts[i], ttft, counts) for i in range(level)))
                    res.setdefault(level, []).append((sum(counts) / (time.perf_counter() - t0), ttft))
            return res
        finally:
            engine.shutdown()

    return asyncio.run(main())


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--task", choices=("chat", "asr"), default="chat")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sampling", choices=("greedy", "preset"), default="greedy",
                    help="preset: the chat preset's sampling, seeded per request (see _requests)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline-python", help="python of a venv with git main's code (the hand-made batcher)")
    ap.add_argument("--baseline-source", help="checkout of git main (its stepaudio2 + bench/)")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--runtime", help="serving runtime folder to reuse (its export is kept when up to date)")
    args = ap.parse_args()

    from stepaudio2.serving.launcher import ServerConfig, TritonProcess

    ckpt = checkpoint(args.preset)
    reqs = _requests(max(args.levels), args.tokens, args.task, args.sampling)
    runtime = Path(args.runtime) if args.runtime else Path(tempfile.mkdtemp(prefix="stepaudio2-bench-"))
    cfg = ServerConfig(checkpoint=ckpt, runtime=runtime, grpc_port=unused_port(), http_port=unused_port(), metrics_port=unused_port())
    server = TritonProcess(cfg)
    server.start()
    rows, rss, ttft = {}, {}, {}
    try:
        url = f"127.0.0.1:{cfg.grpc_port}"
        served(url, reqs, 1)  # warm-up (first request loads lazily initialised state)
        time.sleep(2)
        rss["idle"] = _tree_rss_mib(server.proc.pid)
        for level in args.levels:
            peak = [0.0]
            stop = threading.Event()

            def sample(peak=peak, stop=stop) -> None:
                while not stop.wait(0.25):
                    peak[0] = max(peak[0], _tree_rss_mib(server.proc.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            rows[level] = [served(url, reqs, level) for _ in range(args.runs)]
            ttft[level] = [t for _ in range(args.runs) for t in served(url, one_token(reqs), level)[1]]
            stop.set()
            sampler.join()
            rss[f"c={level}"] = peak[0]
    finally:
        server.stop()

    from stepaudio2.config import load_config
    from stepaudio2.request import stop_ids
    from stepaudio2.text import StepAudio2Tokenizer

    stops = stop_ids(StepAudio2Tokenizer.from_dir(ckpt), load_config(ckpt), __import__(
        "stepaudio2.engines.sampling", fromlist=["SamplingParams"]).SamplingParams())
    alone = engine_alone(runtime / "model_repository" / "llm" / "1" / "qwen2", engine_prompts(ckpt, reqs),
                         reqs, args.levels, args.runs, stops)

    baseline = None
    if args.baseline_python and args.baseline_source:
        out = subprocess.run(
            [args.baseline_python, str(Path(__file__).with_name("_baseline_batcher.py")), "--checkpoint", str(ckpt),
             "--tokens", str(args.tokens), "--task", args.task, "--sampling", args.sampling, "--levels", *map(str, args.levels), "--runs", str(args.runs)],
            # From inside that checkout: the server's stubs would otherwise find this checkout's stepaudio2 first.
            cwd=args.baseline_source, env={**os.environ, "PYTHONPATH": str(Path(args.baseline_source))},
            capture_output=True, text=True)
        if out.returncode == 0:
            baseline = json.loads(out.stdout.strip().splitlines()[-1])
        else:  # report the served and engine figures anyway; say why the side-by-side is missing
            print(f"baseline failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)

    med = statistics.median
    print(f"preset={args.preset} (vocab {load_config(ckpt).text.vocab_size}) task={args.task} "
          f"sampling={args.sampling} tokens/request={args.tokens} runs={args.runs} cpus={os.cpu_count()}")
    print("| concurrency | served tok/s | vLLM alone tok/s | served/alone | served TTFT p50 / p95 s "
          "| alone TTFT p50 / p95 s |" + (" hand-made batcher tok/s | vLLM served / batcher |" if baseline else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if baseline else ""))
    c1 = med(t for t, _ in rows[args.levels[0]])
    for level in args.levels:
        tps = [t for t, _ in rows[level]]
        eng = [t for t, _ in alone[level]]
        first = [x for _, tt in alone[level] for x in tt]
        line = (f"| {level} | {summary(tps)} | {summary(eng)} | {med(tps) / med(eng):.2f} | "
                f"{pct(ttft[level], 0.5):.3f} / {pct(ttft[level], 0.95):.3f} | "
                f"{pct(first, 0.5):.3f} / {pct(first, 0.95):.3f} |")
        if baseline:
            b = baseline[str(level)]
            line += f" {summary(b)} | {med(tps) / med(b):.2f} |"
        print(line)
    top = args.levels[-1]
    print(f"served c={top} / c={args.levels[0]}: x{med(t for t, _ in rows[top]) / c1:.2f}")
    print("server RSS MiB (tritonserver + stubs + vLLM engine core): "
          + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"served": {k: [t for t, _ in v] for k, v in rows.items()},
                                               "served_ttft": ttft,
                                               "alone": {k: [t for t, _ in v] for k, v in alone.items()},
                                               "baseline": baseline, "rss_mib": rss}, indent=2))


if __name__ == "__main__":
    main()
