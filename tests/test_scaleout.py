"""Scale-out on loopback: three real tritonservers and a real redis-server.

- `pool` serves llm, token2wav and voice_prompt only;
- `front_t2w` serves pipeline + audio_encoder + llm and reaches token2wav and voice_prompt on `pool` over gRPC;
- `front_llm` serves pipeline + audio_encoder + token2wav + voice_prompt and reaches the llm on `pool`;
both fronts keep sessions and voices in the same Redis. Oracle: the in-process reference pipeline + SpeechOutput.
The tests that stop Redis and the pool come last (pytest runs a module's tests in file order).
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.pipeline import GenerationRequest, GenerationResult, ReferencePipeline, load_audio_input
from stepaudio2.request import request_from_json
from stepaudio2.speech import SpeechChunk, SpeechOutput

from .conftest import (
    ASSETS,
    QUICK_STOP_S,
    SERVE_EXTRA,
    SERVER_LLM_PARAMETERS,
    free_port,
    require_module,
    require_tool,
    with_export,
)
from .redis_process import REDIS_EXTRA, REDIS_SERVER, RedisProcess

require_module("pytriton", SERVE_EXTRA)
redis = require_module("redis", REDIS_EXTRA)
require_tool("redis-server", REDIS_SERVER)

from stepaudio2.serving.launcher import ServerConfig, TritonProcess  # noqa: E402
from stepaudio2.serving.topology import topology  # noqa: E402
from stepaudio2_client import ClientError, StepAudio2Client  # noqa: E402

ALONE_TOL = 1e-4  # same computation as the reference, other thread counts (as in test_serving_speech)
BATCHED_TOL = 2e-3  # concurrent chunks synthesised in one batch (as in test_serving_speech)
HELLO = ASSETS / "hello_en.wav"
SAMPLING = {"max_new_tokens": 90}
POOL_MODELS = ["llm", "token2wav", "voice_prompt"]


class Cluster:
    def __init__(self, checkpoint: Path, export: Path, root: Path) -> None:
        self.redis = RedisProcess(free_port(), root / "redis")
        self.configs: dict[str, ServerConfig] = {}
        self.procs: dict[str, TritonProcess] = {}
        self.checkpoint, self.export, self.root = checkpoint, export, root

    def _server(self, name: str, models: list[str], remotes: dict[str, str], store: str | None) -> None:
        params, args = topology(models, remotes, store)
        if "llm" in models:  # the small vLLM engine of the other serving tests (two of them run side by side here)
            params["llm"] = dict(SERVER_LLM_PARAMETERS)
            if name == "pool":  # as an LLM pool would run: several tokens per response over the gRPC hop
                params["llm"]["stream_interval"] = "4"
        cfg = ServerConfig(checkpoint=self.checkpoint, runtime=self.root / name, grpc_port=free_port(),
                           http_port=free_port(), metrics_port=free_port(), model_parameters=params, extra_args=args)
        self.configs[name] = cfg
        self.procs[name] = TritonProcess(cfg)

    def start(self) -> None:
        self.redis.start()
        self._server("pool", POOL_MODELS, {}, None)
        pool = f"127.0.0.1:{self.configs['pool'].grpc_port}"
        self._server("front_t2w", ["pipeline", "audio_encoder", "llm"],
                     {"token2wav": pool, "voice_prompt": pool}, self.redis.url)
        self._server("front_llm", ["pipeline", "audio_encoder", "token2wav", "voice_prompt"],
                     {"llm": pool}, self.redis.url)
        # The session's export, copied: each runtime's export is then a no-op.
        for cfg in self.configs.values():
            with_export(cfg.runtime, self.export)
        errors: list[BaseException] = []

        def start(proc: TritonProcess) -> None:
            try:
                proc.start(timeout_s=600)
            except BaseException as exc:  # re-raised below, after every server is up or down
                errors.append(exc)

        # Three servers start side by side.
        threads = [threading.Thread(target=start, args=(p,)) for p in self.procs.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop(QUICK_STOP_S)
        self.redis.stop()

    def client(self, name: str) -> StepAudio2Client:
        return StepAudio2Client(f"127.0.0.1:{self.configs[name].grpc_port}")

    def metrics(self, name: str) -> str:
        url = f"http://127.0.0.1:{self.configs[name].metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.read().decode()


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint_full: Path, tiny_full_export: Path, tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tiny_checkpoint_full, tiny_full_export, tmp_path_factory.mktemp("scaleout"))
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_full: Path) -> ReferencePipeline:
    return ReferencePipeline(tiny_checkpoint_full)


@pytest.fixture(scope="module")
def speech(tiny_checkpoint_full: Path) -> SpeechOutput:
    return SpeechOutput(tiny_checkpoint_full)


def _reference(reference, speech, stream: bool, req: GenerationRequest):
    items = list(speech.stream(reference.stream(req)) if stream else reference.stream(req))
    result = next(i for i in items if isinstance(i, GenerationResult))
    if stream:
        return result, np.concatenate([i.samples for i in items if isinstance(i, SpeechChunk)])
    return result, speech.offline(result.audio_codes)


def _value(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _text(content) -> str:
    """A message's text, whether its content is a string or a list of parts."""
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


