"""Speech replies on a real tritonserver over real gRPC: token2wav + voice_prompt models, speech routing in the
pipeline, cross-stream batching, sessions, tool-call round trips, cancellation and bad input.

Oracle: the in-process reference pipeline + SpeechOutput (same codes; audio within a stated tolerance).
"""

from __future__ import annotations

import io
import threading
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.pipeline import GenerationRequest, GenerationResult, ReferencePipeline, load_audio_input
from stepaudio2.speech import SpeechChunk, SpeechOutput
from stepaudio2.text import render_tool_call

from .conftest import ASSETS, SERVE_EXTRA, require_module

require_module("pytriton", SERVE_EXTRA)
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from stepaudio2.serving.launcher import ServerConfig  # noqa: E402
from stepaudio2_client import ClientError, Session, StepAudio2Client  # noqa: E402

# Served audio vs the reference: alone it is the same computation (different thread counts only); inside a
# batch with other streams, padding to the longest chunk changes float summation order (see token2wav tests).
ALONE_TOL = 1e-4
BATCHED_TOL = 2e-3
HELLO = ASSETS / "hello_en.wav"
SAMPLING = {"max_new_tokens": 90}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_full: Path) -> ReferencePipeline:
    return ReferencePipeline(tiny_checkpoint_full)


@pytest.fixture(scope="module")
def speech(tiny_checkpoint_full: Path) -> SpeechOutput:
    return SpeechOutput(tiny_checkpoint_full)


@pytest.fixture()
def client(server: ServerConfig):
    with StepAudio2Client(f"127.0.0.1:{server.grpc_port}") as c:
        yield c


def _reference(reference: ReferencePipeline, speech: SpeechOutput, stream: bool, audio: Path | None = HELLO, **kw):
    sampling = SamplingParams.from_dict(kw.pop("sampling", SAMPLING))
    req = GenerationRequest(audio=load_audio_input(audio) if audio else None, sampling=sampling, **kw)
    items = list(speech.stream(reference.stream(req)) if stream else reference.stream(req))
    result = next(i for i in items if isinstance(i, GenerationResult))
    if stream:
        pcm = np.concatenate([i.samples for i in items if isinstance(i, SpeechChunk)])
    else:
        pcm = speech.offline(result.audio_codes)
    return result, pcm


