"""Issue 14 item 4: think mode as upstream's examples-think.py prompts it.

Upstream ends the prompt with the assistant opener {"role": "assistant", "content": "<think>\\n", "eot": False},
i.e. the single segment `<|BOT|>assistant\\n<think>\\n`; the model reasons, writes `</think>`, then answers (a
spoken answer opens with its own `<tts_start>`). The reasoning is returned apart and never spoken, and the
history keeps only the answer.
"""

from __future__ import annotations

import json

import pytest

from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.pipeline import ReferencePipeline
from stepaudio2.request import GenerationRequest, build_prompt, request_from_json
from stepaudio2.text import OutputDemuxer, assistant_turn_from_reply

from .conftest import ASSETS
from .test_fidelity_prompts import AUDIO, UPSTREAM, upstream_ids


@pytest.mark.parametrize("task", ["chat", "voice-chat"])
def test_think_prompt_equals_upstream(tok, task: str) -> None:
    from stepaudio2.text import build_messages, encode_prompt

    messages, generation = build_messages(task, audio_chunks=AUDIO, text=None)
    ours = encode_prompt(tok, messages, generation=generation, think=True).ids
    expect = upstream_ids(tok, [{"role": "system", "content": UPSTREAM[task]},
                                {"role": "human", "content": [{"type": "audio", "chunks": AUDIO}]},
                                {"role": "assistant", "content": "<think>\n", "eot": False}])
    assert ours == expect


def test_reasoning_is_apart_and_never_spoken(tok) -> None:
    sp = tok.special
    reasoning = tok.encode("The user greets me.")
    ta4 = [*tok.encode("Hi"), sp.audio_0 + 1, sp.audio_0 + 2, sp.audio_0 + 3, sp.audio_0 + 4, sp.tts_end, sp.eot]
    reply = [*reasoning, sp.think_end, *tok.encode("\n\n"), sp.tts_start, *ta4]
    demux = OutputDemuxer(sp, tok, speech=False, think=True)
    res = demux.demux_all(reply)
    assert res.reasoning == "The user greets me."
    assert res.tts_text == "Hi" and res.audio_codes == [1, 2, 3, 4]
    assert "greets" not in res.text + res.tts_text  # nothing of the reasoning reaches the answer or the speech
    # Without think mode the same ids would put the reasoning into the plain text.
    assert "greets" in OutputDemuxer(sp, tok, speech=False).demux_all(reply).text


def test_pipeline_think_request(tiny_checkpoint) -> None:
    pipe = ReferencePipeline(tiny_checkpoint)
    req = request_from_json({"task": "voice-chat", "think": True, "sampling": {"max_new_tokens": 3}},
                            (ASSETS / "hello_en.wav").read_bytes())
    prompt = build_prompt(pipe.tokenizer, req)
    assert pipe.tokenizer.decode(prompt.ids).endswith("<|BOT|>assistant\n<think>\n")
    result = pipe.generate(req)
    wire = json.loads(json.dumps(result.to_json()))
    assert "reasoning" in wire and isinstance(wire["reasoning"], str)
    plain = pipe.generate(GenerationRequest(task="chat", text="hi", sampling=SamplingParams(max_new_tokens=2)))
    assert "reasoning" not in plain.to_json()


def test_history_keeps_the_answer_only(tok) -> None:
    from stepaudio2.pipeline import _answer_ids

    sp = tok.special
    reply = [*tok.encode("hmm"), sp.think_end, sp.tts_start, *tok.encode("Hi"), sp.audio_0 + 1, sp.tts_end, sp.eot]
    res = OutputDemuxer(sp, tok, speech=False, think=True).demux_all(reply)
    turn = assistant_turn_from_reply("speech", _answer_ids(reply, res, sp), "", special=sp)
    assert turn["content"][1]["ids"] == [*tok.encode("Hi"), sp.audio_0 + 1, sp.tts_end]


def test_think_field_is_validated(tok) -> None:
    from stepaudio2.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="think"):
        build_prompt(tok, request_from_json({"task": "chat", "text": "x", "think": "yes"}))
