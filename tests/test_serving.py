"""End to end on a real tritonserver (the nvidia-pytriton binary, CPU, loopback) over real gRPC.

The in-process reference pipeline is the oracle: served tokens must equal it (greedy and seeded).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.pipeline import GenerationRequest, ReferencePipeline, load_audio_input

from .conftest import ASSETS

pytest.importorskip("pytriton", reason="serving tests need the 'serve' extra (nvidia-pytriton)")
from stepaudio2.serving.launcher import ServerConfig, TritonProcess  # noqa: E402
from stepaudio2_client import ClientError, Session, StepAudio2Client  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    cfg = ServerConfig(
        checkpoint=tiny_checkpoint, runtime=tmp_path_factory.mktemp("serve"),
        grpc_port=_free_port(), http_port=_free_port(), metrics_port=_free_port(),
    )
    proc = TritonProcess(cfg)
    proc.start(timeout_s=300)
    yield cfg
    proc.stop()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> ReferencePipeline:
    return ReferencePipeline(tiny_checkpoint)


@pytest.fixture()
def client(server: ServerConfig):
    with StepAudio2Client(f"127.0.0.1:{server.grpc_port}") as c:
        yield c


def _ref(reference: ReferencePipeline, **kw) -> dict:
    sampling = SamplingParams.from_dict(kw.pop("sampling", {}))
    audio = kw.pop("audio", None)
    req = GenerationRequest(audio=load_audio_input(audio) if audio else None, sampling=sampling, **kw)
    return reference.generate(req).to_json()


def test_asr_served_equals_reference_and_streams(client: StepAudio2Client, reference: ReferencePipeline) -> None:
    clip = ASSETS / "hello_en.wav"
    events = list(client.stream({"task": "asr", "sampling": {"max_new_tokens": 16}}, clip.read_bytes()))
    result = events[-1]
    assert result["type"] == "result"
    ref = _ref(reference, task="asr", audio=clip, sampling={"max_new_tokens": 16})
    assert result["token_ids"] == ref["token_ids"] and result["text"] == ref["text"]
    assert result["audio_codes"] == ref["audio_codes"]
    plain = "".join(e["text"] for e in events if e["type"] == "text" and not e["in_speech"])
    assert plain.replace("", "") == result["text"] or result["tool_calls"]


def test_concurrent_requests_each_equal_their_reference(server: ServerConfig, reference: ReferencePipeline) -> None:
    jobs = [
        ({"task": "asr", "sampling": {"max_new_tokens": 12}}, ASSETS / "hello_en.wav"),
        ({"task": "asr", "sampling": {"max_new_tokens": 9}}, ASSETS / "nihao_zh.wav"),
        ({"task": "chat", "text": "hello there", "sampling": {"temperature": 0.8, "seed": 3, "max_new_tokens": 14}},
         None),
        ({"task": "translate", "sampling": {"temperature": 1.0, "top_k": 30, "seed": 9, "max_new_tokens": 10}},
         ASSETS / "weather_en.wav"),
        ({"task": "voice-chat", "sampling": {"max_new_tokens": 20}}, ASSETS / "weather_en.wav"),
    ]
    results: list = [None] * len(jobs)

    def run(i: int) -> None:
        req, audio = jobs[i]
        with StepAudio2Client(f"127.0.0.1:{server.grpc_port}") as c:
            results[i] = c.generate(req, audio.read_bytes() if audio else None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (req, audio), got in zip(jobs, results, strict=True):
        kw = {k: v for k, v in req.items()}
        ref = _ref(reference, audio=audio, **kw)
        assert got is not None and got["token_ids"] == ref["token_ids"], req
        assert got["generation"] == ref["generation"]


@pytest.mark.parametrize(
    ("request_obj", "audio", "needle"),
    [
        ({"task": "asr"}, b"definitely not a wav file" * 20, "audio"),
        ({"task": "dance", "text": "hi"}, None, "dance"),
        ({"task": "chat", "text": "hi", "sampling": {"temperature": -2}}, None, "temperature"),
        ({"task": "chat", "text": "hi", "bogus": 1}, None, "bogus"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, None, "robot"),
    ],
)
def test_bad_input_is_invalid_argument_and_server_keeps_serving(
    client: StepAudio2Client, request_obj: dict, audio: bytes | None, needle: str
) -> None:
    with pytest.raises(ClientError) as err:
        client.generate(request_obj, audio)
    assert err.value.status == "INVALID_ARGUMENT"
    assert needle in err.value.message
    ok = client.generate({"task": "chat", "text": "still there?", "sampling": {"max_new_tokens": 3}})
    assert len(ok["token_ids"]) >= 1


def _metrics(server: ServerConfig) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _metric_value(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_cancel_frees_the_request_and_metrics_record_it(client: StepAudio2Client, server: ServerConfig) -> None:
    before = _metric_value(_metrics(server), 'stepaudio2_llm_requests_finished_total{model="llm",reason="cancelled"}')
    stream = client.stream({"task": "chat", "text": "talk for a long time", "sampling": {"max_new_tokens": 4000}})
    seen = 0
    for event in stream:
        seen += event["type"] == "text"
        if seen >= 2:
            break
    stream.close()  # leaving the iterator cancels the request on the server
    ok = client.generate({"task": "chat", "text": "next", "sampling": {"max_new_tokens": 2}})
    assert ok["finish_reason"] in ("length", "stop")
    text = _metrics(server)
    for _ in range(50):
        if _metric_value(text, 'stepaudio2_llm_requests_finished_total{model="llm",reason="cancelled"}') > before:
            break
        threading.Event().wait(0.2)
        text = _metrics(server)
    assert _metric_value(text, 'stepaudio2_llm_requests_finished_total{model="llm",reason="cancelled"}') > before
    assert _metric_value(text, "stepaudio2_time_to_first_token_seconds_count") >= 1
    assert _metric_value(text, "stepaudio2_generated_tokens_total") >= 2
    assert "nv_inference_request_success" in text


def test_multi_turn_follow_up_equals_reference(client: StepAudio2Client, reference: ReferencePipeline) -> None:
    session = Session(client)
    clip = ASSETS / "hello_en.wav"
    first = session.ask({"task": "chat", "sampling": {"max_new_tokens": 6}}, clip.read_bytes())
    second = session.follow_up({"role": "human", "content": "and then?"}, {"max_new_tokens": 6})
    messages = [*first["messages"], first["assistant_turn"], {"role": "human", "content": "and then?"}]
    ref = reference.generate(GenerationRequest(task=None, messages=messages, generation=first["generation"],
                                               audio=load_audio_input(clip), sampling=SamplingParams(max_new_tokens=6)))
    assert second["token_ids"] == ref.token_ids


def test_client_cli_json_matches_reference(server: ServerConfig, reference: ReferencePipeline) -> None:
    clip = ASSETS / "nihao_zh.wav"
    proc = subprocess.run(
        [sys.executable, "-m", "stepaudio2_client.cli", "--url", f"127.0.0.1:{server.grpc_port}", "--task", "asr",
         "--audio", str(clip), "--max-new-tokens", "8", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == _ref(reference, task="asr", audio=clip, sampling={"max_new_tokens": 8})["token_ids"]


def test_client_library_does_not_import_torch() -> None:
    code = "import sys, stepaudio2_client; assert 'torch' not in sys.modules and 'stepaudio2' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
