"""Cross-request batching of token2wav: chunks of many streams go through one estimator call per Euler step.

`SynthesisScheduler` owns every server-side synthesis stream (keyed by ids it generates itself) and one loop
thread. Each round takes the oldest pending push of up to `max_batch` streams, streams still waiting for their
first audio first, and advances them together with `Token2Wav.push_many`; offline (whole reply) jobs are
batched with `Token2Wav.offline_many`. Streams are released on their last chunk, on cancel, on error, and after
`stream_ttl_s` without a push. Results go back through per-job callbacks, so the Triton adapter stays thin and
this logic is tested in-process.

Late joiners: a round made only of first chunks is restarted when another stream's first chunk arrives before its
Euler step `join_until_step` + 1 (at most `max_restarts` times in a row), so that chunk joins it instead of
waiting for the whole round. Concurrent replies reach token2wav a few milliseconds apart (more so through a
remote front), and a stream that missed a round by that much waited a round longer for its first audio.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from stepaudio2.errors import CapacityError, InvalidInputError
from stepaudio2.token2wav.flow import PromptLike, RoundInterrupted
from stepaudio2.token2wav.synth import CHUNK_TOKENS, StreamSession, Token2Wav, plan_chunks, sanitize_codes

Done = Callable[[np.ndarray | None, BaseException | None], None]  # (pcm, error): exactly one is set

# A restart costs the steps already run; joining later than this would cost the round's streams more than the
# late stream saves (the flow runs N_TIMESTEPS = 10 Euler steps per chunk, then the vocoder).
JOIN_UNTIL_STEP = 4
# In a row: a steady trickle of first chunks cannot hold a round back for ever. With 2, a first chunk missed the
# round by 0 to 30 ms in 3 of 8 traced 8-stream split rounds; 4 lowered the split's 8-stream p95 (README).
MAX_RESTARTS = 4


@dataclass
class RoundStats:
    """One loop round: how many streams had a chunk in the estimator batch, compute time, audio produced."""

    kind: str  # "stream" | "offline" | "restarted" (stopped for late joiners: compute spent, no audio)
    estimator_batch: int
    compute_s: float
    audio_s: float


@dataclass
class _Push:
    codes: list[int]
    last: bool
    done: Done
    arrived: float


@dataclass
class _Stream:
    session: StreamSession
    touched: float
    jobs: deque[_Push] = field(default_factory=deque)
    accepted: int = 0  # codes accepted so far (pad codes excluded)
    ended: bool = False  # a push with last=True was accepted


@dataclass
class _Offline:
    codes: list[int]
    prompt: PromptLike
    seed: int
    done: Done
    arrived: float


class SynthesisScheduler:
    def __init__(
        self,
        token2wav: Token2Wav,
        *,
        max_batch: int = 16,
        batching: bool = True,
        stream_ttl_s: float = 120.0,
        max_streams: int = 256,
        on_round: Callable[[RoundStats], None] | None = None,
        join_until_step: int = JOIN_UNTIL_STEP,
        max_restarts: int = MAX_RESTARTS,
    ) -> None:
        self.t2w = token2wav
        self.max_batch = max_batch if batching else 1
        self.stream_ttl_s = stream_ttl_s
        self.max_streams = max_streams
        self.on_round = on_round
        self.join_until_step = join_until_step  # < 0: rounds are never restarted
        self.max_restarts = max_restarts
        self._streams: dict[str, _Stream] = {}
        self._offline: deque[_Offline] = deque()
        self._cv = threading.Condition(threading.RLock())  # re-entrant: push() inside hold()
        self._running = True
        self._restarts = 0  # restarts since the last round that ran to its end
        self._thread = threading.Thread(target=self._loop, name="token2wav-scheduler", daemon=True)
        self._thread.start()

    # ---- requests (any thread) ----------------------------------------------------------------------------------

    def start_stream(self, prompt: PromptLike, seed: int = 0) -> str:
        """Open a stream in the prompt's voice; returns its server-generated id."""
        session = self.t2w.start_stream(prompt, seed=seed)
        stream_id = uuid.uuid4().hex
        with self._cv:
            self._expire(time.monotonic())
            if len(self._streams) >= self.max_streams:
                raise CapacityError(f"too many open synthesis streams (limit {self.max_streams}); retry later")
            self._streams[stream_id] = _Stream(session, time.monotonic())
        return stream_id

    def push(self, stream_id: str, codes: Sequence[int] | np.ndarray, last: bool, done: Done) -> None:
        """Queue codes for a stream; `done` gets the PCM that became final (maybe empty). Bad input raises here."""
        clean = sanitize_codes(codes, self.t2w.pad_code)
        with self._cv:
            stream = self._streams.get(stream_id)
            if stream is None:
                raise InvalidInputError(f"stream_id '{stream_id[:64]}' does not exist (never opened, finished or expired)")
            if stream.ended:
                raise InvalidInputError(f"stream_id '{stream_id[:64]}' has already received its last codes")
            if last and stream.accepted + len(clean) == 0:
                raise InvalidInputError("a stream cannot end without any speech code")
            stream.accepted += len(clean)
            stream.ended = bool(last)
            stream.touched = time.monotonic()
            stream.jobs.append(_Push(clean, bool(last), done, time.monotonic()))
            self._cv.notify()

    def open_stream(self, prompt: PromptLike, seed: int, codes: Sequence[int] | np.ndarray, last: bool,
                    done: Done) -> str:
        """`start_stream` and the stream's first `push` in one call (a stream's first chunk then waits for one
        request queue, not two). A push refused here closes the stream again before raising."""
        stream_id = self.start_stream(prompt, seed=seed)
        try:
            self.push(stream_id, codes, last, done)
        except Exception:
            self.cancel(stream_id)
            raise
        return stream_id

    def offline(self, codes: Sequence[int] | np.ndarray, prompt: PromptLike, seed: int, done: Done) -> None:
        clean = sanitize_codes(codes, self.t2w.pad_code)
        if not clean:
            raise InvalidInputError("no speech codes to synthesise")
        with self._cv:
            self._offline.append(_Offline(clean, prompt, int(seed), done, time.monotonic()))
            self._cv.notify()

    def cancel(self, stream_id: str) -> bool:
        """Release a stream now; its queued pushes fail. False when the id is unknown (already gone)."""
        with self._cv:
            stream = self._streams.pop(stream_id, None)
        if stream is None:
            return False
        self._fail(stream.jobs, InvalidInputError("the stream was cancelled"))
        return True

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Queue several jobs atomically (`with scheduler.hold(): push(...); push(...)`): one round sees them all."""
        with self._cv:
            yield

    @property
    def active_streams(self) -> int:
        with self._cv:
            return len(self._streams)

    @property
    def queue_depth(self) -> int:
        with self._cv:
            return len(self._offline) + sum(len(s.jobs) for s in self._streams.values())

    def close(self) -> None:
        with self._cv:
            self._running = False
            self._cv.notify_all()
        self._thread.join(timeout=10)

    # ---- loop thread ------------------------------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        """Drop streams idle for longer than the TTL (caller holds the lock)."""
        stale = [k for k, s in self._streams.items() if not s.jobs and now - s.touched > self.stream_ttl_s]
        for k in stale:
            del self._streams[k]

    def _next_round(self) -> tuple[list[tuple[str, _Stream, _Push]], list[_Offline]]:
        """Pick the work of one round (caller holds the lock). First-audio streams go first, then the oldest."""
        ready = [(k, s) for k, s in self._streams.items() if s.jobs]
        oldest = min((s.jobs[0].arrived for _, s in ready), default=float("inf"))
        if self._offline and self._offline[0].arrived <= oldest:  # by arrival, so neither kind starves
            return [], [self._offline.popleft() for _ in range(min(self.max_batch, len(self._offline)))]
        ready.sort(key=lambda ks: (ks[1].session.samples_out > 0, ks[1].jobs[0].arrived))
        return [(k, s, s.jobs.popleft()) for k, s in ready[: self.max_batch]], []

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._running and not self._offline and not any(s.jobs for s in self._streams.values()):
                    self._cv.wait(timeout=1.0)
                    self._expire(time.monotonic())
                if not self._running:
                    pending = [j for s in self._streams.values() for j in s.jobs] + list(self._offline)
                    self._streams.clear()
                    self._offline.clear()
                    break
                picked, offline = self._next_round()
            if picked:
                self._run_streams(picked)
            if offline:
                self._run_offline(offline)
        self._fail(pending, RuntimeError("token2wav is shutting down"))

    def _chunk_due(self, stream: _Stream, push: _Push) -> bool:
        return bool(plan_chunks(stream.session.buffer + push.codes, push.last, CHUNK_TOKENS, self.t2w.lookahead)[0])

    def _late_joiner(self, picked: list[tuple[str, _Stream, _Push]]) -> Callable[[int], bool] | None:
        """For a round of first chunks only: asked before each Euler step, True when another stream's first
        chunk is waiting and may still join (`join_until_step`). None where the round must not restart."""
        if (self.join_until_step < 0 or self._restarts >= self.max_restarts or len(picked) >= self.max_batch
                or any(s.session.samples_out > 0 for _, s, _ in picked)):
            return None
        in_round = {k for k, _, _ in picked}

        def late_first_chunk_waiting(step: int) -> bool:
            if step > self.join_until_step:
                return False
            with self._cv:
                return any(k not in in_round and s.jobs and s.session.samples_out == 0
                           and self._chunk_due(s, s.jobs[0]) for k, s in self._streams.items())

        return late_first_chunk_waiting

    def _requeue(self, picked: list[tuple[str, _Stream, _Push]]) -> None:
        """Put a restarted round's pushes back at the head of their streams (cancelled streams fail them)."""
        gone = []
        with self._cv:
            for k, s, j in picked:
                if self._streams.get(k) is s:
                    s.jobs.appendleft(j)
                else:
                    gone.append(j)
        self._fail(gone, InvalidInputError("the stream was cancelled"))

    def _run_streams(self, picked: list[tuple[str, _Stream, _Push]]) -> None:
        due = sum(1 for _, s, j in picked if self._chunk_due(s, j))
        t0 = time.perf_counter()
        try:
            pcms = self.t2w.push_many([s.session for _, s, _ in picked], [j.codes for _, _, j in picked],
                                      [j.last for _, _, j in picked], interrupt=self._late_joiner(picked))
        except RoundInterrupted:  # nothing changed: the pushes run again, with the late stream
            self._restarts += 1
            self._requeue(picked)
            if self.on_round is not None:
                self.on_round(RoundStats("restarted", due, time.perf_counter() - t0, 0.0))
            return
        except BaseException as exc:  # noqa: BLE001 (every caller must hear back; the streams are dropped)
            with self._cv:
                for k, _, _ in picked:
                    self._streams.pop(k, None)
            for _, s, j in picked:
                self._fail([j, *s.jobs], exc)
            return
        compute = time.perf_counter() - t0
        self._restarts = 0
        with self._cv:
            for k, _, j in picked:
                if j.last:
                    self._streams.pop(k, None)
        for (_, _, j), pcm in zip(picked, pcms, strict=True):
            j.done(pcm, None)
        if self.on_round is not None and due:
            audio = sum(p.size for p in pcms) / self.t2w.sample_rate
            self.on_round(RoundStats("stream", due, compute, audio))

    def _run_offline(self, jobs: list[_Offline]) -> None:
        t0 = time.perf_counter()
        try:
            pcms = self.t2w.offline_many([j.codes for j in jobs], [j.prompt for j in jobs], [j.seed for j in jobs])
        except BaseException as exc:  # noqa: BLE001
            self._fail(jobs, exc)
            return
        compute = time.perf_counter() - t0
        for j, pcm in zip(jobs, pcms, strict=True):
            j.done(pcm, None)
        if self.on_round is not None:
            audio = sum(p.size for p in pcms) / self.t2w.sample_rate
            self.on_round(RoundStats("offline", len(jobs), compute, audio))

    @staticmethod
    def _fail(jobs, exc: BaseException) -> None:
        for j in jobs:
            try:
                j.done(None, exc)
            except Exception:  # noqa: BLE001 (a broken callback must not stop the loop)
                pass
