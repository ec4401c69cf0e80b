"""The `llm` model on vLLM, on the session's real tritonserver: sampling, capacity, cancellation, prefix caching,
and vLLM's own metrics on Triton's /metrics. (Greedy parity with the reference is in test_serving.py.)"""

from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import pytest

from stepaudio2.engines.vllm_engine import (
    EngineSettings,
    RequestTracker,
    build_prompt_embeds,
    tokens_per_response,
)
from stepaudio2.errors import InvalidInputError, QueueFullError

from .conftest import REPO, SERVER_LLM_PARAMETERS

# ---- pure parts (no server) ---------------------------------------------------------------------------------


def test_llm_model_reads_engine_settings_from_its_config() -> None:
    """Every EngineSettings field is a declared llm parameter (read in model.py through ModelParameters)."""
    from dataclasses import fields

    from stepaudio2.serving.model_config import parameters, read_config

    declared = parameters(read_config(REPO / "model_repository" / "llm" / "config.pbtxt"))
    assert {f.name for f in fields(EngineSettings)} <= set(declared)
    code = (REPO / "model_repository" / "llm" / "1" / "model.py").read_text()
    for f in fields(EngineSettings):
        assert f'{f.name}=params.' in code, f.name


def test_prompt_embeds_splice_audio_and_name_bad_fields() -> None:
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    ids = np.array([1, 2, 3, 4, 5])
    audio = np.full((2, 4), -1.0, np.float32)
    out = build_prompt_embeds(ids, table, 10, audio, np.array([[1, 2]])).numpy()
    np.testing.assert_array_equal(out[[0, 3, 4]], table[[1, 4, 5]])
    np.testing.assert_array_equal(out[1:3], audio)
    for args, field in [((np.array([1, 12]), None, None), "input_ids"),
                        ((ids, audio, np.array([[4, 2]])), "audio_spans"),
                        ((ids, np.zeros((2, 3), np.float32), np.array([[0, 2]])), "audio_embeds"),
                        ((ids, audio, np.array([[0, 3]])), "audio_spans")]:
        with pytest.raises(InvalidInputError, match=field):
            build_prompt_embeds(args[0], table, 10, args[1], args[2])


def test_request_tracker_capacity_and_cancel() -> None:
    t = RequestTracker(capacity=2)
    t.admit("a")
    t.admit("b")
    with pytest.raises(QueueFullError, match="capacity"):
        t.admit("c")
    with pytest.raises(InvalidInputError, match="sequence_id"):
        t.admit("a")
    assert t.cancel("a") is False  # admitted but not started on the loop yet: nothing to abort
    t.start("a", None)
    assert t.cancel("a") and t.is_cancelled("a")
    t.finish("a")
    assert not t.is_cancelled("a")
    t.admit("c")  # finishing "a" freed its place


def test_tokens_per_response_grows_with_the_live_requests() -> None:
    # 4 responses per engine step in all: one token each up to 4 live requests, then ceil(live / 4).
    assert [tokens_per_response(n, 4) for n in (0, 1, 4, 5, 8, 9, 16, 64)] == [1, 1, 1, 2, 2, 3, 4, 16]
    assert [tokens_per_response(n, 0) for n in (1, 16, 64)] == [1, 1, 1]  # 0: every token as it comes
    t = RequestTracker(capacity=4)
    for rid in ("a", "b", "c"):
        t.admit(rid)
    t.start("a", None)
    t.start("b", None)
    assert t.live == 2  # started, not merely admitted
    t.finish("a")
    assert t.live == 1


class _Recorder:
    """A pb_utils metric family that records every call its metrics make (each is a round trip in a stub)."""

    GAUGE = COUNTER = HISTOGRAM = "kind"
    calls: list = []  # cleared in place: the metrics hold this list

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(self, labels: dict, buckets: list | None = None):  # noqa: N802 (pb_utils' name)
        family, calls = self.name, self.calls

        class _Metric:
            def set(self, v):
                calls.append((family, "set", v))

            def increment(self, v):
                calls.append((family, "increment", v))

            def observe(self, v):
                calls.append((family, "observe", v))

        return _Metric()


