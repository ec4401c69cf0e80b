"""token2wav synthesis driver: speech codes + voice prompt -> 24 kHz audio (spec §4.2-§4.4).

`Token2Wav` holds the flow and the HiFT vocoder (both stateless) and a small cache of per-voice stream setups.
- `offline(codes, prompt, seed)`: N codes -> 2N mel frames -> 2N*480 samples.
- Streaming: `start_stream(prompt, seed) -> StreamSession`, then `push(session, codes, last)` as codes arrive,
  or `push_many(sessions, codes_list, lasts)` to advance many streams with one estimator call per Euler step.
  All stream state (flow caches, code buffer, vocoder tails, random generator) is in the StreamSession.

Codes policy: the pad code (== the flow's vocab size, 6561) is dropped silently; a negative code, one above
the pad code or a non-integer is an InvalidInputError, and so is a request (or a whole stream) without any
speech code. Output samples are float32 clipped to [-1, 1].
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stepaudio2.errors import InvalidInputError
from stepaudio2.token2wav.flow import FlowModel, FlowStreamState, PromptLike, load_flow

HIFT_WEIGHTS = "hift.pt"
SAMPLE_RATE = 24000
CHUNK_TOKENS = 25  # codes per streaming chunk (about 1 s of audio), plus the flow's lookahead codes
HIFT_OVERLAP_FRAMES = 8  # mel frames re-fed to HiFT at each chunk start (160 ms), cross-faded in the waveform
SAMPLES_PER_FRAME = 480  # HiFT hop at 24 kHz when the vocoder does not say (8*5*3 upsampling x iSTFT hop 4)
DEFAULT_VOICE_CACHE = 2  # per-voice stream setups kept (each holds the prompt's estimator caches)


def sanitize_codes(codes: Iterable[int] | np.ndarray, pad_code: int) -> list[int]:
    """Drop the pad code; reject anything outside [0, pad_code] or not an integer (InvalidInputError)."""
    arr = np.asarray(list(codes) if not isinstance(codes, np.ndarray) else codes)
    if arr.size == 0:
        return []
    if arr.ndim != 1:
        raise InvalidInputError(f"speech codes must be a flat sequence, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise InvalidInputError("speech codes must be integers")
    bad = arr[(arr < 0) | (arr > pad_code)]
    if bad.size:
        raise InvalidInputError(
            f"speech code {int(bad[0])} is outside [0, {pad_code - 1}] (and {pad_code}, the pad code, is dropped)"
        )
    return [int(c) for c in arr if c != pad_code]


def plan_chunks(
    buffer: Sequence[int], last: bool, chunk: int = CHUNK_TOKENS, lookahead: int = 3
) -> tuple[list[tuple[list[int], bool]], list[int]]:
    """The streaming chunk rule (spec §4.3): while the buffer holds chunk+lookahead codes, emit its first
    chunk+lookahead codes and keep everything from `chunk` on (the lookahead is reused); at the end, emit the
    rest as the last chunk (possibly empty). Returns ([(codes, is_last), ...], remaining buffer)."""
    buf = list(buffer)
    out: list[tuple[list[int], bool]] = []
    while len(buf) >= chunk + lookahead:
        out.append((buf[: chunk + lookahead], False))
        buf = buf[chunk:]
    if last:
        out.append((buf, True))
        buf = []
    return out, buf


@dataclass
class StreamSession:
    """One synthesis stream: flow caches, pending codes, HiFT tails and the stream's own random generator."""

    flow: FlowStreamState
    generator: torch.Generator
    buffer: list[int] = field(default_factory=list)
    mel_tail: torch.Tensor | None = None  # (1, mel, <= 8) last mel frames fed to HiFT
    source_tail: torch.Tensor | None = None  # (1, 1, <= 3840) HiFT excitation for those frames
    speech_tail: torch.Tensor | None = None  # (1, <= 3840) samples held back for the cross-fade
    codes_in: int = 0  # speech codes accepted so far (pad codes excluded)
    samples_out: int = 0
    finished: bool = False


