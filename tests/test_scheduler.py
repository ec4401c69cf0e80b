"""Continuous batching: requests joining and leaving mid-flight get exactly the single-request tokens."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from stepaudio2.engines.llm import TorchBackend
from stepaudio2.engines.sampling import Sampler, SamplingParams
from stepaudio2.engines.scheduler import ContinuousBatcher, QueueFullError, SequenceRequest
from stepaudio2.models.graphs import DECODER_INPUTS, DECODER_OUTPUTS, DecoderGraph, TorchGraphRunner


@pytest.fixture(scope="module")
def backend(tiny_checkpoint: Path) -> TorchBackend:
    return TorchBackend(tiny_checkpoint)


def _batcher(backend: TorchBackend, **kw) -> ContinuousBatcher:
    t = backend.model.cfg.text
    runner = TorchGraphRunner(DecoderGraph(backend.model), DECODER_INPUTS, DECODER_OUTPUTS)
    return ContinuousBatcher(
        runner, backend.embed, (t.num_hidden_layers, t.num_key_value_heads, t.head_dim, 4096), **kw
    )


def _reference(backend: TorchBackend, ids: list[int], params: SamplingParams) -> list[int]:
    """Single-request loop (the reference pipeline's own decode), used as the oracle."""
    logits, state = backend.prefill(backend.embed(ids))
    sampler, history, out = Sampler(params), list(ids), []
    for _ in range(params.max_new_tokens):
        tok = sampler(logits, history)
        out.append(tok)
        history.append(tok)
        logits = backend.decode(state, tok)
    return out


class _Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.done = threading.Event()

    def finish(self, reason: str) -> None:
        self.reason = reason
        self.done.set()


def _request(backend, rid: str, ids: list[int], params: SamplingParams, col: _Collector, **kw) -> SequenceRequest:
    return SequenceRequest(rid, backend.embed(ids), ids, params, frozenset(), col.tokens.append, col.finish, **kw)


def test_joining_and_leaving_requests_match_single_runs(backend: TorchBackend) -> None:
    prompts = [list(range(10, 30)), list(range(50, 57)), list(range(100, 141)), [7, 8, 9]]
    params = [
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=5),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_new_tokens=9),
        SamplingParams(temperature=1.0, top_k=20, seed=5, max_new_tokens=7, repetition_penalty=1.1),
    ]
    b = _batcher(backend, max_slots=3)
    cols = [_Collector() for _ in prompts]
    b.submit(_request(backend, "a", prompts[0], params[0], cols[0]))
    b.submit(_request(backend, "b", prompts[1], params[1], cols[1]))
    b.step()
    b.step()  # a and b are mid-flight when c and d arrive; d waits for a free slot
    b.submit(_request(backend, "c", prompts[2], params[2], cols[2]))
    b.submit(_request(backend, "d", prompts[3], params[3], cols[3]))
    while b.step() or b.waiting:
        pass
    assert b.stats.max_batch == 3  # really batched, and bounded by the slots
    for p, sp, col in zip(prompts, params, cols, strict=True):
        assert col.reason == "length"
        assert col.tokens == _reference(backend, p, sp)


def test_cancel_frees_the_slot_at_the_next_step(backend: TorchBackend) -> None:
    b = _batcher(backend, max_slots=1)
    flag = threading.Event()
    first, second = _Collector(), _Collector()
    b.submit(_request(backend, "x", [1, 2, 3], SamplingParams(max_new_tokens=500), first, is_cancelled=flag.is_set))
    b.submit(_request(backend, "y", [4, 5, 6], SamplingParams(max_new_tokens=3), second))
    b.step()
    b.step()
    flag.set()
    b.step()
    assert first.reason == "cancelled" and len(first.tokens) == 2
    while b.step() or b.waiting:
        pass
    assert second.reason == "length" and len(second.tokens) == 3


def test_full_queue_rejects_clearly(backend: TorchBackend) -> None:
    b = _batcher(backend, max_slots=1, max_queue=2)
    cols = [_Collector() for _ in range(3)]
    b.submit(_request(backend, "1", [1, 2], SamplingParams(), cols[0]))
    b.submit(_request(backend, "2", [1, 2], SamplingParams(), cols[1]))
    with pytest.raises(QueueFullError, match="capacity"):
        b.submit(_request(backend, "3", [1, 2], SamplingParams(), cols[2]))


def test_background_loop_serves_and_stops(backend: TorchBackend) -> None:
    b = _batcher(backend)
    worker = threading.Thread(target=b.run, daemon=True)
    worker.start()
    col = _Collector()
    b.submit(_request(backend, "bg", [3, 4, 5], SamplingParams(max_new_tokens=4), col))
    assert col.done.wait(30)
    assert col.tokens == _reference(backend, [3, 4, 5], SamplingParams(max_new_tokens=4))
    b.stop()
    worker.join(5)
    assert not worker.is_alive()


def test_a_failing_step_fails_its_requests_but_the_loop_survives(backend: TorchBackend) -> None:
    b = _batcher(backend)
    worker = threading.Thread(target=b.run, daemon=True)
    worker.start()
    bad, good = _Collector(), _Collector()

    def explode(_token: int) -> None:
        raise RuntimeError("client callback blew up")

    b.submit(SequenceRequest("bad", backend.embed([1, 2]), [1, 2], SamplingParams(max_new_tokens=3), frozenset(),
                             explode, bad.finish))
    assert bad.done.wait(30) and bad.reason.startswith("error")
    b.submit(_request(backend, "good", [3, 4], SamplingParams(max_new_tokens=3), good))
    assert good.done.wait(30) and good.reason == "length"
    b.stop()
    worker.join(5)
