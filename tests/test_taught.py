"""The taught tiny checkpoint (issue 7): every curriculum reply, exactly, through the reference pipeline (torch
and ONNX Runtime) and through a real tritonserver; strict loading; reproducible builds; the build cache.

Expected values come from the curriculum data in stepaudio2.export.taught (the clips' .txt transcripts, the fixed
translation, spoken replies and tool call), never from running the model.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stepaudio2.export.taught import (
    CURRICULUM,
    TAUGHT_INFO,
    Lesson,
    build_taught_checkpoint,
    clip_path,
    lessons,
    tool_answer_expect,
    tool_follow_up,
)
from stepaudio2.pipeline import GenerationResult, ReferencePipeline
from stepaudio2.request import request_from_json
from stepaudio2.text import TASKS

from .conftest import QUICK_STOP_S, SERVE_EXTRA, free_port, require_module

LESSONS = lessons()
FIELDS = ("text", "tts_text", "audio_codes", "tool_calls")


def _request(lesson_request: dict, clip: str, sampling: dict | None = None):
    wire = {**lesson_request, **({"sampling": sampling} if sampling else {})}
    return request_from_json(json.loads(json.dumps(wire)), clip_path(clip).read_bytes())


def _assert_reply(got: dict, expect: dict) -> None:
    for name, value in expect.items():
        assert got[name] == value, name
    assert got["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def reference(taught_checkpoint: Path) -> ReferencePipeline:
    return ReferencePipeline(taught_checkpoint)


def test_curriculum_covers_every_shipped_clip() -> None:
    clips = sorted(p.stem for p in clip_path("x").parent.glob("*.wav"))
    assert sorted(CURRICULUM.transcripts) == clips and len(clips) >= 3
    for clip, text in CURRICULUM.transcripts.items():
        assert text == clip_path(clip).with_suffix(".txt").read_text(encoding="utf-8").strip()
    assert any("\u4e00" <= ch <= "\u9fff" for t in CURRICULUM.transcripts.values() for ch in t)  # Mandarin too


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.name for lesson in LESSONS])
def test_reference_pipeline_gives_each_reply_exactly(reference: ReferencePipeline, lesson: Lesson) -> None:
    result = reference.generate(_request(lesson.request, lesson.clip))
    _assert_reply(result.to_json(), lesson.expect)


def _ta4_groups(ids: list[int], sp) -> list[list[int]]:
    """Check the speech layout after `<tts_start>`; return the 1 text + 4 audio groups."""
    assert ids[-2:] == [sp.tts_end, sp.eot]
    body = ids[:-2]
    assert body and len(body) % 5 == 0
    groups = [body[i : i + 5] for i in range(0, len(body), 5)]
    text_done = audio_done = False
    for g in groups:
        assert sp.is_text(g[0]) or g[0] == sp.tts_pad
        text_done = text_done or g[0] == sp.tts_pad
        assert not (text_done and g[0] != sp.tts_pad), "text after <tts_pad>"
        for a in g[1:]:
            assert sp.is_audio(a)
            audio_done = audio_done or a == sp.audio_pad
            assert not (audio_done and a != sp.audio_pad), "a code after the audio pad"
    return groups


def test_voice_chat_reply_uses_the_ta4_layout(reference: ReferencePipeline) -> None:
    sp = reference.tokenizer.special
    req = _request({"task": "voice-chat"}, CURRICULUM.voice_chat_clip)
    assert reference.build_prompt(req).ids[-1] == sp.tts_start  # speech prompt ends with <tts_start>
    result = reference.generate(req)
    groups = _ta4_groups(result.token_ids, sp)
    text_ids = [g[0] for g in groups if g[0] != sp.tts_pad]
    codes = [a - sp.audio_0 for g in groups for a in g[1:] if a != sp.audio_pad]
    assert reference.tokenizer.decode(text_ids) == CURRICULUM.voice_reply.text
    assert codes == list(CURRICULUM.voice_reply.codes)
    # The curriculum exercises both fills: the audio outlasts the text, and its last group is short.
    assert groups[-1][0] == sp.tts_pad and groups[-1][-1] == sp.audio_pad


def _tool_round_trip(reference: ReferencePipeline) -> tuple[GenerationResult, GenerationResult]:
    lesson = next(x for x in LESSONS if x.request.get("tools"))
    first = reference.generate(_request(lesson.request, lesson.clip))
    wire = json.loads(json.dumps(tool_follow_up(first.to_json())))  # what a client session sends back
    second = reference.generate(request_from_json(wire, clip_path(lesson.clip).read_bytes()))
    return first, second


def test_tool_call_then_spoken_answer_reference(reference: ReferencePipeline) -> None:
    sp = reference.tokenizer.special
    first, second = _tool_round_trip(reference)
    assert first.tool_calls == [{"name": CURRICULUM.tool_call["name"], "arguments": CURRICULUM.tool_call["arguments"]}]
    # Real format: the call comes as text after <tts_end>, in <tool_call>function\n{name}\n{json}</tool_call>.
    assert first.token_ids[0] == sp.tts_end and first.token_ids[-1] == sp.eot
    markup = reference.tokenizer.decode(first.token_ids[1:-1])
    assert markup == '<tool_call>function\nsearch\n{"query": "weather in Paris today"}</tool_call>'
    # The follow-up carried the tool result as an `input` turn: result and instruction as two text items.
    assert second.messages[-1] == {"role": "input", "content": [
        {"type": "text", "text": CURRICULUM.tool_result},
        {"type": "text", "text": "\n\n\n请用口语化形式总结检索结果，简短地回答用户的问题。"}]}
    _assert_reply(second.to_json(), tool_answer_expect())
    _ta4_groups(second.token_ids, sp)


def test_task_default_sampling_also_gives_the_replies(reference: ReferencePipeline) -> None:
    """The replies are confident enough that the presets' own sampling (voice-chat: temperature 0.7, top-p 0.9,
    repetition penalty 1.05) reproduces them for any seed, so the demo can use the task defaults."""
    sampled = [x for x in LESSONS if TASKS[x.request["task"]].sampling["temperature"] > 0]
    assert {x.request["task"] for x in sampled} == {"translate", "voice-chat"}
    for lesson in sampled:
        sampling = {**dict(TASKS[lesson.request["task"]].sampling), "seed": 7}
        result = reference.generate(_request(lesson.request, lesson.clip, sampling))
        _assert_reply(result.to_json(), lesson.expect)


# ---- checkpoint ------------------------------------------------------------------------------------------------


def test_strict_loading_same_layout_as_the_random_tiny(taught_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from stepaudio2.checkpoint import read_state_dict, tensor_shapes, weight_map
    from stepaudio2.export.tiny import make_tiny_checkpoint
    from stepaudio2.models.step_audio2 import load_model

    random_ckpt = make_tiny_checkpoint(tmp_path / "random", seed=0, with_token2wav=False)
    assert tensor_shapes(taught_checkpoint) == tensor_shapes(random_ckpt)
    assert weight_map(taught_checkpoint) == weight_map(random_ckpt)
    assert json.loads((taught_checkpoint / "config.json").read_text()) == json.loads(
        (random_ckpt / "config.json").read_text())
    for name in sorted(set(weight_map(taught_checkpoint).values())):
        with safe_open(taught_checkpoint / name, framework="pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    load_model(taught_checkpoint)  # strict: every name and shape
    taught, rand = read_state_dict(taught_checkpoint), read_state_dict(random_ckpt)
    changed = [k for k in taught if not (taught[k] == rand[k]).all()]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("adapter.") for k in changed)
    assert "lm_head.weight" in changed



@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor(s): model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.__setitem__("model.norm.weigh", t.pop("model.norm.weight")),
     "unexpected tensor(s): model.norm.weigh"),
    (lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:-1].clone()),
     "misshaped tensor(s): model.norm.weight"),
], ids=["missing", "renamed", "misshaped"])
def test_strict_loading_rejects_a_broken_taught_copy(taught_checkpoint: Path, tmp_path: Path, edit, message) -> None:
    from stepaudio2.errors import CheckpointError
    from stepaudio2.models.step_audio2 import load_model

    from .test_checkpoint import _copy_with

    def apply(tensors: dict) -> dict:
        try:
            edit(tensors)
        except KeyError:  # the tensor lives in another shard
            pass
        return tensors

    src = tmp_path / "src"  # LLM files only: token2wav/ is not under test here
    shutil.copytree(taught_checkpoint, src, ignore=shutil.ignore_patterns("token2wav"))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(_copy_with(src, tmp_path / "broken", apply))


def test_build_record(taught_checkpoint: Path) -> None:
    info = json.loads((taught_checkpoint / TAUGHT_INFO).read_text(encoding="utf-8"))
    assert info["verified"] is True and info["steps"] <= info["max_steps"]
    assert info["min_margin_bf16"] > 0 and info["curriculum"] == CURRICULUM.to_json()
    assert (taught_checkpoint / "token2wav" / "flow.pt").is_file()


@pytest.fixture(scope="module")
def runtime(taught_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A serving runtime folder for the taught checkpoint: the ONNX parity test reads its model repository and
    the served tests start tritonserver on it.

    The ONNX export (about 50 s with the token2wav graphs) is kept beside the cached checkpoint, where
    `--engine onnx` puts it too, and copied in: the launcher's own hash check then finds it up to date. A stale
    or missing copy only means the launcher exports again."""
    from stepaudio2.export.repository import export_checkpoint
    from stepaudio2.export.taught import _FileLock
    from stepaudio2.serving.launcher import ServerConfig, prepare_runtime

    exported = taught_checkpoint.parent / f"{taught_checkpoint.name}-onnx"
    with _FileLock(taught_checkpoint.parent / f"{exported.name}.lock"):  # concurrent sessions export once
        export_checkpoint(taught_checkpoint, exported)  # no-op when up to date
    cfg = ServerConfig(
        checkpoint=taught_checkpoint, runtime=tmp_path_factory.mktemp("taught-serve"),
        grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
    )
    shutil.copytree(exported, cfg.runtime / "model_repository")
    stages, _ = prepare_runtime(cfg)
    return cfg, stages