def test_vllm_metrics_send_only_what_changed() -> None:
    """Every engine step calls record(); unchanged gauges and counters that did not move cost no round trip."""
    from types import SimpleNamespace

    from stepaudio2.serving.metrics import VllmMetrics

    _Recorder.calls.clear()
    m = VllmMetrics(SimpleNamespace(MetricFamily=_Recorder), "llm")
    sched = SimpleNamespace(num_running_reqs=3, num_waiting_reqs=0, kv_cache_usage=0.25, prefix_cache_stats=None)
    step = SimpleNamespace(num_prompt_tokens=0, num_generation_tokens=3, num_preempted_reqs=0,
                           time_to_first_tokens_iter=[], inter_token_latencies_iter=[0.05, 0.05, 0.06],
                           finished_requests=[])
    m.record(sched, step)
    first = list(_Recorder.calls)
    assert ("vllm:num_requests_running", "set", 3) in first and ("vllm:kv_cache_usage_perc", "set", 0.25) in first
    assert ("vllm:generation_tokens_total", "increment", 3) in first
    assert not [c for c in first if c[0] in ("vllm:prompt_tokens_total", "vllm:num_preemptions_total")]
    assert [c for c in first if c[0] == "vllm:inter_token_latency_seconds"] == [
        ("vllm:inter_token_latency_seconds", "observe", v) for v in (0.05, 0.05, 0.06)]
    _Recorder.calls.clear()
    m.record(sched, step)  # the same state again: only the per-step counters and observations are sent
    assert {c[0] for c in _Recorder.calls} == {"vllm:generation_tokens_total", "vllm:inter_token_latency_seconds"}
    _Recorder.calls.clear()
    m.record(SimpleNamespace(**{**vars(sched), "num_running_reqs": 0}), None)
    assert _Recorder.calls == [("vllm:num_requests_running", "set", 0)]


# ---- served -------------------------------------------------------------------------------------------------

pytest.importorskip("pytriton", reason="serving tests need the 'serve' extra (nvidia-pytriton)")
import tritonclient.grpc as grpcclient  # noqa: E402

from stepaudio2_client import StepAudio2Client  # noqa: E402

from .test_serving import _metric_value, _metrics  # noqa: E402


@pytest.fixture()
def client(server):
    with StepAudio2Client(f"127.0.0.1:{server.grpc_port}") as c:
        yield c


def test_same_seed_same_tokens_and_top_k_one_is_greedy(client) -> None:
    req = {"task": "chat", "text": "Tell me something random."}
    sampled = {"temperature": 1.0, "top_p": 0.95, "repetition_penalty": 1.05, "max_new_tokens": 24}
    a = client.generate({**req, "sampling": {**sampled, "seed": 11}})["token_ids"]
    b = client.generate({**req, "sampling": {**sampled, "seed": 11}})["token_ids"]
    others = [client.generate({**req, "sampling": {**sampled, "seed": s}})["token_ids"] for s in (12, 13, 14)]
    assert a == b
    assert any(o != a for o in others)  # the seed matters: sampling is really random at temperature 1
    greedy = client.generate({**req, "sampling": {"temperature": 0, "max_new_tokens": 24}})["token_ids"]
    top1 = client.generate({**req, "sampling": {"temperature": 1.0, "top_k": 1, "seed": 3, "max_new_tokens": 24}})
    assert top1["token_ids"] == greedy


def _llm_inputs(max_new_tokens: int, seed: int) -> list:
    """A raw llm request (text prompt ids only), sampled at temperature 1 so the random model rarely stops."""
    inputs = []
    sampling = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "seed": seed}
    for name, value, dtype in [("input_ids", np.array([5, 6, 7, 8, 9], np.int64), "INT64"),
                               ("sampling", np.array([json.dumps(sampling).encode()], np.object_), "BYTES"),
                               ("sequence_id", np.array([uuid.uuid4().hex.encode()], np.object_), "BYTES")]:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    return inputs


def test_many_live_requests_share_fewer_larger_responses(server) -> None:
    """8 live requests (llm `responses_per_step` 4): the first token of each goes alone, later responses carry
    about two tokens each, and every stream's tokens are those of the same request run alone."""
    n, length = 8, 40
    results: dict[str, list[np.ndarray]] = {}
    errors: list = []
    lock = threading.Lock()

    def collect(result, error):
        with lock:
            if error is not None:
                errors.append(error)
                return
            tokens = result.as_numpy("token_ids").reshape(-1)
            if tokens.size:  # the final response carries only the finish reason
                results.setdefault(result.get_response().id, []).append(tokens)

    def run(prefix: str, seeds: list[int]) -> None:
        g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        g.start_stream(callback=collect)
        try:
            for seed in seeds:  # back to back on one stream: all are live long before any could finish
                g.async_stream_infer("llm", _llm_inputs(length, seed=seed), request_id=f"{prefix}{seed}")
        finally:
            g.stop_stream()  # returns once every request has sent its final response
            g.close()

    for seed in (0, 1):
        run("alone", [seed])
    run("batch", list(range(n)))
    assert not errors, [e.message() for e in errors]
    batched = {rid: parts for rid, parts in results.items() if rid.startswith("batch")}
    assert len(batched) == n
    for rid, parts in batched.items():
        assert parts[0].size == 1, (rid, [p.size for p in parts])  # the first token is never held back (TTFT)
    for seed in (0, 1):
        np.testing.assert_array_equal(np.concatenate(batched[f"batch{seed}"]), np.concatenate(results[f"alone{seed}"]))
    tokens = sum(np.concatenate(parts).size for parts in batched.values())
    responses = sum(len(parts) for parts in batched.values())
    # One token per response would make these equal; ceil(8 / 4) = 2 tokens per response makes it about half.
    assert responses <= 0.7 * tokens, (responses, tokens)


