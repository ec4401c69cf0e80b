"""Real-time factor of token2wav (compute seconds / audio seconds), offline and streaming, on one machine.

    .venv/bin/python bench/token2wav_rtf.py [--preset small] [--codes 250] [--runs 5] [--streams 1 3]

Streaming also reports the time to the first audio chunk, and, for several concurrent streams, the speed-up of
batched steps (`push_many`, one estimator call per Euler step for all streams) over running them one by one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint, summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--codes", type=int, default=250, help="speech codes per utterance (25 per second)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--streams", type=int, default=3)
    args = ap.parse_args()

    import torch

    from stepaudio2.token2wav.prompt import VoicePromptEncoder, default_voice_path
    from stepaudio2.token2wav.synth import Token2Wav

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ckpt = checkpoint(args.preset)
    t2w = Token2Wav(ckpt / "token2wav")
    prompt = VoicePromptEncoder(ckpt / "token2wav").encode_file(default_voice_path())
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 6561, size=args.codes).tolist()
    audio_s = args.codes * 960 / 24000

    t2w.offline(codes[:30], prompt)  # warm-up
    offline = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        t2w.offline(codes, prompt)
        offline.append((time.perf_counter() - t0) / audio_s)

    stream_rtf, first_chunk = [], []
    for _ in range(args.runs):
        session = t2w.start_stream(prompt)
        t0 = time.perf_counter()
        first = None
        for i in range(0, len(codes), 5):  # codes arrive 5 at a time, as from an LLM
            out = t2w.push(session, codes[i : i + 5])
            if first is None and out.size:
                first = time.perf_counter() - t0
        t2w.push(session, [], last=True)
        stream_rtf.append((time.perf_counter() - t0) / audio_s)
        first_chunk.append(first or 0.0)

    n = args.streams
    alone, batched = [], []
    for _ in range(args.runs):
        sessions = [t2w.start_stream(prompt, seed=k) for k in range(n)]
        t0 = time.perf_counter()
        for s in sessions:
            t2w.push(s, codes, last=True)
        alone.append(time.perf_counter() - t0)
        sessions = [t2w.start_stream(prompt, seed=k) for k in range(n)]
        t0 = time.perf_counter()
        t2w.push_many(sessions, [codes] * n, [True] * n)
        batched.append(time.perf_counter() - t0)

    print(f"token2wav preset={args.preset} codes={args.codes} ({audio_s:.1f} s of audio), torch threads "
          f"{torch.get_num_threads()}")
    print(f"offline RTF            {summary(offline)}")
    print(f"streaming RTF          {summary(stream_rtf)}")
    print(f"first audio chunk (s)  {summary(first_chunk)}")
    ratios = [a / b for a, b in zip(alone, batched, strict=True)]
    print(f"{n} streams: one by one {summary(alone)} s, batched {summary(batched)} s, speed-up {summary(ratios)}")


if __name__ == "__main__":
    main()
