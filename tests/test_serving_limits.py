"""README claims about limits, checked on a real tritonserver over real gRPC with small bounds set through the
models' config parameters (ServerConfig.model_parameters): server-held sessions bounded (least recently used
out) and expiring; a full token2wav answering UNAVAILABLE (raw and through the pipeline) and a failed request
leaving no synthesis stream behind; a token2wav start with codes equal to a start and a push; token2wav's `batching` switch off on a live server. (`stepaudio2 serve`
stopping cleanly: SIGINT in tests/test_wheel.py, SIGTERM in tests/test_reliability_serving.py.)

Oracles: the parameters themselves (bound, TTL, stream limit) and the in-process reference pipeline for audio.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from .conftest import ASSETS, QUICK_STOP_S, SERVE_EXTRA, free_port, require_module, with_export

require_module("pytriton", SERVE_EXTRA)
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from stepaudio2.serving.launcher import ServerConfig, TritonProcess  # noqa: E402
from stepaudio2_client import ClientError, StepAudio2Client  # noqa: E402

MAX_SESSIONS = 2
SESSION_TTL_S = 10.0  # long enough for the LRU test's requests on a busy 2-core machine, short enough to wait out
MAX_STREAMS = 2
ALONE_TOL = 1e-4  # served audio alone vs the reference (tests/test_serving_speech.py)
SAMPLING = {"max_new_tokens": 90}
T2W_ACTIVE = 'stepaudio2_token2wav_active_streams{model="token2wav"}'


@pytest.fixture(scope="module")
def small(tiny_checkpoint_full: Path, tiny_full_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """A second server with small limits and token2wav's cross-stream batching off."""
    cfg = ServerConfig(
        checkpoint=tiny_checkpoint_full, runtime=with_export(tmp_path_factory.mktemp("serve_small"), tiny_full_export),
        grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
        model_parameters={
            "pipeline": {"max_sessions": str(MAX_SESSIONS), "session_ttl_s": str(SESSION_TTL_S)},
            "token2wav": {"max_streams": str(MAX_STREAMS), "batching": "false"},
        },
    )
    proc = TritonProcess(cfg)
    proc.start(timeout_s=300)
    yield cfg
    proc.stop(QUICK_STOP_S)


@pytest.fixture()
def client(small: ServerConfig):
    with StepAudio2Client(f"127.0.0.1:{small.grpc_port}") as c:
        yield c


def _metrics(cfg: ServerConfig) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _value(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


# ---- sessions ------------------------------------------------------------------------------------------------


def _open(client: StepAudio2Client, text: str) -> str:
    return client.generate({"task": "chat", "text": text, "session_id": "new",
                            "sampling": {"max_new_tokens": 2}})["session_id"]


def _follow_up(client: StepAudio2Client, sid: str) -> dict:
    return client.generate({"session_id": sid, "text": "and?", "sampling": {"max_new_tokens": 2}})


def _assert_gone(client: StepAudio2Client, sid: str) -> None:
    with pytest.raises(ClientError) as err:
        _follow_up(client, sid)
    assert err.value.status == "INVALID_ARGUMENT" and "session_id" in err.value.message
    assert "does not exist" in err.value.message


def test_server_held_sessions_are_bounded_least_recently_used_first_out(client, small) -> None:
    a, b = _open(client, "first"), _open(client, "second")
    assert _follow_up(client, a)["session_id"] == a  # `a` is now the most recently used
    c = _open(client, "third")  # over the bound of 2: `b`, the least recently used, goes
    _assert_gone(client, b)
    assert _follow_up(client, a)["session_id"] == a and _follow_up(client, c)["session_id"] == c
    assert _value(_metrics(small), 'stepaudio2_pipeline_sessions{model="pipeline"}') == MAX_SESSIONS


def test_server_held_sessions_expire_after_the_idle_ttl(client) -> None:
    sid = _open(client, "remember me")
    assert _follow_up(client, sid)["session_id"] == sid  # a follow-up keeps it alive (touched) ...
    time.sleep(SESSION_TTL_S + 1.0)  # ... and idling past the TTL ends it (the TTL itself is what is tested)
    _assert_gone(client, sid)


# ---- a full token2wav ----------------------------------------------------------------------------------------


def _t2w_call(g, op: str, **tensors: np.ndarray):
    inputs = []
    for name, value in (("op", np.array([[op.encode()]], dtype=np.object_)), *tensors.items()):
        dtype = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(bool): "BOOL"}.get(
            value.dtype, "BYTES")
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    return g.infer("token2wav", inputs)


