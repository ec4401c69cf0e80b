"""End to end on a real tritonserver (the nvidia-pytriton binary, CPU, loopback) over real gRPC.

The in-process reference pipeline is the oracle: served greedy tokens must equal it. Seeded sampling runs on
vLLM's sampler, so seeded requests are checked against themselves (alone vs. in a batch, same seed twice).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.pipeline import GenerationRequest, ReferencePipeline, load_audio_input
from stepaudio2.text import TextDelta

from .conftest import ASSETS, SERVE_EXTRA, require_module

require_module("pytriton", SERVE_EXTRA)
from stepaudio2.serving.launcher import ServerConfig  # noqa: E402
from stepaudio2_client import ClientError, Session, StepAudio2Client  # noqa: E402


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_full: Path) -> ReferencePipeline:
    return ReferencePipeline(tiny_checkpoint_full)


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
    # The streamed text deltas add up to the result's text, and to the reference's own deltas.
    plain = "".join(e["text"] for e in events if e["type"] == "text" and not e["in_speech"])
    assert plain == result["text"] and result["tool_calls"] == []  # asr offers no tools
    req = GenerationRequest(task="asr", audio=load_audio_input(clip), sampling=SamplingParams(max_new_tokens=16))
    want = "".join(i.text for i in reference.stream(req) if isinstance(i, TextDelta) and not i.in_speech)
    assert plain == want


TEXT_TASKS = [
    ({"task": "asr"}, "hello_en.wav"),
    ({"task": "translate"}, "nihao_zh.wav"),
    ({"task": "translate", "target_language": "en"}, "nihao_zh.wav"),
    ({"task": "caption"}, "weather_en.wav"),
    ({"task": "analyze"}, "hello_en.wav"),
    ({"task": "audio-qa", "text": "Is the speaker asking a question?"}, "weather_en.wav"),
    ({"task": "chat", "text": "Tell me a joke."}, None),
    ({"task": "chat"}, "hello_en.wav"),
]


@pytest.mark.parametrize(("req", "clip"), TEXT_TASKS, ids=[f"{r['task']}-{c}" for r, c in TEXT_TASKS])
def test_every_text_preset_greedy_equals_reference(
    client: StepAudio2Client, reference: ReferencePipeline, req: dict, clip: str | None
) -> None:
    audio = ASSETS / clip if clip else None
    req = {**req, "sampling": {"temperature": 0, "max_new_tokens": 12}}
    got = client.generate(req, audio.read_bytes() if audio else None)
    ref = _ref(reference, audio=audio, **req)
    assert got["token_ids"] == ref["token_ids"]
    assert got["text"] == ref["text"] and got["generation"] == "text"


@pytest.mark.parametrize(("req", "clip"), [({"task": "asr"}, "hello_en.wav"), ({"task": "chat", "text": "hi"}, None),
                                         ({"task": "voice-chat"}, "weather_en.wav")])
def test_streaming_and_unary_ensemble_replies_are_identical(client: StepAudio2Client, req: dict, clip) -> None:
    audio = (ASSETS / clip).read_bytes() if clip else None
    req = {**req, "sampling": {"temperature": 0.7, "seed": 5, "max_new_tokens": 16}}
    streamed = client.generate({**req, "speech_output": "offline"}, audio)  # the unary path synthesises offline
    unary = client.generate_unary(req, audio)
    for r in (streamed, unary):  # timings differ run to run
        if r["audio"] is not None:
            r["audio"].pop("time_to_first_audio_s")
    np.testing.assert_array_equal(streamed.pop("pcm", np.zeros(0)), unary.pop("pcm", np.zeros(0)))
    assert unary == streamed
    with pytest.raises(ClientError) as err:
        client.generate_unary({"task": "dance"})
    assert err.value.status == "INVALID_ARGUMENT" and "dance" in err.value.message


def test_eight_concurrent_streams_equal_alone_and_batch(server: ServerConfig, reference: ReferencePipeline) -> None:
    clips = ["hello_en.wav", "nihao_zh.wav", "weather_en.wav", None]
    jobs = [({"task": "chat" if clips[i % 4] is None else "asr", "text": f"request {i}" if clips[i % 4] is None else None,
              "sampling": {"max_new_tokens": 24 + i}}, ASSETS / clips[i % 4] if clips[i % 4] else None)
            for i in range(8)]
    jobs = [({k: v for k, v in r.items() if v is not None}, a) for r, a in jobs]
    before = _metrics(server)
    results: list = [None] * len(jobs)

    def run(i: int) -> None:
        req, audio = jobs[i]
        with StepAudio2Client(f"127.0.0.1:{server.grpc_port}") as c:
            results[i] = [e for e in c.stream(req, audio.read_bytes() if audio else None)][-1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (req, audio), got in zip(jobs, results, strict=True):
        assert got is not None and got["token_ids"] == _ref(reference, audio=audio, **req)["token_ids"], req
    after = _metrics(server)
    # Decode steps that ran more than one sequence: total steps minus the steps in the le="1" bucket.
    count = 'stepaudio2_llm_decode_batch_size_count{model="llm"}'
    single = 'stepaudio2_llm_decode_batch_size_bucket{model="llm",le="1"}'
    multi = (_metric_value(after, count) - _metric_value(before, count)) - (
        _metric_value(after, single) - _metric_value(before, single))
    assert multi > 0


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
    with StepAudio2Client(f"127.0.0.1:{server.grpc_port}") as c:
        for (req, audio), got in zip(jobs, results, strict=True):
            assert got is not None, req
            if req["sampling"].get("temperature", 0) == 0:  # greedy: the reference pipeline is the oracle
                ref = _ref(reference, audio=audio, **req)
                assert got["token_ids"] == ref["token_ids"], req
                assert got["generation"] == ref["generation"]
            else:  # seeded: vLLM's sampler is not the reference's numpy one; the same request alone must agree
                alone = c.generate(req, audio.read_bytes() if audio else None)
                assert got["token_ids"] == alone["token_ids"], req


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


def _wav(samples, sr: int = 16000, subtype: str = "PCM_16") -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), sr, format="WAV", subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "request_obj", "audio", "needle"),
    [
        ("empty audio", {"task": "asr"}, lambda: _wav([]), "empty"),
        ("NaN samples", {"task": "asr"}, lambda: _wav([0.1, float("nan")] * 4000, subtype="FLOAT"), "NaN"),
        ("too long", {"task": "asr", "audio_format": {"sample_rate": 8000, "dtype": "int16"}},
         lambda: bytes(2 * 8000 * 601), "600"),
        ("malformed messages", {"messages": "not a list"}, lambda: None, "messages"),
        ("bad tools", {"task": "chat", "text": "hi", "tools": [{"type": "function"}]}, lambda: None, "tool"),
    ],
)
def test_more_bad_input_is_invalid_argument(client: StepAudio2Client, name, request_obj, audio, needle) -> None:
    with pytest.raises(ClientError) as err:
        client.generate(request_obj, audio())
    assert err.value.status == "INVALID_ARGUMENT", name
    assert needle in err.value.message, (name, err.value.message)
    assert client.generate({"task": "chat", "text": "ok?", "sampling": {"max_new_tokens": 2}})["token_ids"]


def test_malformed_request_json_and_wrong_tensor_shapes(server: ServerConfig) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url = f"127.0.0.1:{server.grpc_port}"
    with StepAudio2Client(url) as c:
        raw = grpcclient.InferInput("request", [1], "BYTES")
        raw.set_data_from_numpy(np.array([b"{not json"], dtype=np.object_))
        events = []
        c._grpc.start_stream(callback=lambda result, error: events.append(error))
        c._grpc.async_stream_infer("pipeline", [raw], enable_empty_final_response=True)
        for _ in range(100):
            if events:
                break
            threading.Event().wait(0.1)
        c._grpc.stop_stream()
        assert events and events[0] is not None and "not valid UTF-8 JSON" in events[0].message()
    g = grpcclient.InferenceServerClient(url)
    for mel, length in [(np.zeros((1, 128, 50), np.int64), 48), (np.zeros((128, 50), np.float32), 48),
                        (np.zeros((1, 80, 50), np.float32), 48), (np.zeros((1, 128, 50), np.float32), 99)]:
        m = grpcclient.InferInput("mel", list(mel.shape), "INT64" if mel.dtype == np.int64 else "FP32")
        m.set_data_from_numpy(mel)
        n = grpcclient.InferInput("mel_length", [1, 1], "INT64")
        n.set_data_from_numpy(np.array([[length]], np.int64))
        with pytest.raises(InferenceServerException) as err:
            g.infer("audio_encoder", [m, n])
        assert "INVALID_ARGUMENT" in str(err.value.status()), (mel.shape, mel.dtype, err.value.message())
    g.close()


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
    for _ in range(50):  # vLLM's own running count, as its stat logger last reported it
        if _metric_value(text, 'vllm:num_requests_running{model="llm"}') == 0:
            break
        threading.Event().wait(0.2)
        text = _metrics(server)
    assert _metric_value(text, 'vllm:num_requests_running{model="llm"}') == 0
    assert _metric_value(text, 'stepaudio2_llm_kv_slots_total{model="llm"}') >= 1
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


def test_client_web_search_schema_is_the_servers() -> None:
    from stepaudio2.text import WEB_SEARCH_TOOL
    from stepaudio2_client import WEB_SEARCH_SCHEMA

    assert json.dumps(WEB_SEARCH_SCHEMA, ensure_ascii=False) == json.dumps(WEB_SEARCH_TOOL, ensure_ascii=False)


def _children() -> dict[int, list[int]]:
    """{parent pid: [live child pids]} from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    return children


