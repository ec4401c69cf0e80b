"""The OpenAI-compatible gateway (issue 17) against a real tritonserver on the taught checkpoint, driven by the
official `openai` package (and raw HTTP where the error bodies themselves are under test).

Expected replies come from the curriculum data (stepaudio2.export.taught) or from the in-process reference
pipeline, never from the gateway itself.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request
import wave
from pathlib import Path

import pytest

from stepaudio2.export.taught import CURRICULUM, clip_path

from .conftest import free_port
from .test_taught import runtime, served  # noqa: F401 (fixtures: the taught server, started once here)

openai = pytest.importorskip("openai", reason="gateway tests need the 'dev' extra (openai)")
pytest.importorskip("starlette", reason="gateway tests need the 'gateway' extra")

SAMPLES_PER_CODE = 960  # 24 kHz / 25 Hz speech codes
MODEL = "step-audio-2-mini"
BODY_LIMIT_MB = 1


def _gateway(grpc: str, tmp: Path, *extra: str):
    from stepaudio2.serving.gateway_process import GatewayProcess

    gw = GatewayProcess(grpc, "127.0.0.1", free_port(), tmp / "gateway.log", extra_args=list(extra))
    gw.start()
    return gw


@pytest.fixture(scope="module")
def gateway(served, tmp_path_factory):  # noqa: F811
    gw = _gateway(f"127.0.0.1:{served.grpc_port}", tmp_path_factory.mktemp("gw"),
                  "--max-body-mb", str(BODY_LIMIT_MB), "--timeout", "120")
    yield gw
    gw.stop()


@pytest.fixture()
def oai(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=120)


def _b64(stem: str) -> str:
    return base64.b64encode(clip_path(stem).read_bytes()).decode()


def _audio_msg(stem: str) -> dict:
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": _b64(stem), "format": "wav"}}]}


def _wav_frames(data: bytes) -> tuple[int, int]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes(), w.getframerate()


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _triton_text(cfg) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics_port}/metrics", timeout=10).read().decode()


def _triton_metric(cfg, name: str, required: bool = False) -> float:
    """Sum of the series starting with `name` (0 when a labelled counter has no series yet); `required`: the
    series must be there (a gauge read as 0 because it is missing would prove nothing)."""
    lines = [line for line in _triton_text(cfg).splitlines() if line.startswith(name)]
    assert lines or not required, f"{name} is not on Triton's /metrics"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


# ---- models, transcriptions, translations ------------------------------------------------------------------


def test_models_and_health(oai, gateway) -> None:
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    with urllib.request.urlopen(f"{gateway.url}/health", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"


@pytest.mark.parametrize("clip", sorted(CURRICULUM.transcripts))
def test_transcription_of_each_clip(oai, clip: str) -> None:
    with open(clip_path(clip), "rb") as f:
        got = oai.audio.transcriptions.create(model=MODEL, file=f)
    assert got.text == CURRICULUM.transcripts[clip]
    with open(clip_path(clip), "rb") as f:
        text = oai.audio.transcriptions.create(model=MODEL, file=f, response_format="text")
    assert text.strip() == CURRICULUM.transcripts[clip]


def test_transcription_verbose_and_streamed(oai) -> None:
    clip = CURRICULUM.voice_chat_clip
    with open(clip_path(clip), "rb") as f:
        verbose = oai.audio.transcriptions.create(model=MODEL, file=f, response_format="verbose_json", language="en")
    frames, rate = _wav_frames(clip_path(clip).read_bytes())
    assert verbose.text == CURRICULUM.transcripts[clip] and verbose.language == "en"
    assert verbose.duration == pytest.approx(frames / rate)
    with open(clip_path(clip), "rb") as f:
        events = list(oai.audio.transcriptions.create(model=MODEL, file=f, stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == CURRICULUM.transcripts[clip]
    assert events[-1].type == "transcript.text.done" and events[-1].text == CURRICULUM.transcripts[clip]


def test_translation(oai) -> None:
    with open(clip_path(CURRICULUM.translation_clip), "rb") as f:
        got = oai.audio.translations.create(model=MODEL, file=f)
    assert got.text == CURRICULUM.translation


# ---- chat completions ----------------------------------------------------------------------------------------


def _voice_chat(oai, fmt: str, stream: bool = False, **kw):
    return oai.chat.completions.create(
        model=MODEL, messages=[_audio_msg(CURRICULUM.voice_chat_clip)], modalities=["text", "audio"],
        audio={"voice": "default", "format": fmt}, stream=stream, **kw)


def test_voice_chat_returns_the_taught_reply_and_a_wav(oai) -> None:
    reply = _voice_chat(oai, "wav")
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.audio.transcript == CURRICULUM.voice_reply.text
    frames, rate = _wav_frames(base64.b64decode(choice.message.audio.data))
    assert rate == 24000 and frames == len(CURRICULUM.voice_reply.codes) * SAMPLES_PER_CODE
    assert reply.usage.completion_tokens > 0 and reply.usage.total_tokens > reply.usage.prompt_tokens > 0


def test_streamed_deltas_join_into_the_non_streamed_reply(oai) -> None:
    whole = _voice_chat(oai, "pcm16").choices[0].message.audio
    transcript, pcm, content, finish, usage = [], [], [], None, None
    for chunk in _voice_chat(oai, "pcm16", stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        content.append(delta.content or "")
        if delta.audio is not None:
            audio = delta.audio if isinstance(delta.audio, dict) else delta.audio.model_dump()
            transcript.append(audio.get("transcript") or "")
            pcm.append(base64.b64decode(audio.get("data") or ""))
    assert sum(1 for p in pcm if p) > 1, "audio should arrive in several deltas"
    assert "".join(transcript) == whole.transcript == CURRICULUM.voice_reply.text
    assert b"".join(pcm) == base64.b64decode(whole.data)
    assert len(b"".join(pcm)) == 2 * len(CURRICULUM.voice_reply.codes) * SAMPLES_PER_CODE
    assert "".join(content) == "" and finish == "stop" and usage.completion_tokens > 0


def test_tool_call_then_spoken_answer(oai) -> None:
    from stepaudio2_client import WEB_SEARCH_SCHEMA

    messages = [_audio_msg(CURRICULUM.tool_clip)]
    # The taught lesson's persona is dated 2025-08-28 (extension field: the date the tool persona states).
    kw = {"model": MODEL, "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"},
          "tools": [WEB_SEARCH_SCHEMA], "extra_body": {"stepaudio2": {"today": "2025-08-28"}}}
    first = oai.chat.completions.create(messages=messages, **kw).choices[0]
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls
    assert call.type == "function" and call.function.name == CURRICULUM.tool_call["name"]
    assert json.loads(call.function.arguments) == CURRICULUM.tool_call["arguments"]
    messages += [first.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": CURRICULUM.tool_result}]
    answer = oai.chat.completions.create(messages=messages, **kw).choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert answer.message.audio.transcript == CURRICULUM.spoken_answer.text
    frames, _ = _wav_frames(base64.b64decode(answer.message.audio.data))
    assert frames == len(CURRICULUM.spoken_answer.codes) * SAMPLES_PER_CODE


def test_multi_turn_history_matches_the_reference_pipeline(oai, served) -> None:  # noqa: F811
    """Turn 2 sends turn 1's spoken reply back by its audio id plus a new text question; the reply equals the
    in-process reference pipeline's on the same conversation (greedy)."""
    from stepaudio2.pipeline import ReferencePipeline
    from stepaudio2.request import request_from_json

    ref = ReferencePipeline(served.checkpoint)
    audio = clip_path(CURRICULUM.voice_chat_clip).read_bytes()
    first_ref = ref.generate(request_from_json({"task": "voice-chat"}, audio)).to_json()
    first = _voice_chat(oai, "wav", temperature=0).choices[0].message
    assert first.audio.transcript == first_ref["tts_text"]
    question = "And what about tomorrow?"
    wire = {"messages": [*first_ref["messages"], first_ref["assistant_turn"], {"role": "human", "content": question}],
            "generation": "text", "sampling": {"temperature": 0.0, "max_new_tokens": 40}}
    want = ref.generate(request_from_json(wire, audio)).to_json()
    second = oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=40, messages=[
        {"role": "system", "content": "请用语音与我交流。"}, _audio_msg(CURRICULUM.voice_chat_clip),
        {"role": "assistant", "audio": {"id": first.audio.id}}, {"role": "user", "content": question}])
    assert second.choices[0].message.content == (want["text"] or None)
    assert second.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert second.usage.completion_tokens == want["usage"]["completion_tokens"]