def _start_stream(g, voice) -> str:
    res = _t2w_call(g, "start", prompt_tokens=voice.as_numpy("prompt_tokens")[None],
                    prompt_mel=voice.as_numpy("prompt_mel")[None], prompt_xvector=voice.as_numpy("prompt_xvector")[None],
                    voice_id=voice.as_numpy("voice_id").reshape(1, 1), seed=np.array([[0]], np.int64))
    return res.as_numpy("stream_id").reshape(-1)[0].decode()


def test_full_token2wav_answers_unavailable_and_failed_requests_leave_no_stream(client, small) -> None:
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{small.grpc_port}")
    try:
        voice = g.infer("voice_prompt", [])  # no inputs: the bundled voice
        held = [_start_stream(g, voice) for _ in range(MAX_STREAMS)]
        assert _value(_metrics(small), T2W_ACTIVE) == MAX_STREAMS
        with pytest.raises(InferenceServerException) as err:
            _start_stream(g, voice)
        assert "UNAVAILABLE" in str(err.value.status()) and f"limit {MAX_STREAMS}" in err.value.message()
        # Through the pipeline: the reply's first due chunk cannot open a stream.
        with pytest.raises(ClientError) as cerr:
            client.generate({"task": "voice-chat", "sampling": SAMPLING}, (ASSETS / "hello_en.wav").read_bytes())
        assert cerr.value.status == "UNAVAILABLE" and "synthesis streams" in cerr.value.message
        assert _value(_metrics(small), T2W_ACTIVE) == MAX_STREAMS  # the failed request left nothing behind
        for sid in held:
            _t2w_call(g, "cancel", stream_id=np.array([[sid.encode()]], dtype=np.object_))
        assert _value(_metrics(small), T2W_ACTIVE) == 0
    finally:
        g.close()
    ok = client.generate({"task": "voice-chat", "sampling": SAMPLING}, (ASSETS / "hello_en.wav").read_bytes())
    assert ok["audio"]["samples"] == len(ok["audio_codes"]) * 960 > 0
    assert _value(_metrics(small), T2W_ACTIVE) == 0  # released on its last chunk