def test_onnx_engine_gives_the_same_replies(reference: ReferencePipeline, runtime) -> None:
    import numpy as np

    cfg, stages = runtime
    onnx = ReferencePipeline(cfg.checkpoint, engine="onnx", repository=stages)
    for lesson in LESSONS:
        req = _request(lesson.request, lesson.clip)
        got = onnx.generate(req)
        assert got.token_ids == reference.generate(req).token_ids, lesson.name
        _assert_reply(got.to_json(), lesson.expect)
    # Logit parity on the longest prompt (tools schema + audio), first step.
    req = _request(LESSONS[-1].request, LESSONS[-1].clip)
    prompt = reference.build_prompt(req)
    logits = {}
    for name, pipe in (("torch", reference), ("onnx", onnx)):
        from stepaudio2.engines.llm import splice_audio

        b = pipe.backend
        chunks = b.encode_audio(prompt.mels, prompt.mel_lengths)
        logits[name], _ = b.prefill(splice_audio(b.embed(prompt.ids), chunks, prompt.audio_spans))
    assert np.abs(logits["onnx"] - logits["torch"]).max() <= 1e-4  # the README's bound for graphs vs torch


# ---- reproducibility and the cache -----------------------------------------------------------------------------


def _weights(ckpt: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ckpt.glob("model-*.safetensors"))}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    from stepaudio2.export.tiny import make_tiny_checkpoint

    kw = {"seed": 0, "max_steps": 3, "verify": False, "with_token2wav": False}
    a = build_taught_checkpoint(tmp_path / "a", **kw)
    b = build_taught_checkpoint(tmp_path / "b", **kw)
    assert _weights(a) == _weights(b)
    # ... and the short fit did change the random weights (so the comparison above is not vacuous).
    assert _weights(a) != _weights(make_tiny_checkpoint(tmp_path / "r", seed=0, with_token2wav=False))