def test_stop_string_cuts_the_reply(oai) -> None:
    full = oai.chat.completions.create(model=MODEL, messages=[_audio_msg("hello_en")], temperature=0)
    text = full.choices[0].message.content
    assert text and len(text) > 4
    stop = text[2:4]
    cut = oai.chat.completions.create(model=MODEL, messages=[_audio_msg("hello_en")], temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


# ---- errors, limits, keys -------------------------------------------------------------------------------------


def _chat_body(**kw) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}).encode()


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (_chat_body(model="gpt-4o"), 404, "model"),
    (_chat_body(temperature=5), 400, "temperature"),
    (_chat_body(top_p=1.5), 400, "top_p"),
    (_chat_body(max_tokens=-3), 400, "max_tokens"),
    (_chat_body(modalities=["text", "audio"], audio={"voice": "nobody", "format": "wav"}), 400, "audio.voice"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "wav"}}]}]),
     400, "messages[0].content[0].input_audio.data"),
    (_chat_body(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}]}]),
     400, "messages[0].content[0].input_audio.data"),
    (_chat_body(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(b"GIF89a definitely not a wav" * 10).decode(), "format": "wav"}}]}]),
     400, "messages[0].content[0].input_audio.data"),
], ids=["json", "model", "temperature", "top_p", "max_tokens", "voice", "no-data", "bad-b64", "not-audio"])
def test_bad_input_is_an_openai_shaped_4xx(gateway, oai, body: bytes, status: int, param) -> None:
    got_status, got = _post(f"{gateway.url}/v1/chat/completions", body)
    assert got_status == status
    assert set(got["error"]) == {"message", "type", "param", "code"} and got["error"]["param"] == param
    assert oai.models.list().data  # and the gateway keeps serving


