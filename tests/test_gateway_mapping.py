"""The gateway's OpenAI -> pipeline mapping, without a server: its requests build exactly the prompts the task
presets build (so the model sees what it was trained on), its protocol copies equal the server's constants, and
bad bodies are 400s naming the field. The served behaviour is in test_gateway.py."""

from __future__ import annotations

import base64
import json

import pytest

from stepaudio2.export.taught import CURRICULUM, clip_path, tool_follow_up
from stepaudio2.request import build_prompt, request_from_json
from stepaudio2_gateway import prompts
from stepaudio2_gateway.chat import parse_chat, pipeline_request
from stepaudio2_gateway.errors import APIError

WAV = clip_path(CURRICULUM.voice_chat_clip).read_bytes()
B64 = base64.b64encode(WAV).decode()


def _audio_part(b64: str = B64, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64, "format": fmt}}


def _call(body: dict):
    params = parse_chat({"model": "step-audio-2-mini", **body}, lambda v: v == "default")
    return pipeline_request(params, lambda _id: None, 300.0)


def _ids(tok, wire: dict, audio: bytes | None) -> list[int]:
    from stepaudio2.serving.speech_route import SpeechOptions

    obj = json.loads(json.dumps(wire))
    SpeechOptions.pop_from(obj)  # serving options, taken out by the server before the request is parsed
    return build_prompt(tok, request_from_json(obj, audio)).ids


def test_protocol_copies_equal_the_server_constants() -> None:
    from stepaudio2.text import TASKS, tasks, tokens
    from stepaudio2.text.history import DEFAULT_TOOL_RESULT_INSTRUCTION

    assert prompts.CHAT_PROMPT == tasks.CHAT_PROMPT
    assert prompts.VOICE_CHAT_PROMPT == tasks.VOICE_CHAT_PROMPT
    assert prompts.TOOL_ABILITY_PROMPT == tasks.TOOL_ABILITY_PROMPT
    assert prompts.TOOL_RESULT_INSTRUCTION == DEFAULT_TOOL_RESULT_INSTRUCTION
    assert (prompts.TTS_START, prompts.TTS_END) == (tokens.TTS_START, tokens.TTS_END)
    assert prompts.SAMPLING_DEFAULTS["text"] == dict(TASKS["chat"].sampling)
    assert prompts.SAMPLING_DEFAULTS["speech"] == dict(TASKS["voice-chat"].sampling)


def test_voice_chat_with_input_audio_is_the_voice_chat_prompt(tok) -> None:
    call = _call({"messages": [{"role": "user", "content": [_audio_part()]}], "modalities": ["text", "audio"],
                  "audio": {"voice": "default", "format": "wav"}})
    assert call.audio == WAV
    assert call.request["generation"] == "speech" and call.request["speech_output"] == "stream"
    assert _ids(tok, call.request, WAV) == _ids(tok, {"task": "voice-chat"}, WAV)