def test_cache_builds_once_when_two_processes_race(tmp_path: Path) -> None:
    import os

    # Builds of older code: this seed's stale one is pruned, a recent one and another seed's are kept.
    for name in ("seed0-stale", "seed0-recent", "seed1-stale"):
        (tmp_path / name).mkdir()
    for name in ("seed0-stale", "seed1-stale"):
        os.utime(tmp_path / name, (0, 0))
    code = (
        "import sys; from pathlib import Path; from stepaudio2.export.taught import ensure_taught_checkpoint; "
        "print(ensure_taught_checkpoint(Path(sys.argv[1]), max_steps=2, verify=False))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    built = Path(outs[0])
    entries = sorted(p.name for p in tmp_path.iterdir())
    # One build, no temporary folder left behind, stale entries pruned.
    assert entries == sorted([built.name, f"{built.name}.lock", "seed0-recent", "seed1-stale"])
    info = json.loads((built / TAUGHT_INFO).read_text())
    assert info["max_steps"] == 2 and info["verified"] is False
    from stepaudio2.models.step_audio2 import load_model

    load_model(built)


def test_cli_taught_copies_the_cached_build(taught_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    from stepaudio2.cli import main

    monkeypatch.setenv("STEPAUDIO2_CACHE", str(taught_checkpoint.parent.parent))
    assert main(["tiny", "--out", str(tmp_path / "out"), "--taught"]) == 0
    assert _weights(tmp_path / "out") == _weights(taught_checkpoint)
    assert main(["tiny", "--out", str(tmp_path / "x"), "--taught", "--preset", "small"]) == 2


# ---- served: a real tritonserver on the taught checkpoint, over gRPC -------------------------------------------


@pytest.fixture(scope="module")
def served(runtime):
    require_module("pytriton", SERVE_EXTRA)
    from stepaudio2.serving.launcher import TritonProcess

    cfg, _ = runtime
    proc = TritonProcess(cfg)
    proc.start(timeout_s=300)  # the graphs are already exported into the runtime: no export here
    yield cfg
    proc.stop(QUICK_STOP_S)


@pytest.fixture()
def client(served):
    from stepaudio2_client import StepAudio2Client

    with StepAudio2Client(f"127.0.0.1:{served.grpc_port}") as c:
        yield c


def _streamed(events: list[dict]) -> dict:
    """What the event stream itself carried (before the result): plain text, speech text, codes, tool calls."""
    kinds = [e["type"] for e in events]
    return {
        "text": "".join(e["text"] for e in events if e["type"] == "text" and not e["in_speech"]),
        "tts_text": "".join(e["text"] for e in events if e["type"] == "text" and e["in_speech"]),
        "audio_codes": [c for e in events if e["type"] == "audio_codes" for c in e["codes"]],
        "tool_calls": [e["call"] for e in events if e["type"] == "tool_call"],
        "last": kinds[-1],
    }


@pytest.mark.parametrize("lesson", LESSONS, ids=[lesson.name for lesson in LESSONS])
def test_served_pipeline_gives_each_reply_exactly(client, lesson: Lesson) -> None:
    events = list(client.stream(lesson.request, clip_path(lesson.clip).read_bytes()))
    result = events[-1]
    assert result["type"] == "result"
    _assert_reply(result, lesson.expect)
    streamed = _streamed(events[:-1])
    for name in ("text", "tts_text", "audio_codes", "tool_calls"):
        assert streamed[name] == result[name], name  # the events carried the same reply as the result


def test_served_tool_call_round_trip_through_a_client_session(client) -> None:
    from stepaudio2.text import WEB_SEARCH_TOOL
    from stepaudio2_client import Session, ToolRegistry, WebSearchTool

    class Backend:  # the search service: one fixed record (the client's WebSearchTool formats it)
        def __init__(self) -> None:
            self.queries: list[str] = []

        def search(self, query: str) -> list[dict[str, str]]:
            self.queries.append(query)
            return [dict(CURRICULUM.search_hit)]

    backend = Backend()
    registry = ToolRegistry()
    registry.register(WEB_SEARCH_TOOL, WebSearchTool(backend))  # the schema the model was taught
    events: list[dict] = []
    lesson = next(x for x in LESSONS if x.request.get("tools"))
    first = {k: v for k, v in lesson.request.items() if k != "tools"}  # the session adds its registry's tools
    answer = Session(client, registry).ask(first, clip_path(lesson.clip).read_bytes(), on_event=events.append)
    # The model's call reached the client, which ran the tool with the model's arguments ...
    assert [e["call"] for e in events if e["type"] == "tool_call"] == lesson.expect["tool_calls"]
    assert backend.queries == [CURRICULUM.tool_call["arguments"]["query"]]
    # ... and sent the result back as an `input` turn; the answer is spoken (text + codes).
    assert answer["messages"][-1]["role"] == "input"
    assert answer["messages"][-1]["content"][0] == {"type": "text", "text": CURRICULUM.tool_result}
    _assert_reply(answer, tool_answer_expect())
    results = [e for e in events if e["type"] == "result"]
    assert len(results) == 2 and results[-1]["audio_codes"] == list(CURRICULUM.spoken_answer.codes)