LLM_ACTIVE = 'vllm:num_requests_running{model="llm"}'
T2W_ACTIVE = 'stepaudio2_token2wav_active_streams{model="token2wav"}'


@pytest.mark.parametrize("front", ["front_t2w", "front_llm"])
@pytest.mark.parametrize(("task", "mode"), [("voice-chat", "stream"), ("s2st", "stream"), ("voice-chat", "offline")])
def test_split_speech_equals_the_reference(cluster, reference, speech, front: str, task: str, mode: str) -> None:
    extra = {"target_language": "en"} if task == "s2st" else {}
    req = GenerationRequest(audio=load_audio_input(HELLO), task=task, sampling=SamplingParams.from_dict(SAMPLING),
                            **extra)
    want, want_pcm = _reference(reference, speech, mode == "stream", req)
    assert want.audio_codes, "the reference reply has no speech to compare"
    with cluster.client(front) as client:
        events = list(client.stream({"task": task, "sampling": SAMPLING, "speech_output": mode, **extra},
                                    HELLO.read_bytes()))
    result = events[-1]
    assert result["type"] == "result"
    assert result["token_ids"] == want.token_ids and result["text"] == want.text
    assert result["audio_codes"] == want.audio_codes
    chunks = [e for e in events if e["type"] == "audio"]
    assert len(chunks) >= (2 if mode == "stream" else 1)
    pcm = np.concatenate([c["pcm"] for c in chunks])
    assert pcm.shape == want_pcm.shape
    np.testing.assert_allclose(pcm, want_pcm, atol=ALONE_TOL)


