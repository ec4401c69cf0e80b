"""SynthesisScheduler in-process: cross-stream batching equals each stream alone, ids, expiry, cancel, offline."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from stepaudio2.errors import CapacityError, InvalidInputError
from stepaudio2.serving.synthesis import RoundStats, SynthesisScheduler

from .conftest import ASSETS

AUDIO_TOL = 2e-3  # a stream inside a ragged batch vs alone (padding changes float summation order)


@pytest.fixture(scope="module")
def t2w(tiny_checkpoint_full: Path):
    from stepaudio2.token2wav.synth import Token2Wav

    return Token2Wav(tiny_checkpoint_full / "token2wav")


@pytest.fixture(scope="module")
def prompt(tiny_checkpoint_full: Path):
    from stepaudio2.token2wav.prompt import VoicePromptEncoder

    return VoicePromptEncoder(tiny_checkpoint_full / "token2wav").encode_file(ASSETS / "default_voice.wav")


class Collector:
    def __init__(self) -> None:
        self.results: list[tuple[np.ndarray | None, BaseException | None]] = []
        self.event = threading.Event()

    def __call__(self, pcm, err) -> None:
        self.results.append((pcm, err))
        self.event.set()

    def wait(self) -> np.ndarray:
        assert self.event.wait(60), "no answer from the scheduler"
        self.event.clear()
        pcm, err = self.results[-1]
        if err is not None:
            raise err
        return pcm


def _alone(t2w, prompt, codes: list[int], seed: int, step: int) -> np.ndarray:
    s = t2w.start_stream(prompt, seed=seed)
    parts = [t2w.push(s, codes[i : i + step]) for i in range(0, len(codes), step)]
    parts.append(t2w.push(s, [], last=True))
    return np.concatenate(parts)


def test_concurrent_streams_are_batched_and_equal_alone(t2w, prompt) -> None:
    rng = np.random.default_rng(3)
    codes = [rng.integers(0, 6561, n).tolist() for n in (61, 80, 37, 90)]
    rounds: list[RoundStats] = []
    sched = SynthesisScheduler(t2w, max_batch=8, on_round=rounds.append)
    try:
        ids = [sched.start_stream(prompt, seed=i) for i in range(len(codes))]
        outs: list[list[np.ndarray]] = [[] for _ in codes]
        cols = [Collector() for _ in codes]
        step = 30
        for off in range(0, max(map(len, codes)) + step, step):  # all streams push before any waits: one round
            for i, c in enumerate(codes):
                if off <= len(c):
                    sched.push(ids[i], c[off : off + step], off + step > len(c), cols[i])
            for i, c in enumerate(codes):
                if off <= len(c):
                    outs[i].append(cols[i].wait())
        assert sched.active_streams == 0  # every stream ended and was released
    finally:
        sched.close()
    for i, c in enumerate(codes):
        got = np.concatenate(outs[i])
        want = _alone(t2w, prompt, c, seed=i, step=step)
        assert got.shape == want.shape == (len(c) * 2 * 480,)
        np.testing.assert_allclose(got, want, atol=AUDIO_TOL)
    assert max(r.estimator_batch for r in rounds) > 1, rounds


def test_batching_off_runs_one_stream_per_round(t2w, prompt) -> None:
    rounds: list[RoundStats] = []
    sched = SynthesisScheduler(t2w, batching=False, on_round=rounds.append)
    try:
        cols = [Collector() for _ in range(3)]
        ids = [sched.start_stream(prompt) for _ in range(3)]
        for sid, col in zip(ids, cols, strict=True):
            sched.push(sid, list(range(40)), True, col)
        for col in cols:
            assert col.wait().size == 40 * 960
    finally:
        sched.close()
    assert rounds and all(r.estimator_batch == 1 for r in rounds)


def test_first_chunks_go_before_later_chunks_of_other_streams(t2w, prompt) -> None:
    sched = SynthesisScheduler(t2w, batching=False)  # one stream per round: the round order is observable
    try:
        old = sched.start_stream(prompt)
        col = Collector()
        sched.push(old, list(range(28)), False, col)
        assert col.wait().size > 0  # `old` has audio out now
        new = sched.start_stream(prompt)
        order: list[str] = []
        done = threading.Event()

        def answer(name: str):
            return lambda pcm, err: (order.append(name), len(order) == 2 and done.set())

        with sched.hold():  # both pushes are queued before the loop picks its next round
            sched.push(old, list(range(25)), False, answer("old"))
            sched.push(new, list(range(28)), False, answer("new"))
        assert done.wait(60), order
        assert order == ["new", "old"]  # `old` arrived first, but `new` has no audio out yet
    finally:
        sched.close()


def test_stream_ids_are_checked_and_streams_released(t2w, prompt) -> None:
    sched = SynthesisScheduler(t2w, stream_ttl_s=0.3)
    try:
        with pytest.raises(InvalidInputError, match="does not exist"):
            sched.push("not-a-stream", [1, 2, 3], False, Collector())
        sid = sched.start_stream(prompt)
        with pytest.raises(InvalidInputError, match="outside"):
            sched.push(sid, [1, 99999], False, Collector())
        with pytest.raises(InvalidInputError, match="without any speech code"):
            sched.push(sid, [], True, Collector())
        col = Collector()
        sched.push(sid, [5] * 10, True, col)
        assert col.wait().size == 10 * 960
        with pytest.raises(InvalidInputError, match="does not exist"):  # released after its last chunk
            sched.push(sid, [1], False, Collector())
        cancelled = sched.start_stream(prompt)
        assert sched.cancel(cancelled) and sched.active_streams == 0
        # Expiry on opening a stream: after the TTL has passed (monotonic clock), the next start_stream drops the
        # idle stream before adding its own, whatever the loop is doing.
        idle = sched.start_stream(prompt)
        opened = time.monotonic()
        while time.monotonic() - opened <= 0.3:
            time.sleep(0.05)
        fresh = sched.start_stream(prompt)
        assert sched.active_streams == 1
        with pytest.raises(InvalidInputError, match="does not exist"):
            sched.push(idle, [1], False, Collector())
        # Expiry by the idle loop (no new stream opened): wait on the state, not on a tick-sized sleep.
        deadline = time.monotonic() + 30
        while sched.active_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched.active_streams == 0
        with pytest.raises(InvalidInputError, match="does not exist"):
            sched.push(fresh, [1], False, Collector())
    finally:
        sched.close()


def test_offline_jobs_are_batched_and_equal_alone(t2w, prompt) -> None:
    rng = np.random.default_rng(5)
    codes = [rng.integers(0, 6561, n).tolist() for n in (20, 33, 41)]
    rounds: list[RoundStats] = []
    sched = SynthesisScheduler(t2w, on_round=rounds.append)
    try:
        cols = [Collector() for _ in codes]
        with sched.hold():  # the three jobs are queued together, so the loop's next round takes all three
            for i, c in enumerate(codes):
                sched.offline(c, prompt, i, cols[i])
        outs = [col.wait() for col in cols]
    finally:
        sched.close()
    for i, c in enumerate(codes):
        np.testing.assert_allclose(outs[i], t2w.offline(c, prompt, seed=i), atol=AUDIO_TOL)
    assert [(r.kind, r.estimator_batch) for r in rounds] == [("offline", 3)], rounds


class _FailingRounds:
    """The real Token2Wav whose batched streaming step fails (a fault the scheduler must survive)."""

    def __init__(self, t2w) -> None:
        self._t2w = t2w

    def __getattr__(self, name: str):
        return getattr(self._t2w, name)

    def push_many(self, *args, **kwargs):
        raise RuntimeError("injected synthesis failure")


def test_a_full_scheduler_refuses_with_capacity_error_and_a_failed_round_releases_its_streams(t2w, prompt) -> None:
    sched = SynthesisScheduler(_FailingRounds(t2w), max_streams=2)
    try:
        first, second = sched.start_stream(prompt), sched.start_stream(prompt)
        with pytest.raises(CapacityError, match="limit 2"):  # UNAVAILABLE on the server
            sched.start_stream(prompt)
        assert sched.cancel(second) and sched.active_streams == 1
        col = Collector()
        sched.push(first, list(range(28)), False, col)
        with pytest.raises(RuntimeError, match="injected"):
            col.wait()
        assert sched.active_streams == 0  # released on error
        with pytest.raises(InvalidInputError, match="does not exist"):
            sched.push(first, [1], False, Collector())
        sched.start_stream(prompt)  # the slots are free again
    finally:
        sched.close()


class _HeldRounds:
    """The real Token2Wav whose every streaming round stops before its first Euler step until the test lets it go
    (`entered.get()` then `go.put(None)`): streams can be pushed while a round is known to be running."""

    def __init__(self, t2w) -> None:
        self._t2w = t2w
        self.entered: queue.SimpleQueue = queue.SimpleQueue()
        self.go: queue.SimpleQueue = queue.SimpleQueue()

    def __getattr__(self, name: str):
        return getattr(self._t2w, name)

    def push_many(self, sessions, codes_list, lasts, interrupt=None):
        held = []

        def gated(step: int) -> bool:
            if not held:
                held.append(step)
                self.entered.put(len(sessions))
                self.go.get(timeout=60)
            return interrupt is not None and interrupt(step)

        return self._t2w.push_many(sessions, codes_list, lasts, interrupt=gated)

    def next_round(self) -> int:
        """Wait for the next round to start; returns its number of streams (it stays held until `release`)."""
        return self.entered.get(timeout=60)

    def release(self) -> None:
        self.go.put(None)


def _first_chunk_alone(t2w, prompt, codes: list[int], seed: int) -> np.ndarray:
    return t2w.push(t2w.start_stream(prompt, seed=seed), codes)


@pytest.mark.parametrize("max_restarts", [1, 2])
def test_a_late_first_chunk_restarts_a_round_of_first_chunks_and_joins_it(t2w, prompt, max_restarts: int) -> None:
    n = max_restarts + 2  # the first stream, one late stream per allowed restart, and one too late
    rng = np.random.default_rng(21)
    codes = [rng.integers(0, 6561, 28).tolist() for _ in range(n)]
    rounds: list[RoundStats] = []
    held = _HeldRounds(t2w)
    sched = SynthesisScheduler(held, on_round=rounds.append, max_restarts=max_restarts)
    try:
        ids = [sched.start_stream(prompt, seed=i) for i in range(n)]
        cols = [Collector() for _ in ids]
        sched.push(ids[0], codes[0], False, cols[0])
        assert held.next_round() == 1
        for i in range(1, max_restarts + 1):
            sched.push(ids[i], codes[i], False, cols[i])  # late: arrives while the round runs
            held.release()
            assert held.next_round() == i + 1  # restarted with it
        sched.push(ids[-1], codes[-1], False, cols[-1])
        held.release()  # max_restarts reached: this round runs to its end without the last stream
        assert held.next_round() == 1
        held.release()
        outs = [c.wait() for c in cols]
    finally:
        sched.close()
    assert [(r.kind, r.estimator_batch) for r in rounds] == [
        *(("restarted", i) for i in range(1, max_restarts + 1)), ("stream", max_restarts + 1), ("stream", 1)], rounds
    for i, out in enumerate(outs):  # a restart changes nothing: each equals its stream alone
        want = _first_chunk_alone(t2w, prompt, codes[i], seed=i)
        assert out.size == want.size > 0
        np.testing.assert_allclose(out, want, rtol=0, atol=AUDIO_TOL)


def test_rounds_with_audio_out_or_late_later_chunks_are_not_restarted(t2w, prompt) -> None:
    rounds: list[RoundStats] = []
    held = _HeldRounds(t2w)
    sched = SynthesisScheduler(held, on_round=rounds.append)
    try:
        a, b, c = (sched.start_stream(prompt, seed=i) for i in range(3))
        col_a, col_b, col_c = Collector(), Collector(), Collector()
        sched.push(a, list(range(28)), False, col_a)
        held.next_round()
        held.release()
        col_a.wait()  # stream a has audio out
        sched.push(a, list(range(25)), False, col_a)  # a later chunk: its round is never restarted
        assert held.next_round() == 1
        sched.push(b, list(range(28)), False, col_b)
        held.release()
        assert held.next_round() == 1  # b runs after a's round, alone
        held.release()
        col_a.wait(), col_b.wait()
        sched.push(c, list(range(28)), False, col_c)  # a first chunk whose round ...
        assert held.next_round() == 1
        sched.push(b, list(range(25)), False, col_b)  # ... sees only a later chunk arrive: no restart
        held.release()
        assert held.next_round() == 1
        held.release()
        col_c.wait(), col_b.wait()
    finally:
        sched.close()
    assert [r.kind for r in rounds] == ["stream"] * 5, rounds


def test_join_until_step_minus_one_never_restarts(t2w, prompt) -> None:
    rounds: list[RoundStats] = []
    held = _HeldRounds(t2w)
    sched = SynthesisScheduler(held, on_round=rounds.append, join_until_step=-1)
    try:
        a, b = sched.start_stream(prompt), sched.start_stream(prompt)
        col_a, col_b = Collector(), Collector()
        sched.push(a, list(range(28)), False, col_a)
        assert held.next_round() == 1
        sched.push(b, list(range(28)), False, col_b)  # late, but restarts are off
        held.release()
        assert held.next_round() == 1
        held.release()
        col_a.wait(), col_b.wait()
    finally:
        sched.close()
    assert [(r.kind, r.estimator_batch) for r in rounds] == [("stream", 1), ("stream", 1)], rounds