def test_a_token2wav_start_with_codes_is_a_start_and_a_push_in_one_call(small) -> None:
    """The pipeline opens each speech stream with its first chunk (one call): the same PCM as a start and then a
    push, the stream stays open for the next push, and a start whose push is refused leaves no stream."""
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{small.grpc_port}")
    first = np.arange(28, dtype=np.int64)[None] % 16
    rest = (np.arange(25, dtype=np.int64)[None] * 7) % 16
    no, yes = np.array([[False]]), np.array([[True]])
    try:
        voice = g.infer("voice_prompt", [])
        sid = _start_stream(g, voice)
        two_calls = [_t2w_call(g, "push", stream_id=np.array([[sid.encode()]], dtype=np.object_), codes=c, last=e)
                     .as_numpy("pcm").reshape(-1) for c, e in ((first, no), (rest, yes))]
        prompt = {k: voice.as_numpy(k)[None] for k in ("prompt_tokens", "prompt_mel", "prompt_xvector")}
        opened = _t2w_call(g, "start", **prompt, voice_id=voice.as_numpy("voice_id").reshape(1, 1),
                           seed=np.array([[0]], np.int64), codes=first, last=no)
        sid2 = opened.as_numpy("stream_id").reshape(-1)[0].decode()
        assert sid2 and sid2 != sid
        one_call = [opened.as_numpy("pcm").reshape(-1),
                    _t2w_call(g, "push", stream_id=np.array([[sid2.encode()]], dtype=np.object_), codes=rest,
                              last=yes).as_numpy("pcm").reshape(-1)]
        assert two_calls[0].size > 0 and two_calls[1].size > 0
        for a, b in zip(two_calls, one_call, strict=True):
            np.testing.assert_array_equal(a, b)  # batching is off on this server: one stream per call, exact
        assert _value(_metrics(small), T2W_ACTIVE) == 0  # both released on their last chunk
        with pytest.raises(InferenceServerException) as err:  # ends at once without a code: refused
            _t2w_call(g, "start", **prompt, voice_id=voice.as_numpy("voice_id").reshape(1, 1),
                      seed=np.array([[0]], np.int64), codes=np.zeros((1, 0), np.int64), last=yes)
        assert "INVALID_ARG" in str(err.value.status()) and "without any speech code" in err.value.message()
        assert _value(_metrics(small), T2W_ACTIVE) == 0  # the stream it opened was closed again
    finally:
        g.close()


# ---- the batching switch -------------------------------------------------------------------------------------


def test_batching_off_on_a_live_server_runs_one_stream_per_estimator_call(small, tiny_checkpoint_full) -> None:
    """The main server (batching on) shows batched calls in tests/test_serving_speech.py; here the same
    concurrent streams never share a call, and each equals its reference run alone."""
    from stepaudio2.engines.sampling import SamplingParams
    from stepaudio2.pipeline import GenerationRequest, GenerationResult, ReferencePipeline
    from stepaudio2.speech import SpeechChunk, SpeechOutput

    reference, speech = ReferencePipeline(tiny_checkpoint_full), SpeechOutput(tiny_checkpoint_full)
    texts = [f"say something number {i}" for i in range(MAX_STREAMS)]
    wants = []
    for text in texts:
        req = GenerationRequest(task="voice-chat", text=text, sampling=SamplingParams.from_dict(SAMPLING))
        items = list(speech.stream(reference.stream(req)))
        result = next(i for i in items if isinstance(i, GenerationResult))
        assert result.audio_codes, "the reference reply has no speech to compare"
        wants.append((result, np.concatenate([i.samples for i in items if isinstance(i, SpeechChunk)])))
    before = _metrics(small)
    got: list = [None] * len(texts)
    barrier = threading.Barrier(len(texts))

    def run(i: int) -> None:
        try:
            with StepAudio2Client(f"127.0.0.1:{small.grpc_port}") as c:
                barrier.wait()
                got[i] = c.generate({"task": "voice-chat", "text": texts[i], "sampling": SAMPLING})
        except BaseException as exc:  # noqa: BLE001
            got[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (want, want_pcm), res in zip(wants, got, strict=True):
        assert isinstance(res, dict), res
        assert res["audio_codes"] == want.audio_codes
        np.testing.assert_allclose(res["pcm"], want_pcm, atol=ALONE_TOL)
    after = _metrics(small)
    count = 'stepaudio2_token2wav_batch_streams_count{model="token2wav"}'
    single = 'stepaudio2_token2wav_batch_streams_bucket{model="token2wav",le="1"}'
    calls = _value(after, count) - _value(before, count)
    assert calls >= len(wants)  # every stream had synthesis calls (how many depends on token timing) ...
    assert _value(after, single) - _value(before, single) == calls  # ... and each carried one stream


# ---- `stepaudio2 serve` and signals: SIGINT at the end of tests/test_wheel.py (serve as installed from the wheel),
# SIGTERM at the end of tests/test_reliability_serving.py (the supervised server); each checks exit 0, "stopped",
# no process of the runtime left, the ports closed and no crash in the log.