def test_bad_input_through_the_sdk_raises_its_error_classes(oai) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=9)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="whisper-1", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as err, open(Path(__file__), "rb") as f:
        oai.audio.transcriptions.create(model=MODEL, file=f)  # a Python file is not audio
    assert err.value.body["param"] == "file"


def test_server_side_validation_comes_back_as_400(oai) -> None:
    """A tool result that answers no tool call passes the gateway's checks; Triton refuses it (INVALID_ARGUMENT)
    and the client gets a 400 with the server's message."""
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "tool", "tool_call_id": "call_x", "content": "42"}])
    assert "made no tool call" in err.value.body["message"]


def test_oversize_body_is_413(gateway, oai) -> None:
    big = base64.b64encode(b"\0" * (BODY_LIMIT_MB * 1024 * 1024)).decode()
    status, got = _post(f"{gateway.url}/v1/chat/completions", _chat_body(messages=[
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": big, "format": "wav"}}]}]))
    assert status == 413 and got["error"]["code"] == "request_too_large"
    assert oai.models.list().data


def test_api_keys(served, tmp_path) -> None:  # noqa: F811
    gw = _gateway(f"127.0.0.1:{served.grpc_port}", tmp_path, "--api-key", "sk-right")
    try:
        for key in (None, "sk-wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            status, got = _post(f"{gw.url}/v1/chat/completions", _chat_body(), headers)
            assert status == 401 and got["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-right", max_retries=0)
        with open(clip_path("hello_en"), "rb") as f:
            assert ok.audio.transcriptions.create(model=MODEL, file=f).text == CURRICULUM.transcripts["hello_en"]
    finally:
        gw.stop()


def test_keys_are_required_beyond_loopback(tmp_path) -> None:
    from stepaudio2_gateway.app import create_app
    from stepaudio2_gateway.config import GatewayConfig

    with pytest.raises(ValueError, match="API keys"):
        create_app(GatewayConfig(host="0.0.0.0"))
    create_app(GatewayConfig(host="0.0.0.0", api_keys=frozenset({"k"})))  # with keys it may listen there


def test_triton_down_is_503_and_the_gateway_keeps_serving(tmp_path) -> None:
    gw = _gateway(f"127.0.0.1:{free_port()}", tmp_path)  # nothing listens there
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=30)
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert err.value.status_code == 503 and err.value.body["code"] == "server_unavailable"
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"{gw.url}/health", timeout=10)
        assert health.value.code == 503
        assert client.models.list().data[0].id == MODEL
    finally:
        gw.stop()


def test_disconnect_mid_stream_frees_the_triton_stream(gateway, served, long_seed) -> None:  # noqa: F811
    """Read the SSE stream until the first text delta of a long reply, then hang up: the gateway cancels the gRPC
    stream, the LLM counts a cancelled request and its slot (and any token2wav stream) is released."""
    import http.client

    question = "Tell me a long story about the sea."
    cancelled = 'stepaudio2_llm_requests_finished_total{model="llm",reason="cancelled"}'
    before = _triton_metric(served, cancelled)
    body = _chat_body(messages=[{"role": "user", "content": question}], stream=True, temperature=LONG_TEMPERATURE,
                      top_p=1.0, seed=long_seed, max_tokens=1000, stepaudio2={"repetition_penalty": 1.0})
    host, port = gateway.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    while True:  # up to the first non-empty text delta
        line = resp.readline()
        assert line, "the stream ended before any text"
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            break
    conn.sock.close()  # hang up mid-stream
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
            _triton_metric(served, cancelled) > before and _triton_metric(served, 'vllm:num_requests_running{model="llm"}', required=True) == 0):
        time.sleep(0.2)
    text = urllib.request.urlopen(f"{gateway.url}/metrics", timeout=10).read().decode()
    # On a miss, say which side lost it: did the gateway see the hang-up, and how did the LLM end the request?
    why = [line for line in text.splitlines() if line.startswith("stepaudio2_gateway_cancelled_total")] + [
        line for line in _triton_text(served).splitlines() if line.startswith("stepaudio2_llm_requests_finished_total")]
    assert _triton_metric(served, cancelled) == before + 1, why
    assert _triton_metric(served, 'vllm:num_requests_running{model="llm"}', required=True) == 0
    assert _triton_metric(served, "stepaudio2_token2wav_active_streams", required=True) == 0
    assert 'stepaudio2_gateway_cancelled_total{reason="disconnect"} 1.0' in text


def test_gateway_metrics_after_traffic(gateway, oai) -> None:
    _voice_chat(oai, "pcm16", stream=True).response.read()
    assert _post(f"{gateway.url}/v1/chat/completions", _chat_body(top_p=7))[0] == 400
    text = urllib.request.urlopen(f"{gateway.url}/metrics", timeout=10).read().decode()
    for name in ('stepaudio2_gateway_requests_total{endpoint="/v1/chat/completions",status="200"}',
                 "stepaudio2_gateway_request_seconds_bucket", "stepaudio2_gateway_time_to_first_audio_seconds_count",
                 "stepaudio2_gateway_in_flight 0.0", 'stepaudio2_gateway_errors_total{status="400"}'):
        assert name in text, name


LONG_TEMPERATURE = 2.0  # flat sampling: the taught model rarely picks its end-of-turn token on an untaught prompt


@pytest.fixture(scope="module")
def long_seed(gateway) -> int:
    """A seed whose served reply to the story prompt runs at least 300 tokens (vLLM's seeded sampling is
    deterministic), so the tests below act on a reply that is still being generated."""
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=120)
    lengths = {}
    for seed in range(1, 13):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a long story about the sea."}],
            temperature=LONG_TEMPERATURE, top_p=1.0, seed=seed, max_tokens=1000,
            extra_body={"stepaudio2": {"repetition_penalty": 1.0}})
        lengths[seed] = reply.usage.completion_tokens
        if lengths[seed] >= 300:
            return seed
    pytest.fail(f"no seed gives a reply of 300+ tokens: {lengths}")


