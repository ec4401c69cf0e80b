"""Issue 14 item 3: a conversation with several audio items (upstream's multi-turn voice chat keeps earlier spoken
turns, the user's audio and the assistant's TA4 reply, in the history).

Expected prompt ids come from upstream's chat template reimplemented in tests/test_fidelity_prompts.py; the
token count per clip from upstream's per-25 s-slice count (tests/test_fidelity_short_chunk.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stepaudio2.audio import load_audio, prepare_audio
from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.errors import InvalidInputError
from stepaudio2.pipeline import ReferencePipeline
from stepaudio2.request import AudioInput, GenerationRequest, build_prompt, request_from_json
from stepaudio2.upstream_messages import convert_messages

from .conftest import ASSETS, REPO
from .test_fidelity_prompts import upstream_ids
from .test_fidelity_short_chunk import upstream_blocks

CLIPS = ["hello_en", "weather_en"]


def _upstream_conversation(tok) -> list[dict]:
    sp = tok.special
    spoken = [*tok.encode("Hi"), sp.audio_0 + 5, sp.audio_0 + 6, sp.audio_0 + 7, sp.audio_0 + 8, sp.tts_end]
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "human", "content": [{"type": "audio", "audio": str(ASSETS / f"{CLIPS[0]}.wav")}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<tts_start>"}, {"type": "token", "token": spoken}]},
        {"role": "human", "content": [{"type": "text", "text": "and now?"},
                                      {"type": "audio", "audio": str(ASSETS / f"{CLIPS[1]}.wav")}]},
        {"role": "assistant", "content": "<tts_start>", "eot": False},
    ]


def _expected_ids(tok, conversation: list[dict]) -> list[int]:
    """Upstream's template: audio items -> one block per 25 s slice, token items -> the ids as they are."""
    out: list[int] = []
    for msg in conversation:
        content = msg["content"]
        if not isinstance(content, list):
            out += upstream_ids(tok, [msg])
            continue
        out += tok.encode(f"<|BOT|>{msg['role']}\n")
        for item in content:
            if item["type"] == "audio":
                n = load_audio(item["audio"])[0].size  # the shipped clips are 16 kHz
                chunks = [c for _, c in upstream_blocks(n)]
                out += upstream_ids(tok, [{"role": "x", "content": [{"type": "audio", "chunks": chunks}]}])[
                    len(tok.encode("<|BOT|>x\n")):-1]
            elif item["type"] == "token":
                out += item["token"]
            else:
                out += tok.encode(item["text"])
        out += tok.encode("<|EOT|>")
    return out


def test_upstream_multi_turn_voice_chat_prompt(tiny_checkpoint) -> None:
    pipe = ReferencePipeline(tiny_checkpoint)
    tok = pipe.tokenizer
    conversation = _upstream_conversation(tok)
    messages, generation, clips = convert_messages(conversation)
    assert generation == "speech" and len(clips) == 2
    prompt = build_prompt(tok, GenerationRequest(task=None, messages=messages, generation=generation, audios=clips))
    assert prompt.ids == _expected_ids(tok, conversation)
    # The encoder gets both clips' chunks, in prompt order.
    expect_mels = [m for c in CLIPS for m in prepare_audio(*load_audio(ASSETS / f"{c}.wav")).mels]
    assert len(prompt.mels) == len(expect_mels) and all(
        np.array_equal(a, b) for a, b in zip(prompt.mels, expect_mels, strict=True))
    result = pipe.generate(GenerationRequest(task=None, messages=messages, generation=generation, audios=clips,
                                             sampling=SamplingParams(max_new_tokens=3)))
    assert result.prompt_tokens == len(prompt.ids)
    # The result's messages refer to the clips by index, so a client can continue the conversation.
    audio_items = [i for m in result.to_json()["messages"] if isinstance(m["content"], list)
                   for i in m["content"] if i.get("type") == "audio"]
    assert audio_items == [{"type": "audio", "index": 0}, {"type": "audio", "index": 1}]


def test_wire_request_with_indexed_audio_items(tiny_checkpoint) -> None:
    pipe = ReferencePipeline(tiny_checkpoint)
    blobs = [(ASSETS / f"{c}.wav").read_bytes() for c in CLIPS]
    messages = [{"role": "human", "content": [{"type": "audio", "index": 1}]},
                {"role": "assistant", "content": "ok"},
                {"role": "human", "content": [{"type": "audio", "index": 0}, {"type": "text", "text": "again"}]}]
    req = request_from_json({"messages": messages, "generation": "text"}, blobs)
    prompt = build_prompt(pipe.tokenizer, req)
    lens = [prepare_audio(*load_audio(ASSETS / f"{c}.wav")).placeholder_counts for c in CLIPS]
    assert [n for _, n in prompt.audio_spans] == [*lens[1], *lens[0]]  # prompt order, not clip order
    # A preset request: history audio takes clip 0, the new turn the clip nobody refers to.
    req = request_from_json({"task": "voice-chat", "history": [
        {"role": "human", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "ok"}]}, blobs)
    prompt = build_prompt(pipe.tokenizer, req)
    assert [n for _, n in prompt.audio_spans] == [*lens[0], *lens[1]]


@pytest.mark.parametrize(("messages", "n_clips", "needle"), [
    ([{"role": "human", "content": [{"type": "audio", "index": 2}]}], 2, "audio index 2"),
    ([{"role": "human", "content": [{"type": "audio", "index": 0}]}], 2, "clip #1"),
    ([{"role": "human", "content": [{"type": "audio"}, {"type": "audio"}]}], 1, "no (more) audio"),
])
def test_bad_audio_references_name_the_problem(tok, messages, n_clips: int, needle: str) -> None:
    clips = [AudioInput(np.full(16000, 0.1, np.float32), 16000)] * n_clips
    with pytest.raises(InvalidInputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build_prompt(tok, GenerationRequest(task=None, messages=messages, audios=clips))


def test_generate_cli_takes_an_upstream_messages_file(tiny_checkpoint, tmp_path: Path) -> None:
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "human", "content": [{"type": "audio", "audio": f"{CLIPS[0]}.wav"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "human", "content": [{"type": "audio", "audio": f"{CLIPS[1]}.wav"}]},
        {"role": "assistant", "content": None},
    ]
    for c in CLIPS:  # relative paths are read next to the messages file
        (tmp_path / f"{c}.wav").write_bytes((ASSETS / f"{c}.wav").read_bytes())
    (tmp_path / "conv.json").write_text(json.dumps(conversation), encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "stepaudio2.cli", "generate", "--checkpoint", str(tiny_checkpoint),
                          "--messages", str(tmp_path / "conv.json"), "--max-new-tokens", "2", "--temperature", "0",
                          "--json"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["generation"] == "text" and len(result["token_ids"]) <= 2
    assert [m["role"] for m in result["messages"]] == ["system", "human", "assistant", "human"]