def test_concurrent_streams_on_a_front_with_a_remote_llm_each_equal_the_reference(cluster, reference, speech) -> None:
    """Such a front serves replies side by side (its `RequestWorker`), every server call on one thread per stub."""
    texts = [f"say something number {i}" for i in range(6)]
    wants = [_reference(reference, speech, True, GenerationRequest(task="voice-chat", text=t,
                                                                  sampling=SamplingParams.from_dict(SAMPLING)))
             for t in texts]
    got: list = [None] * len(texts)
    barrier = threading.Barrier(len(texts))

    def run(i: int) -> None:
        try:
            with cluster.client("front_llm") as c:
                barrier.wait()
                got[i] = list(c.stream({"task": "voice-chat", "text": texts[i], "sampling": SAMPLING}))
        except BaseException as exc:  # noqa: BLE001 (asserted below)
            got[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (want, want_pcm), events in zip(wants, got, strict=True):
        assert isinstance(events, list), events
        result = events[-1]
        assert result["type"] == "result" and result["token_ids"] == want.token_ids
        assert result["audio_codes"] == want.audio_codes
        pcm = np.concatenate([e["pcm"] for e in events if e["type"] == "audio"])
        np.testing.assert_allclose(pcm, want_pcm, atol=BATCHED_TOL)  # token2wav batched the concurrent chunks


def _process_tree(root: int) -> list[int]:
    """`root` and every process below it (the Python-backend stubs, vLLM's engine core)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.isdigit():
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def test_servers_share_the_launchers_session_and_lead_their_own_process_group(cluster) -> None:
    """Three servers on one machine: each in a process group of its own (one killpg stops its whole tree), all in
    the launcher's session, so with autogroup scheduling they share one scheduling group instead of taking turns
    as groups (README, "Split vs single benchmark")."""
    ours = os.getsid(0)
    autogroup = Path("/proc/self/autogroup")
    for name, proc in cluster.procs.items():
        tree = _process_tree(proc.proc.pid)
        assert len(tree) > 3, (name, tree)  # the server, its stubs (and an engine core where llm is served)
        for pid in tree:
            assert os.getpgid(pid) == proc.proc.pid, (name, pid)
            assert os.getsid(pid) == ours, (name, pid)
            if autogroup.exists():  # kernels built with CONFIG_SCHED_AUTOGROUP
                assert Path(f"/proc/{pid}/autogroup").read_text() == autogroup.read_text(), (name, pid)


def test_session_turn_two_on_another_replica_continues_the_conversation(cluster, reference) -> None:
    with cluster.client("front_t2w") as a, cluster.client("front_llm") as b:
        first = a.generate({"task": "voice-chat", "session_id": "new", "sampling": SAMPLING, "speech_output": "none"},
                           HELLO.read_bytes())
        sid = first["session_id"]
        second = b.generate({"session_id": sid, "text": "and then?", "sampling": SAMPLING, "speech_output": "none"})
        third = a.generate({"session_id": sid, "text": "go on", "sampling": SAMPLING, "speech_output": "none"})
    assert second["session_id"] == third["session_id"] == sid
    # Oracle: the reference pipeline given the whole conversation (and the session's audio) in one request.
    convo = [*first["messages"], first["assistant_turn"], {"role": "human", "content": "and then?"}]
    want2 = reference.generate(request_from_json({"messages": convo, "generation": first["generation"],
                                             "sampling": SAMPLING}, HELLO.read_bytes()))
    assert second["token_ids"] == want2.token_ids
    # The held history is the conversation (a held session numbers its audio item: index 0, the same clip).
    assert [(m["role"], _text(m["content"])) for m in second["messages"]] == \
        [(m["role"], _text(m["content"])) for m in convo]
    convo3 = [*second["messages"], second["assistant_turn"], {"role": "human", "content": "go on"}]
    assert third["messages"] == convo3
    want3 = reference.generate(request_from_json({"messages": convo3, "generation": first["generation"],
                                             "sampling": SAMPLING}, HELLO.read_bytes()))
    assert third["token_ids"] == want3.token_ids


def test_concurrent_requests_on_one_session_are_refused_not_interleaved(cluster) -> None:
    with cluster.client("front_t2w") as a, cluster.client("front_llm") as b:
        first = a.generate({"task": "chat", "text": "hi", "session_id": "new", "sampling": {"max_new_tokens": 4}})
        sid = first["session_id"]
        long = a.stream({"session_id": sid, "text": "talk for long", "sampling": {"max_new_tokens": 2000},
                         "speech_output": "none"})
        next(long)  # the first turn is under way: it holds the session
        with pytest.raises(ClientError) as err:
            b.generate({"session_id": sid, "text": "me too", "sampling": {"max_new_tokens": 4}})
        assert err.value.status == "UNAVAILABLE" and "busy" in err.value.message and sid in err.value.message
        long.close()  # cancelled: its turn is not stored, and the session is free again
        for _ in range(50):
            try:
                after = b.generate({"session_id": sid, "text": "me too", "sampling": {"max_new_tokens": 4}})
                break
            except ClientError as exc:  # the cancelled request releases its lease once its stage calls end
                assert exc.status == "UNAVAILABLE" and "busy" in exc.message
                threading.Event().wait(0.2)
        else:
            pytest.fail("the session stayed busy after the other request was cancelled")
    contents = [_text(m["content"]) for m in after["messages"] if m["role"] == "human"]
    assert contents == ["hi", "me too"]  # the cancelled turn left nothing behind, nothing is doubled


def test_voice_registered_on_one_replica_is_used_on_another(cluster) -> None:
    voice = (ASSETS / "nihao_zh.wav").read_bytes()
    request = {"task": "voice-chat", "sampling": SAMPLING, "speech_output": "offline"}
    with cluster.client("front_t2w") as a, cluster.client("front_llm") as b:
        own = a.generate({**request, "session_id": "new"}, HELLO.read_bytes(), voice=voice)  # voice_prompt: pool
        voice_id = own["audio"]["voice_id"]
        default = b.generate(request, HELLO.read_bytes())
        # front_llm's own voice_prompt never saw this audio: only the shared store knows the voice.
        again = b.generate({**request, "voice_id": voice_id}, HELLO.read_bytes())
        # The session keeps its voice: a follow-up on the other replica names none and still speaks in it.
        follow = b.generate({"session_id": own["session_id"], "text": "again", "sampling": SAMPLING,
                             "speech_output": "offline"})
    db = redis.Redis.from_url(cluster.redis.url)
    assert db.exists(f"stepaudio2:voice:{voice_id}")
    assert json.loads(db.get(f"stepaudio2:session:{own['session_id']}"))["voice_id"] == voice_id
    assert follow["audio_codes"], "the follow-up has no speech to check the voice of"
    assert follow["audio"]["voice_id"] == voice_id
    assert again["audio"]["voice_id"] == voice_id != default["audio"]["voice_id"]
    np.testing.assert_allclose(again["pcm"], own["pcm"], atol=ALONE_TOL)
    assert not np.allclose(again["pcm"], default["pcm"], atol=ALONE_TOL)


@pytest.mark.parametrize(("front", "gauge", "held_from"), [
    ("front_t2w", T2W_ACTIVE, ("audio",)),  # the remote token2wav stream opens with the first audio chunk
    ("front_llm", LLM_ACTIVE, ("text", "audio_codes")),  # the remote llm sequence runs from the first token on
])
def test_cancelled_stream_frees_the_remote_state(cluster, front: str, gauge: str, held_from: tuple) -> None:
    with cluster.client(front) as client:
        stream = client.stream({"task": "voice-chat", "sampling": {"max_new_tokens": 2000}}, HELLO.read_bytes())
        for event in stream:
            if event["type"] in held_from:
                break
        else:
            pytest.fail(f"no {held_from[0]} event before the end")
        assert _value(cluster.metrics("pool"), gauge) == 1  # the remote holds this stream's state now
        stream.close()
        text = ""
        for _ in range(100):
            text = cluster.metrics("pool")
            if _value(text, gauge) == 0:
                break
            threading.Event().wait(0.2)
        assert _value(text, gauge) == 0
        ok = client.generate({"task": "chat", "text": "still there?", "sampling": {"max_new_tokens": 2}})
    assert ok["finish_reason"] in ("stop", "length")


def test_redis_down_fails_session_requests_only(cluster) -> None:
    with cluster.client("front_t2w") as a:
        sid = a.generate({"task": "chat", "text": "hi", "session_id": "new", "sampling": {"max_new_tokens": 2}})[
            "session_id"]
        cluster.redis.stop()
        for request in ({"session_id": sid, "text": "again"}, {"task": "chat", "text": "x", "session_id": "new"}):
            with pytest.raises(ClientError) as err:
                a.generate({**request, "sampling": {"max_new_tokens": 2}})
            assert err.value.status == "UNAVAILABLE" and "session store" in err.value.message
        ok = a.generate({"task": "chat", "text": "no session", "sampling": {"max_new_tokens": 2}})
    assert ok["finish_reason"] in ("stop", "length")


def test_remote_down_is_unavailable_and_the_front_keeps_serving_text(cluster) -> None:
    """The pool goes down while `front_llm` is speaking a reply (its token2wav stream open, its llm on the pool):
    the client gets UNAVAILABLE, and the failed reply releases its local token2wav stream (README: "released ...
    on error"). Then new requests to the pool's stages are UNAVAILABLE and text-only requests still work."""
    pool = f"127.0.0.1:{cluster.configs['pool'].grpc_port}"
    with cluster.client("front_llm") as b:
        speaking = b.stream({"task": "voice-chat", "sampling": {"max_new_tokens": 2000}}, HELLO.read_bytes())
        for event in speaking:
            if event["type"] == "audio":
                break
        else:
            pytest.fail("no audio before the end")
        assert _value(cluster.metrics("front_llm"), T2W_ACTIVE) == 1
        cluster.procs["pool"].stop(QUICK_STOP_S)
        with pytest.raises(ClientError) as err:
            for event in speaking:
                assert event["type"] != "result", "the reply finished before the pool went down"
        assert err.value.status == "UNAVAILABLE" and "llm" in err.value.message and pool in err.value.message, err.value
        assert _value(cluster.metrics("front_llm"), T2W_ACTIVE) == 0  # released before the error was sent
    with cluster.client("front_t2w") as a, cluster.client("front_llm") as b:
        with pytest.raises(ClientError) as err:
            a.generate({"task": "voice-chat", "sampling": SAMPLING}, HELLO.read_bytes(), timeout=60)
        assert err.value.status == "UNAVAILABLE" and pool in err.value.message, err.value
        with pytest.raises(ClientError) as err:
            b.generate({"task": "chat", "text": "hi", "sampling": {"max_new_tokens": 2}}, timeout=60)
        assert err.value.status == "UNAVAILABLE" and "llm" in err.value.message and pool in err.value.message, err.value
        text = a.generate({"task": "chat", "text": "text only", "sampling": {"max_new_tokens": 4}})
    assert text["finish_reason"] in ("stop", "length")