def _long_text_body(seed: int, **kw) -> bytes:
    """The `long_seed` reply: several hundred tokens, still running when the test acts."""
    return _chat_body(messages=[{"role": "user", "content": "Tell me a long story about the sea."}],
                      temperature=LONG_TEMPERATURE, top_p=1.0, seed=seed, max_tokens=1000,
                      stepaudio2={"repetition_penalty": 1.0}, **kw)


def test_timeout_is_504_and_cancels_the_triton_stream(served, tmp_path, long_seed) -> None:  # noqa: F811
    gw = _gateway(f"127.0.0.1:{served.grpc_port}", tmp_path, "--timeout", "0.5")
    try:
        cancelled = 'stepaudio2_llm_requests_finished_total{model="llm",reason="cancelled"}'
        before = _triton_metric(served, cancelled)
        status, got = _post(f"{gw.url}/v1/chat/completions", _long_text_body(long_seed))
        assert status == 504 and got["error"]["code"] == "timeout"
        # vLLM's running gauge follows the abort at its stat logger's next record, after our counter: wait for both.
        running = 'vllm:num_requests_running{model="llm"}'
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                _triton_metric(served, cancelled) > before and _triton_metric(served, running, required=True) == 0):
            time.sleep(0.2)
        assert _triton_metric(served, cancelled) == before + 1
        assert _triton_metric(served, running, required=True) == 0
    finally:
        gw.stop()