class Token2Wav:
    """Flow + HiFT from a token2wav directory (flow.yaml, flow.pt, hift.pt).

    `engine`: "torch" (default) runs the torch modules; "onnx-cpu", "onnx-cuda" or "tensorrt" run the flow
    encoder, the DiT estimator and HiFT (F0 + decoder) on the exported graphs in `graphs_dir` (default:
    `token2wav_dir`, which is right for `<repo>/token2wav/1` of an exported model repository). Same API and,
    within float tolerance, the same audio on every engine; the seeded HiFT source stays in torch."""

    def __init__(
        self,
        token2wav_dir: str | Path,
        voice_cache_size: int = DEFAULT_VOICE_CACHE,
        engine: str = "torch",
        graphs_dir: str | Path | None = None,
    ) -> None:
        from stepaudio2.token2wav.hift import load_hift

        root = Path(token2wav_dir)
        self.flow: FlowModel = load_flow(root)
        self.hift = load_hift(root / HIFT_WEIGHTS)
        self.engine = engine
        if engine != "torch":
            from stepaudio2.token2wav.engine import GraphEngine

            graphs = GraphEngine(graphs_dir or root, engine)
            self.flow.set_engine(graphs)
            self.hift.engine = graphs
        self.pad_code = self.flow.cfg.vocab_size
        self.lookahead = self.flow.pre_lookahead_len
        self.samples_per_frame = int(getattr(self.hift, "hop_length", SAMPLES_PER_FRAME))
        self.overlap_samples = HIFT_OVERLAP_FRAMES * self.samples_per_frame
        self.sample_rate = int(getattr(self.hift, "sampling_rate", SAMPLE_RATE))
        # Rising half fades the new chunk in, falling half fades the held-back tail out.
        self._window = torch.from_numpy(np.hamming(2 * self.overlap_samples).astype(np.float32))
        self._voice_cache_size = voice_cache_size
        self._voices: OrderedDict[str, FlowStreamState] = OrderedDict()
        self._lock = threading.Lock()

    # ---- offline ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def offline(self, codes: Sequence[int] | np.ndarray, prompt: PromptLike, seed: int = 0) -> np.ndarray:
        """All codes at once -> float32 samples at 24 kHz (2 mel frames and 960 samples per code)."""
        clean = sanitize_codes(codes, self.pad_code)
        if not clean:
            raise InvalidInputError("no speech codes to synthesise")
        mel = self.flow.inference(clean, prompt)
        wav, _ = self.hift.inference(mel.unsqueeze(0), None, torch.Generator().manual_seed(seed))
        return self._finish(wav[0])

    @torch.no_grad()
    def offline_many(
        self, codes_list: Sequence[Sequence[int] | np.ndarray], prompts: Sequence[PromptLike], seeds: Sequence[int]
    ) -> list[np.ndarray]:
        """`offline` for several requests: one padded flow batch (one estimator call per Euler step), then the
        vocoder per item with its own seed. Item i equals `offline(codes_list[i], prompts[i], seeds[i])`."""
        if not (len(codes_list) == len(prompts) == len(seeds)):
            raise InvalidInputError("offline_many needs one prompt and one seed per codes sequence")
        clean = [sanitize_codes(c, self.pad_code) for c in codes_list]
        for i, c in enumerate(clean):
            if not c:
                raise InvalidInputError(f"request {i}: no speech codes to synthesise")
        mels = self.flow.inference_batch(clean, list(prompts))
        out = []
        for mel, seed in zip(mels, seeds, strict=True):
            wav, _ = self.hift.inference(mel.unsqueeze(0), None, torch.Generator().manual_seed(int(seed)))
            out.append(self._finish(wav[0]))
        return out

    # ---- streaming --------------------------------------------------------------------------------------------

    def _voice_state(self, prompt: PromptLike) -> FlowStreamState:
        """The flow state after the voice prompt; computed once per voice (prompt.key) and copied per stream."""
        key = getattr(prompt, "key", None)
        if key is not None:
            with self._lock:
                hit = self._voices.get(key)
                if hit is not None:
                    self._voices.move_to_end(key)
                    return hit.copy()
        state = self.flow.setup_stream(prompt)
        if key is not None and self._voice_cache_size > 0:
            with self._lock:
                self._voices[key] = state
                while len(self._voices) > self._voice_cache_size:
                    self._voices.popitem(last=False)
        return state.copy()

    def start_stream(self, prompt: PromptLike, seed: int = 0) -> StreamSession:
        """A new stream in the prompt's voice; `seed` drives the vocoder's random source of this stream only."""
        return StreamSession(flow=self._voice_state(prompt), generator=torch.Generator().manual_seed(seed))

    def push(self, session: StreamSession, codes: Sequence[int] | np.ndarray, last: bool = False) -> np.ndarray:
        """Add codes to a stream; returns the samples that are final so far (may be empty)."""
        return self.push_many([session], [codes], [last])[0]

    @torch.no_grad()
    def push_many(
        self,
        sessions: Sequence[StreamSession],
        codes_list: Sequence[Sequence[int] | np.ndarray],
        lasts: Sequence[bool],
        interrupt: Callable[[int], bool] | None = None,
    ) -> list[np.ndarray]:
        """`push` for several streams at once: every due chunk goes through `batched_stream_step`, so the flow
        estimator runs once per Euler step for all streams with a chunk ready. Inputs are checked before any
        stream changes; a stream that fails later must be dropped. `interrupt(k)` is asked before each Euler
        step of the first chunk: True raises RoundInterrupted with every stream as it was (push again)."""
        if not (len(sessions) == len(codes_list) == len(lasts)):
            raise InvalidInputError("push_many needs one codes list and one last flag per session")
        if len({id(s) for s in sessions}) != len(sessions):
            raise InvalidInputError("push_many got the same session twice")
        plans = []
        for i, (s, codes, last) in enumerate(zip(sessions, codes_list, lasts, strict=True)):
            if s.finished:
                raise InvalidInputError(f"stream {i} has already ended")
            clean = sanitize_codes(codes, self.pad_code)
            if last and s.codes_in + len(clean) == 0:
                raise InvalidInputError(f"stream {i} ended without any speech code")
            chunks, rest = plan_chunks(s.buffer + clean, bool(last), CHUNK_TOKENS, self.lookahead)
            plans.append((clean, chunks, rest))

        pieces: list[list[np.ndarray]] = [[] for _ in sessions]
        rounds = max((len(chunks) for _, chunks, _ in plans), default=0)
        for r in range(rounds):
            idx = [i for i, (_, chunks, _) in enumerate(plans) if r < len(chunks)]
            mels = self.flow.batched_stream_step(
                [sessions[i].flow for i in idx],
                [plans[i][1][r][0] for i in idx],
                [plans[i][1][r][1] for i in idx],
                interrupt if r == 0 else None,  # later chunks follow changed states: no way back
            )
            vocoded = self._vocode_many([sessions[i] for i in idx], mels, [plans[i][1][r][1] for i in idx])
            for i, wav in zip(idx, vocoded, strict=True):
                pieces[i].append(wav)
        out = []
        for s, last, p, (clean, _, rest) in zip(sessions, lasts, pieces, plans, strict=True):
            s.codes_in += len(clean)
            s.buffer = rest
            wav = np.concatenate(p) if p else np.zeros(0, dtype=np.float32)
            s.samples_out += wav.size
            s.finished = bool(last)
            out.append(wav)
        return out

    def _vocode_many(self, sessions: Sequence[StreamSession], mels: Sequence[torch.Tensor],
                     lasts: Sequence[bool]) -> list[np.ndarray]:
        """HiFT on each stream's [previous 8 mel frames, chunk mel], with its previous excitation as cache_source.
        Streams whose inputs have the same length (the usual case: every chunk of a round is 25 codes) share one
        HiFT call, each row with its own generator, so a round costs one vocoder call instead of one per stream.
        The first 3840 samples (the re-synthesised overlap) are Hamming cross-faded with the held-back tail, and
        the last 3840 are held back unless this is the last chunk."""
        inputs = [mel.unsqueeze(0) if s.mel_tail is None else torch.cat([s.mel_tail, mel.unsqueeze(0)], dim=2)
                  for s, mel in zip(sessions, mels, strict=True)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (s, mel_in) in enumerate(zip(sessions, inputs, strict=True)):
            if mel_in.shape[2] > 0:
                cached = 0 if s.source_tail is None else s.source_tail.shape[2]
                groups.setdefault((mel_in.shape[2], cached), []).append(i)
        out = [np.zeros(0, dtype=np.float32) for _ in sessions]
        for (_, cached), rows in groups.items():
            cache = torch.cat([sessions[i].source_tail for i in rows]) if cached else None
            speech, source = self.hift.inference(torch.cat([inputs[i] for i in rows]), cache,
                                                 [sessions[i].generator for i in rows])
            for k, i in enumerate(rows):
                out[i] = self._after_vocoder(sessions[i], inputs[i], speech[k : k + 1], source[k : k + 1], lasts[i])
        return out

    def _after_vocoder(self, s: StreamSession, mel_in: torch.Tensor, speech: torch.Tensor, source: torch.Tensor,
                       last: bool) -> np.ndarray:
        """Cross-fade one stream's new samples with its held-back tail, keep the new tails, trim the overlap."""
        tail = s.speech_tail
        if tail is not None and tail.shape[1] > 0:
            n = min(tail.shape[1], speech.shape[1])
            half, w = self.overlap_samples, self._window.to(speech.device)
            faded = speech[:, :n] * w[:n] + tail[:, tail.shape[1] - n :] * w[half : half + n]
            speech = torch.cat([faded, speech[:, n:]], dim=1)
        keep = self.overlap_samples
        s.mel_tail = mel_in[:, :, max(0, mel_in.shape[2] - HIFT_OVERLAP_FRAMES) :]
        s.source_tail = source[:, :, max(0, source.shape[2] - keep) :]
        s.speech_tail = speech[:, max(0, speech.shape[1] - keep) :]
        if not last:
            speech = speech[:, : max(0, speech.shape[1] - keep)]
        return self._finish(speech[0])

    @staticmethod
    def _finish(wav: torch.Tensor) -> np.ndarray:
        return np.clip(wav.detach().float().cpu().numpy(), -1.0, 1.0).astype(np.float32)