def _metrics(server: ServerConfig) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _value(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


@pytest.mark.parametrize("task", ["voice-chat", "s2st"])
def test_streamed_speech_equals_reference(client, server, reference, speech, task: str) -> None:
    extra = {"target_language": "en"} if task == "s2st" else {}
    want, want_pcm = _reference(reference, speech, True, task=task, **extra)
    assert want.audio_codes, "the reference reply has no speech to compare"
    before = _metrics(server)
    sent = time.perf_counter()
    events, first_audio_at = [], None
    for event in client.stream({"task": task, "sampling": SAMPLING, **extra}, HELLO.read_bytes()):
        if event["type"] == "audio" and first_audio_at is None:
            first_audio_at = time.perf_counter() - sent
        events.append(event)
    result = events[-1]
    assert result["token_ids"] == want.token_ids and result["audio_codes"] == want.audio_codes
    chunks = [e for e in events if e["type"] == "audio"]
    assert len(chunks) >= 2  # streamed chunk by chunk, not all at the end
    assert [c["offset"] for c in chunks] == list(np.cumsum([0] + [c["samples"] for c in chunks[:-1]]))
    pcm = np.concatenate([c["pcm"] for c in chunks])
    assert pcm.shape == want_pcm.shape == (len(want.audio_codes) * 960,)
    np.testing.assert_allclose(pcm, want_pcm, atol=ALONE_TOL)
    first_audio = next(i for i, e in enumerate(events) if e["type"] == "audio")
    assert first_audio < len(events) - 2, "audio must arrive while the reply is still being generated"
    summary = result["audio"]
    assert summary["samples"] == pcm.size and summary["chunks"] == len(chunks) and summary["sample_rate"] == 24000
    # The server's time to first audio runs from the request's arrival to the first chunk's send: inside what the
    # client saw (send -> first chunk received), and it is exactly what the TTFA histogram recorded.
    ttfa = summary["time_to_first_audio_s"]
    assert 0 < ttfa <= first_audio_at
    after = _metrics(server)
    ttfa_metric = 'stepaudio2_time_to_first_audio_seconds_{}{{model="pipeline"}}'
    assert _value(after, ttfa_metric.format("count")) - _value(before, ttfa_metric.format("count")) == 1
    assert _value(after, ttfa_metric.format("sum")) - _value(before, ttfa_metric.format("sum")) == pytest.approx(
        ttfa, rel=1e-6, abs=1e-9)


def test_offline_speech_equals_reference_streaming_and_unary(client, reference, speech) -> None:
    want, want_pcm = _reference(reference, speech, False, task="voice-chat")
    streamed = client.generate({"task": "voice-chat", "sampling": SAMPLING, "speech_output": "offline"},
                               HELLO.read_bytes())
    unary = client.generate_unary({"task": "voice-chat", "sampling": SAMPLING}, HELLO.read_bytes())
    for got in (streamed, unary):
        assert got["audio_codes"] == want.audio_codes
        assert got["audio"]["chunks"] == 1
        np.testing.assert_allclose(got["pcm"], want_pcm, atol=ALONE_TOL)
    none = client.generate({"task": "voice-chat", "sampling": SAMPLING, "speech_output": "none"}, HELLO.read_bytes())
    assert none["audio"] is None and "pcm" not in none and none["audio_codes"] == want.audio_codes


def test_eight_concurrent_speech_streams_equal_alone_and_batch(server, reference, speech) -> None:
    texts = [f"say something number {i}" for i in range(8)]
    wants = [_reference(reference, speech, True, audio=None, task="voice-chat", text=t) for t in texts]
    assert all(w.audio_codes for w, _ in wants)
    before = _metrics(server)
    got: list[dict | BaseException] = [None] * 8  # type: ignore[list-item]
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        try:
            with StepAudio2Client(f"127.0.0.1:{server.grpc_port}") as c:
                barrier.wait()
                got[i] = c.generate({"task": "voice-chat", "text": texts[i], "sampling": SAMPLING})
        except BaseException as exc:  # noqa: BLE001
            got[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (want, want_pcm), res in zip(wants, got, strict=True):
        assert isinstance(res, dict), res
        assert res["audio_codes"] == want.audio_codes
        np.testing.assert_allclose(res["pcm"], want_pcm, atol=BATCHED_TOL)
    after = _metrics(server)
    single = 'stepaudio2_token2wav_batch_streams_bucket{model="token2wav",le="1"}'
    total = 'stepaudio2_token2wav_batch_streams_count{model="token2wav"}'
    batched_rounds = (_value(after, total) - _value(after, single)) - (_value(before, total) - _value(before, single))
    assert batched_rounds > 0, "no estimator call carried more than one stream"
    assert _value(after, "stepaudio2_time_to_first_audio_seconds_count") >= 8
    assert _value(after, "stepaudio2_audio_generated_seconds_total") > 0
    assert _value(after, "stepaudio2_token2wav_compute_seconds_total") > 0
    assert _value(after, 'stepaudio2_token2wav_active_streams{model="token2wav"}') == 0


def test_cancelled_speech_stream_releases_token2wav_and_llm_state(client, server) -> None:
    cancelled = 'stepaudio2_llm_requests_finished_total{model="llm",reason="cancelled"}'
    before = _value(_metrics(server), cancelled)
    stream = client.stream({"task": "voice-chat", "sampling": {"max_new_tokens": 2000}}, HELLO.read_bytes())
    for event in stream:
        if event["type"] == "audio":
            break
    else:
        pytest.fail("no audio before the end")
    stream.close()
    text = ""
    for _ in range(100):
        text = _metrics(server)
        if (_value(text, 'stepaudio2_token2wav_active_streams{model="token2wav"}') == 0
                and _value(text, 'stepaudio2_llm_active_sequences{model="llm"}') == 0
                and _value(text, cancelled) > before):
            break
        threading.Event().wait(0.2)
    assert _value(text, 'stepaudio2_token2wav_active_streams{model="token2wav"}') == 0
    assert _value(text, 'stepaudio2_llm_active_sequences{model="llm"}') == 0
    assert _value(text, cancelled) - before == 1  # this request, finished as cancelled (not as length or stop)
    ok = client.generate({"task": "chat", "text": "still there?", "sampling": {"max_new_tokens": 2}})
    assert ok["finish_reason"] in ("stop", "length")


def _search_answer(query: str) -> str:
    return f"sunny, 21 degrees ({query})"


def test_tool_call_round_trip_through_a_scripted_assistant_turn(client, reference, speech) -> None:
    """The random model does not call tools on its own: the session's tool call is a scripted assistant turn sent
    through the same path (history -> prompt -> generation), then the result goes back as an `input` turn."""
    from stepaudio2.text import WEB_SEARCH_TOOL

    call = render_tool_call("search", {"query": "weather in Paris"})
    messages = [
        {"role": "system", "content": "You are a helpful voice assistant."},
        {"role": "tool_json_schemas", "content": [WEB_SEARCH_TOOL]},
        {"role": "human", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": call},
        {"role": "input", "content": _search_answer("weather in Paris")},
    ]
    want, want_pcm = _reference(reference, speech, True, audio=None, task=None, messages=messages,
                                generation="speech")
    got = client.generate({"messages": messages, "generation": "speech", "sampling": SAMPLING})
    assert got["token_ids"] == want.token_ids and got["audio_codes"] == want.audio_codes
    np.testing.assert_allclose(got["pcm"], want_pcm, atol=ALONE_TOL)
    # The client side of the mechanism: a reply with a tool call runs the registry and loops back.
    from stepaudio2_client import ToolRegistry
    from stepaudio2_client.tools import WEB_SEARCH_SCHEMA

    ran: list[dict] = []
    tools = ToolRegistry()
    tools.register(WEB_SEARCH_SCHEMA, lambda args: ran.append(args) or _search_answer(args["query"]))
    session = Session(client, tools)
    session.messages, session.generation = messages[:4], "speech"
    result = session.follow_up({"role": "input", "content": tools.run({"name": "search",
                                                                        "arguments": {"query": "weather in Paris"}})},
                               SAMPLING)
    assert ran == [{"query": "weather in Paris"}] and result["audio_codes"] == want.audio_codes


def test_tool_results_must_answer_a_call_that_was_made(client) -> None:
    from stepaudio2.text import WEB_SEARCH_TOOL

    base = [{"role": "tool_json_schemas", "content": [WEB_SEARCH_TOOL]}, {"role": "human", "content": "hi"}]
    never_called = [*base, {"role": "assistant", "content": "hello"}, {"role": "input", "content": "42"}]
    unknown_tool = [*base, {"role": "assistant", "content": render_tool_call("launch_rockets", {})},
                    {"role": "input", "content": "done"}]
    for messages, needle in ((never_called, "made no tool call"), (unknown_tool, "launch_rockets")):
        with pytest.raises(ClientError) as err:
            client.generate({"messages": messages, "generation": "speech", "sampling": SAMPLING})
        assert err.value.status == "INVALID_ARGUMENT" and needle in err.value.message
    text_reply = client.generate({"task": "chat", "text": "ok", "sampling": {"max_new_tokens": 40}})
    assert text_reply["token_ids"] and text_reply["audio"] is None  # text replies are never spoken


def test_server_held_session_continues_like_a_client_held_one(client) -> None:
    first = client.generate({"task": "voice-chat", "session_id": "new", "sampling": SAMPLING}, HELLO.read_bytes())
    sid = first["session_id"]
    assert isinstance(sid, str) and len(sid) >= 16
    held = client.generate({"session_id": sid, "text": "and then?", "sampling": SAMPLING})
    carried = client.generate({"messages": [*first["messages"], first["assistant_turn"],
                                            {"role": "human", "content": "and then?"}],
                               "generation": first["generation"], "sampling": SAMPLING}, HELLO.read_bytes())
    assert held["token_ids"] == carried["token_ids"] and held["session_id"] == sid
    with pytest.raises(ClientError) as err:
        client.generate({"session_id": "no-such-session", "text": "hello?"})
    assert err.value.status == "INVALID_ARGUMENT" and "session_id" in err.value.message


def _wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def test_bad_voice_prompts_and_stream_ids_are_invalid_argument(client, server) -> None:
    request = {"task": "voice-chat", "sampling": {"max_new_tokens": 60}}
    for voice, needle in ((b"", "empty"), (_wav_bytes(31.0), "30"), (b"RIFF not audio at all", "could not decode audio")):
        with pytest.raises(ClientError) as err:
            client.generate(request, HELLO.read_bytes(), voice=voice)
        assert err.value.status == "INVALID_ARGUMENT", err.value
        assert needle in err.value.message and "voice" in err.value.message.lower(), err.value.message
    # A stream id the server never handed out.
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inputs = []
    for name, value in (("op", b"push"), ("stream_id", b"0123456789abcdef")):
        t = grpcclient.InferInput(name, [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[value]], dtype=np.object_))
        inputs.append(t)
    with pytest.raises(InferenceServerException) as err:
        g.infer("token2wav", inputs)
    g.close()
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "does not exist" in err.value.message()
    # A voice of its own works, and its id can be reused without sending the audio again.
    own = client.generate(request, HELLO.read_bytes(), voice=(ASSETS / "hello_en.wav").read_bytes())
    again = client.generate({**request, "voice_id": own["audio"]["voice_id"]}, HELLO.read_bytes())
    assert own["audio"]["voice_id"] == again["audio"]["voice_id"]
    np.testing.assert_allclose(own["pcm"], again["pcm"], atol=ALONE_TOL)
    with pytest.raises(ClientError) as err:
        client.generate({**request, "voice_id": "f" * 64}, HELLO.read_bytes())
    assert err.value.status == "INVALID_ARGUMENT" and "voice_id" in err.value.message


def test_client_cli_writes_the_reply_wav_and_prints_time_to_first_audio(server, reference, speech, tmp_path) -> None:
    import subprocess
    import sys

    out = tmp_path / "reply.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "stepaudio2_client.cli", "--url", f"127.0.0.1:{server.grpc_port}", "--task",
         "voice-chat", "--audio", str(HELLO), "--out-wav", str(out), "--stream", "--max-new-tokens", "90"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "first audio" in proc.stderr and str(out) in proc.stderr, proc.stderr
    want, want_pcm = _reference(reference, speech, True, task="voice-chat")
    with wave.open(str(out), "rb") as w:
        assert w.getframerate() == 24000 and w.getsampwidth() == 2
        assert w.getnframes() == len(want.audio_codes) * 960
        got = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32767.0
    np.testing.assert_allclose(got, np.clip(want_pcm, -1, 1), atol=ALONE_TOL + 1 / 32767)  # 16-bit samples