def test_full_gateway_answers_429(served, tmp_path, long_seed) -> None:  # noqa: F811
    import http.client

    gw = _gateway(f"127.0.0.1:{served.grpc_port}", tmp_path, "--max-in-flight", "1")
    try:
        host, port = gw.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/v1/chat/completions", _long_text_body(long_seed, stream=True), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")  # the one slot is taken
        status, got = _post(f"{gw.url}/v1/chat/completions", _chat_body())
        assert status == 429 and got["error"]["code"] == "rate_limit_exceeded"
        conn.close()
    finally:
        gw.stop()


def test_full_triton_answers_429_server_full(server, tmp_path) -> None:
    """Triton itself full (the session server's llm: 8 running + 4 waiting, SERVER_LLM_PARAMETERS): the gateway
    turns the pipeline's UNAVAILABLE into 429 `server_full` with Retry-After, and serves again once the load left.
    The fill requests sample at temperature 1, so one may hit a stop id and free its slot before the chat arrives;
    only then is the attempt repeated with a fresh fill (a chat served while every fill still ran fails the test)."""
    import tritonclient.grpc as grpcclient

    from .conftest import SERVER_LLM_PARAMETERS
    from .test_llm_vllm import _llm_inputs

    running, waiting = int(SERVER_LLM_PARAMETERS["max_num_seqs"]), int(SERVER_LLM_PARAMETERS["max_queue"])
    gw = _gateway(f"127.0.0.1:{server.grpc_port}", tmp_path)
    try:
        req = urllib.request.Request(f"{gw.url}/v1/chat/completions", data=_chat_body(),
                                     headers={"Content-Type": "application/json"})
        refused = None
        for attempt in range(3):
            g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
            errors: list = []
            ended: list = []  # fill requests that finished (a stop id): the server was not full for the whole attempt

            def on_response(result, error, errors=errors, ended=ended) -> None:
                if error is not None:
                    errors.append(error)
                elif result.get_response().parameters["triton_final_response"].bool_param:
                    ended.append(result.get_response().id)

            g.start_stream(callback=on_response)
            try:
                for i in range(running + waiting):  # long raw llm requests take every slot and every queue place
                    g.async_stream_infer("llm", _llm_inputs(4000, seed=100 * attempt + i), request_id=f"fill{i}",
                                         enable_empty_final_response=True)
                deadline = time.monotonic() + 60
                while not ended and time.monotonic() < deadline and (
                        _triton_metric(server, 'vllm:num_requests_running{model="llm"}', required=True) != running
                        or _triton_metric(server, 'vllm:num_requests_waiting{model="llm"}', required=True) != waiting):
                    time.sleep(0.2)
                assert not errors, [e.message() for e in errors]
                assert ended or time.monotonic() < deadline, "the llm never reached 8 running + 4 waiting"
                try:
                    urllib.request.urlopen(req, timeout=60)
                except urllib.error.HTTPError as exc:
                    refused = exc
                ended_by_then = list(ended)  # before the fill is cancelled below
            finally:
                g.stop_stream(cancel_requests=True)  # the load leaves: the llm aborts its vLLM requests
                g.close()
            if refused is not None or not ended_by_then:
                break
        assert refused is not None, "a chat was served while every fill request still held its place"
        body = json.loads(refused.read())
        assert refused.code == 429 and body["error"]["code"] == "server_full", body
        assert refused.headers["Retry-After"] == "1"
        deadline = time.monotonic() + 30
        while _triton_metric(server, 'vllm:num_requests_running{model="llm"}') and time.monotonic() < deadline:
            time.sleep(0.2)
        status, got = _post(f"{gw.url}/v1/chat/completions", _chat_body(max_tokens=2))
        assert status == 200 and got["choices"][0]["message"]["role"] == "assistant", got
    finally:
        gw.stop()