def test_full_engine_answers_unavailable_and_keeps_serving(server, client) -> None:
    capacity = int(SERVER_LLM_PARAMETERS["max_num_seqs"]) + int(SERVER_LLM_PARAMETERS["max_queue"])
    errors: list = []
    tokens: dict[str, int] = {}
    lock = threading.Lock()

    def callback(result, error):
        with lock:
            if error is not None:
                errors.append(error)
            else:
                rid = result.get_response().id
                tokens[rid] = tokens.get(rid, 0) + result.as_numpy("token_ids").size

    g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    g.start_stream(callback=callback)
    try:
        # capacity + 1 long requests back to back: all are admitted (or not) long before any could finish.
        for i in range(capacity + 1):
            g.async_stream_infer("llm", _llm_inputs(4000, seed=i), request_id=f"r{i}")
        deadline = time.time() + 120
        while time.time() < deadline and (not errors or len(tokens) < capacity):
            time.sleep(0.1)
        with lock:
            assert len(errors) == 1, [e.message() for e in errors]
            assert "UNAVAILABLE" in errors[0].message() and "capacity" in errors[0].message()
            assert len(tokens) == capacity and f"r{capacity}" not in tokens  # the others generate
    finally:
        g.stop_stream(cancel_requests=True)  # the client leaves: the model aborts the vLLM requests
        g.close()
    _wait_metric(server, 'vllm:num_requests_running{model="llm"}', lambda v: v == 0)
    assert client.generate({"task": "chat", "text": "still there?", "sampling": {"max_new_tokens": 3}})["token_ids"]


def _wait_metric(server, name: str, ok, timeout: float = 30.0) -> float:
    deadline = time.time() + timeout
    while True:
        value = _metric_value(_metrics(server), name)
        if ok(value) or time.time() > deadline:
            assert ok(value), (name, value)
            return value
        time.sleep(0.2)


def test_vllm_metrics_on_triton_metrics_and_cancel_frees_the_sequence(server, client) -> None:
    text = _metrics(server)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count"):
        assert name in text, name
    stream = client.stream({"task": "chat", "text": "talk for a long time", "sampling": {"max_new_tokens": 4000}})
    seen = 0
    for event in stream:
        seen += event["type"] == "text"
        if seen >= 2:
            break
    assert _metric_value(_metrics(server), 'vllm:num_requests_running{model="llm"}') >= 1
    assert _metric_value(_metrics(server), 'vllm:kv_cache_usage_perc{model="llm"}') > 0
    stream.close()  # the pipeline cancels the llm sequence: vLLM aborts it and frees its KV blocks
    _wait_metric(server, 'vllm:num_requests_running{model="llm"}', lambda v: v == 0)
    _wait_metric(server, 'vllm:kv_cache_usage_perc{model="llm"}', lambda v: v == 0)


CPU_BLOCK_TOKENS = 128  # vLLM's CPU backend default block size: only whole blocks are cached and reused


def test_session_second_turn_hits_the_prefix_cache(server, client) -> None:
    """A server-held session's second prompt starts with the whole first turn; with prompt embeddings vLLM hashes
    each block by its embedding bytes, so the first turn's whole blocks are reused, not recomputed."""
    hits = 'vllm:prefix_cache_hits_total{model="llm"}'
    story = " ".join(f"Item {i} is a number worth remembering." for i in range(40))
    first = client.generate({"task": "chat", "text": story, "session_id": "new", "sampling": {"max_new_tokens": 8}})
    assert first["usage"]["prompt_tokens"] >= 2 * CPU_BLOCK_TOKENS, first["usage"]  # whole blocks to share
    before = _wait_metric(server, hits, lambda v: v >= 0)
    second = client.generate({"session_id": first["session_id"], "text": "Which number was it?",
                              "sampling": {"max_new_tokens": 4}})
    assert second["token_ids"]
    after = _wait_metric(server, hits, lambda v: v > before)
    assert after - before >= 2 * CPU_BLOCK_TOKENS, (before, after)  # the first turn's whole blocks came from cache