def test_every_server_process_lets_openmp_threads_sleep(server: ServerConfig) -> None:
    """The launcher's OMP_WAIT_POLICY and OPENBLAS_NUM_THREADS reach tritonserver and every stub (unless the
    environment set its own);
    vLLM's engine-core process (spawned by the llm stub) gets the llm's `omp_spin_count` as GOMP_SPINCOUNT."""
    import os

    from stepaudio2.serving.launcher import OMP_WAIT_POLICY, OPENBLAS_NUM_THREADS

    from .conftest import processes_mentioning

    def cmdline(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")

    def environ(pid: int) -> dict[bytes, bytes]:
        return dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    if b"=" in item)

    servers = [pid for pid in processes_mentioning(str(server.runtime))
               if Path(f"/proc/{pid}/exe").resolve().name == "tritonserver"]
    assert len(servers) == 1, f"expected one tritonserver of {server.runtime}, found {servers}"
    children = _children()
    stubs = children.get(servers[0], [])
    llm_stubs = [pid for pid in stubs if "/llm/1/model.py" in cmdline(pid)]
    assert len(llm_stubs) == 1 and len(stubs) > 2, [cmdline(pid)[-60:] for pid in stubs]
    expected = os.environ.get("OMP_WAIT_POLICY", OMP_WAIT_POLICY).encode()
    blas = os.environ.get("OPENBLAS_NUM_THREADS", OPENBLAS_NUM_THREADS).encode()
    for pid in [servers[0], *stubs]:
        assert environ(pid).get(b"OMP_WAIT_POLICY") == expected, cmdline(pid)[-80:]
        assert environ(pid).get(b"OPENBLAS_NUM_THREADS") == blas, cmdline(pid)[-80:]

    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/models/llm/config", timeout=10) as r:
        spin = json.load(r)["parameters"]["omp_spin_count"]["string_value"]
    # The llm stub's children: multiprocessing's resource tracker and the engine core (which renames itself).
    engines = [pid for pid in children.get(llm_stubs[0], []) if "resource_tracker" not in cmdline(pid)]
    assert len(engines) == 1, [cmdline(pid)[-80:] for pid in children.get(llm_stubs[0], [])]
    assert environ(engines[0]).get(b"GOMP_SPINCOUNT") == spin.encode()
    assert b"OMP_WAIT_POLICY" not in environ(engines[0])