def test_registered_voice_is_usable_by_name(gateway, oai, served) -> None:  # noqa: F811
    """POST /v1/audio/voices registers a reference wav under a name; a reply in that voice equals the pipeline's
    own reply when the same wav is sent straight to Triton, and differs from the default voice."""
    import httpx

    from stepaudio2_client import StepAudio2Client

    ref_wav = clip_path("weather_en").read_bytes()  # any speech clip other than the bundled voice
    resp = httpx.post(f"{gateway.url}/v1/audio/voices", data={"name": "narrator"},
                      files={"file": ("v.wav", ref_wav, "audio/wav")}, timeout=120)
    assert resp.status_code == 200 and resp.json()["id"] == "narrator" and resp.json()["voice_id"]
    assert "narrator" in [v["id"] for v in httpx.get(f"{gateway.url}/v1/audio/voices").json()["data"]]
    bad = httpx.post(f"{gateway.url}/v1/audio/voices", data={"name": "noise"},
                     files={"file": ("v.wav", b"not a wav at all", "audio/wav")}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "file"
    got = oai.chat.completions.create(model=MODEL, messages=[_audio_msg(CURRICULUM.voice_chat_clip)],
                                      modalities=["text", "audio"], audio={"voice": "narrator", "format": "pcm16"})
    pcm = base64.b64decode(got.choices[0].message.audio.data)
    with StepAudio2Client(f"127.0.0.1:{served.grpc_port}") as direct:
        want = direct.generate({"task": "voice-chat"}, clip_path(CURRICULUM.voice_chat_clip).read_bytes(),
                               voice=ref_wav)["pcm"]
    from stepaudio2_gateway.audio import pcm16

    assert pcm == pcm16(want)
    default = base64.b64decode(_voice_chat(oai, "pcm16").choices[0].message.audio.data)
    assert len(default) == len(pcm) and default != pcm
