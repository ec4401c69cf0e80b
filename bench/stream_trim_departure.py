"""How far our streamed audio departs from upstream's because of our streaming cache trims (issue 14 item 8).

Upstream never trims the conformer's streaming cache and keeps a prompt-sized + 100-frame estimator cache; we keep
the prompt + the last CONFORMER_CACHE_KEEP_TOKENS tokens and the prompt + last ESTIMATOR_CACHE_KEEP_FRAMES frames
(memory bound for long sessions). This streams the same codes twice on a random tiny token2wav, once with our
trims and once with the conformer cache untrimmed (upstream's behaviour; the estimator keeps the same number of
frames as upstream, only which prompt frames differs, see flow.py), same voice and seed, and reports
where the waveforms start to differ and by how much, per second of audio.

    python bench/stream_trim_departure.py [--preset tiny|small] [--seconds 30] [--chunk 25]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def _stream(t2w, prompt, codes: list[int], chunk: int) -> np.ndarray:
    s = t2w.start_stream(prompt, seed=0)
    out = []
    for i in range(0, len(codes), chunk):
        out.append(t2w.push(s, codes[i : i + chunk], last=i + chunk >= len(codes)))
    return np.concatenate(out)


def main() -> None:
    import stepaudio2.token2wav.flow as flow_mod
    from stepaudio2.token2wav.prompt import VoicePrompt
    from stepaudio2.token2wav.synth import Token2Wav
    from stepaudio2.token2wav.tiny_flow import write_tiny_flow
    from stepaudio2.token2wav.tiny_hift import write_tiny_hift

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--chunk", type=int, default=25)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    write_tiny_flow(root, seed=0, preset=args.preset)
    write_tiny_hift(root, seed=0, preset=args.preset)
    rng = np.random.default_rng(0)
    n_prompt = 75  # 3 s voice prompt
    prompt = VoicePrompt(tokens=rng.integers(0, 6561, n_prompt).astype(np.int64),
                         xvector=rng.standard_normal(192).astype(np.float32),
                         mel=(rng.standard_normal((2 * n_prompt, 80)) - 5.0).astype(np.float32), key="bench")
    codes = [int(c) for c in rng.integers(0, 6561, int(args.seconds * 25))]

    trimmed = _stream(Token2Wav(root), prompt, codes, args.chunk)
    keep = flow_mod.CONFORMER_CACHE_KEEP_TOKENS
    flow_mod.CONFORMER_CACHE_KEEP_TOKENS = 10**9  # upstream: the conformer cache is never trimmed
    try:
        untrimmed = _stream(Token2Wav(root), prompt, codes, args.chunk)
    finally:
        flow_mod.CONFORMER_CACHE_KEEP_TOKENS = keep
    n = min(len(trimmed), len(untrimmed))
    diff = np.abs(trimmed[:n] - untrimmed[:n])
    first = int(np.argmax(diff > 1e-6)) if (diff > 1e-6).any() else n
    print(f"preset {args.preset}, {args.seconds:.0f} s of codes, chunks of {args.chunk}: identical for the first "
          f"{first / 24000:.2f} s; max |diff| {diff.max():.4f}; rms(untrimmed) {np.sqrt((untrimmed ** 2).mean()):.4f}")
    for sec in range(int(n / 24000)):
        seg = slice(sec * 24000, (sec + 1) * 24000)
        ref = np.sqrt((untrimmed[seg] ** 2).mean()) + 1e-12
        print(f"  second {sec:3d}: max |diff| {diff[seg].max():.4f}  rms diff / rms {np.sqrt((diff[seg] ** 2).mean()) / ref:.3f}")


if __name__ == "__main__":
    main()