def test_text_chat_with_history_is_the_chat_prompt(tok) -> None:
    history = [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    call = _call({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": [{"type": "text", "text": "How are you?"}]}]})
    want = _ids(tok, {"task": "chat", "history": history, "text": "How are you?"}, None)
    assert _ids(tok, call.request, None) == want


def test_tool_round_trip_rebuilds_the_exact_follow_up_prompt(tok) -> None:
    """The OpenAI form of the tool round trip (assistant tool_calls, then a `tool` message) gives the same prompt
    ids as the client library's session, which replays the model's own tokens."""
    from stepaudio2.text import WEB_SEARCH_TOOL

    audio = clip_path(CURRICULUM.tool_clip).read_bytes()
    b64 = base64.b64encode(audio).decode()
    first = _call({"messages": [{"role": "user", "content": [_audio_part(b64)]}], "tools": [WEB_SEARCH_TOOL],
                   "modalities": ["text", "audio"]})
    assert _ids(tok, first.request, audio) == _ids(tok, {"task": "voice-chat", "tools": [WEB_SEARCH_TOOL]}, audio)
    # What the server's result says for the first turn: the prompt messages and the replayed assistant turn.
    sp = tok.special
    markup = '<tool_call>function\nweb_search\n{"query": "weather in Paris today"}</tool_call>'
    reply_ids = [sp.tts_end, *tok.encode(markup)]
    req = request_from_json({"task": "voice-chat", "tools": [WEB_SEARCH_TOOL]}, audio)
    from stepaudio2.request import wire_messages
    from stepaudio2.text import assistant_turn_from_reply

    result = {"messages": wire_messages(build_prompt(tok, req).messages), "generation": "speech",
              "assistant_turn": assistant_turn_from_reply("speech", reply_ids, "", special=sp)}
    want = _ids(tok, tool_follow_up(result), audio)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "web_search", "arguments": json.dumps(dict(CURRICULUM.tool_call["arguments"]))}}
    second = _call({"messages": [
        {"role": "user", "content": [_audio_part(b64)]},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": CURRICULUM.tool_result},
    ], "tools": [WEB_SEARCH_TOOL], "modalities": ["text", "audio"]})
    assert _ids(tok, second.request, audio) == want


def test_replayed_audio_id_gives_the_exact_assistant_turn() -> None:
    turn = {"role": "assistant", "content": [{"type": "text", "text": "<tts_start>"}, {"type": "token_ids", "ids": [5]}]}
    params = parse_chat({"model": "step-audio-2-mini", "modalities": ["text", "audio"], "messages": [
        {"role": "user", "content": [_audio_part()]}, {"role": "assistant", "audio": {"id": "audio_x"}},
        {"role": "user", "content": "more"}]}, lambda v: True)
    call = pipeline_request(params, {"audio_x": turn}.get, 300.0)
    assert call.request["messages"][2] == turn
    with pytest.raises(APIError) as err:
        pipeline_request(params, lambda _id: None, 300.0)
    assert (err.value.status, err.value.param) == (400, "messages[1].audio.id")


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "gpt-4o"}, 404, "model"),
    ({"messages": []}, 400, "messages"),
    ({"temperature": 3}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"seed": -1}, 400, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"n": 2}, 400, "n"),
    ({"bogus": 1}, 400, "bogus"),
    ({"modalities": ["audio"]}, 400, "modalities"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy"}}, 400, "audio.voice"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "default", "format": "mp3"}}, 400, "audio.format"),
    ({"modalities": ["text", "audio"], "stream": True, "audio": {"format": "wav"}}, 400, "audio.format"),
    ({"tools": [{"type": "function"}]}, 400, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "wav"}}]}]},
     400, "messages[0].content[0].input_audio.data"),
    ({"messages": [{"role": "user", "content": [_audio_part("not base64!")]}]},
     400, "messages[0].content[0].input_audio.data"),
    ({"messages": [{"role": "user", "content": [_audio_part(base64.b64encode(b"hello, not audio").decode())]}]},
     400, "messages[0].content[0].input_audio.data"),
    ({"messages": [{"role": "user", "content": [_audio_part(), _audio_part()]}]}, 400, "messages[0].content[1]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0].type"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id"),
], ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else str(v))
def test_bad_bodies_name_the_field(body: dict, status: int, param: str) -> None:
    full = {"model": "step-audio-2-mini", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(APIError) as err:
        params = parse_chat(full, lambda v: v == "default")
        pipeline_request(params, lambda _id: None, 300.0)
    assert (err.value.status, err.value.param) == (status, param), err.value.message
    shape = err.value.body()["error"]
    assert set(shape) == {"message", "type", "param", "code"} and shape["message"]


def test_audio_longer_than_the_limit_is_refused() -> None:
    params = parse_chat({"model": "step-audio-2-mini", "messages": [{"role": "user", "content": [_audio_part()]}]},
                        lambda v: True)
    with pytest.raises(APIError) as err:
        pipeline_request(params, lambda _id: None, 0.5)
    assert err.value.code == "audio_too_long" and err.value.param == "messages[0].content[0].input_audio.data"


def test_serve_starts_the_gateway_by_default() -> None:
    from stepaudio2.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.gateway_port == 8080 and args.no_gateway is False
    assert build_parser().parse_args(["serve", "--no-gateway", "--gateway-port", "9090"]).no_gateway is True


def test_stop_string_split_across_deltas_is_caught_before_it_is_sent() -> None:
    import asyncio

    from stepaudio2_gateway.reply import Outcome, pieces

    async def events():
        for t in ["Hel", "lo, wo", "rld. ", "Bye"]:
            yield {"type": "text", "text": t, "in_speech": False}
        yield {"type": "result", "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 4}}

    async def run(stops):
        outcome = Outcome()
        return [p.text async for p in pieces(events(), stops, outcome)], outcome

    sent, outcome = asyncio.run(run(["world"]))
    assert "".join(sent) == "Hello, " and outcome.stopped and outcome.result is None
    sent, outcome = asyncio.run(run(["nowhere"]))
    assert "".join(sent) == "Hello, world. Bye" and not outcome.stopped and outcome.result["finish_reason"] == "stop"
