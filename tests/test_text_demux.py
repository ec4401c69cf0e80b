"""Output demultiplexer and tool-call parsing on crafted id streams, whole and token by token."""

from __future__ import annotations

import pytest

from stepaudio2.text import (
    AudioCodes,
    EndOfTurn,
    OutputDemuxer,
    StepAudio2Tokenizer,
    StreamingToolCallParser,
    TextDelta,
    ToolCallEvent,
    demux_all,
    parse_tool_calls,
    tool_schemas_json,
)


def _ta4(tok: StepAudio2Tokenizer, text: str, codes: list[int]) -> list[int]:
    """Interleave [1 text, 4 audio] groups with tts_pad / audio pad fillers, like the model does."""
    sp = tok.special
    t_ids = tok.encode(text)
    out: list[int] = []
    n_groups = max(len(t_ids), -(-len(codes) // 4))
    for g in range(n_groups):
        out.append(t_ids[g] if g < len(t_ids) else sp.tts_pad)
        for k in range(4):
            j = g * 4 + k
            out.append(sp.code_id(codes[j]) if j < len(codes) else sp.audio_pad)
    return out


def _stream(tok: StepAudio2Tokenizer, ids: list[int], speech: bool):
    demux = OutputDemuxer(tok.special, tok, speech=speech)
    events = []
    for i in ids:
        events += demux.feed(i)
    events += demux.finish()
    return events, demux.result()


def _check_same(tok: StepAudio2Tokenizer, ids: list[int], speech: bool):
    events, streamed = _stream(tok, ids, speech)
    whole = demux_all(tok, ids, speech=speech)
    assert streamed == whole
    # Events carry exactly the result.
    assert "".join(e.text for e in events if isinstance(e, TextDelta) and not e.in_speech) == whole.text
    assert "".join(e.text for e in events if isinstance(e, TextDelta) and e.in_speech) == whole.tts_text
    assert [c for e in events if isinstance(e, AudioCodes) for c in e.codes] == whole.audio_codes
    assert [e.call for e in events if isinstance(e, ToolCallEvent)] == whole.tool_calls
    return events, whole


def test_ta4_speech_reply_with_pads(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    text = "你好，世界😀"
    codes = list(range(100, 137))  # 37 codes: more groups than some texts, fewer than others
    ids = _ta4(tok, text, codes) + [sp.tts_end, sp.eot, *tok.encode("ignored")]
    assert sp.tts_pad in ids or sp.audio_pad in ids
    events, res = _check_same(tok, ids, speech=True)
    assert res.tts_text == text and res.text == ""
    assert res.audio_codes == codes
    assert res.finished and isinstance(events[-1], EndOfTurn)
    assert res.token_ids == ids[: ids.index(sp.eot) + 1]
    assert all(e.in_speech for e in events if isinstance(e, TextDelta))
    # No replacement characters from split multi-byte characters.
    assert "\ufffd" not in "".join(e.text for e in events if isinstance(e, TextDelta))


def test_tool_call_after_tts_end(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    call = '<tool_call>function\nweb_search\n{"query": "上海天气"}</tool_call>'
    ids = _ta4(tok, "我查一下。", [1, 2, 3, 4, 5, 6]) + [sp.tts_end] + tok.encode(call) + [sp.eot]
    assert sp.tool_call_start in ids  # the tag is one added token
    events, res = _check_same(tok, ids, speech=True)
    assert res.tts_text == "我查一下。" and res.text == ""
    assert len(res.tool_calls) == 1
    tc = res.tool_calls[0]
    assert tc.name == "web_search" and tc.arguments == {"query": "上海天气"} and tc.error is None
    assert tc.raw == call
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("ToolCallEvent") < kinds.index("EndOfTurn")


def test_text_reply_with_text_around_two_calls(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    body = (
        'Let me check <tool_call>function\nweb_search\n{"query": "a"}</tool_call>'
        '<tool_call>function\nlookup\n{"id": 3, "deep": true}</tool_call> done.'
    )
    ids = tok.encode(body) + [sp.eot]
    _, res = _check_same(tok, ids, speech=False)
    assert res.text == "Let me check  done."
    assert [(c.name, c.arguments) for c in res.tool_calls] == [("web_search", {"query": "a"}),
                                                               ("lookup", {"id": 3, "deep": True})]
    assert parse_tool_calls(body) == (res.text, res.tool_calls)


def test_control_ids_never_reach_text(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    controls = [sp.audio_start, sp.audio_end, sp.audio_patch, sp.tts_pad, sp.audio_start + 4, sp.audio_0 - 1]
    ids = [*tok.encode("ok"), *controls, sp.audio_pad + 5, *tok.encode(" fine")]
    _, res = _check_same(tok, ids, speech=False)
    assert res.text == "ok fine" and res.audio_codes == [] and not res.finished


def test_text_mode_can_enter_speech_and_plain_text_follows(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    ids = [*tok.encode("Sure. "), sp.tts_start, *_ta4(tok, "hi", [7]), sp.tts_end, *tok.encode("bye"), sp.eot]
    _, res = _check_same(tok, ids, speech=False)
    assert (res.text, res.tts_text, res.audio_codes) == ("Sure. bye", "hi", [7])


def test_multibyte_character_split_across_audio_tokens(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    # Byte tokens of 😀 each followed by 4 audio tokens: the character arrives whole, once.
    emoji_ids = [i for b in "😀".encode() for i in range(tok.base_vocab_size) if tok.token_bytes(i) == bytes([b])]
    ids = []
    for k, t in enumerate(emoji_ids):
        ids += [t, *(sp.code_id(4 * k + j) for j in range(4))]
    events, res = _check_same(tok, ids + [sp.tts_end, sp.eot], speech=True)
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert deltas == ["😀"] and res.audio_codes == list(range(16))


def test_unfinished_reply_flushes_on_finish(tok: StepAudio2Tokenizer) -> None:
    ids = tok.encode("partial <tool_call>function\nf\n{")
    demux = OutputDemuxer(tok.special, tok, speech=False)
    for i in ids:
        demux.feed(i)
    assert demux.result().text == "partial "  # the open call is withheld
    demux.finish()
    res = demux.result()
    assert res.text == "partial <tool_call>function\nf\n{" and res.tool_calls == [] and not res.finished


@pytest.mark.parametrize(
    "text",
    [
        "no calls at all < not a tag <tool",
        'a<tool_call>function\nf\n{"x": [1, 2]}</tool_call>b<tool_call>function\ng\n{}</tool_call>c',
        "x <tool_call>function\nbroken\n{not json</tool_call> y",
        "open <tool_call>function\nf\n{",
        'hermes <tool_call>\n{"name": "h", "arguments": {"k": "v"}}\n</tool_call>',
    ],
)
def test_streaming_parser_matches_whole_parse_for_every_split(text: str) -> None:
    whole = parse_tool_calls(text)
    for size in (1, 2, 3, 5, 7, len(text) or 1):
        parser = StreamingToolCallParser()
        out, calls = [], []
        for k in range(0, len(text), size):
            t, c = parser.feed(text[k : k + size])
            out.append(t)
            calls += c
        t, c = parser.flush()
        assert ("".join(out) + t, calls + c) == whole, size


def test_parser_withholds_only_a_possible_tag_prefix() -> None:
    p = StreamingToolCallParser()
    assert p.feed("hello <tool") == ("hello ", [])
    assert p.feed("box>") == ("<toolbox>", [])
    assert p.feed("a < b") == ("a < b", [])
    assert p.feed(" <") == (" ", [])
    assert p.flush() == ("<", [])


def test_malformed_arguments_keep_the_call() -> None:
    content, calls = parse_tool_calls("<tool_call>function\nbroken\n{not json</tool_call>")
    assert content == "" and calls[0].name == "broken" and calls[0].arguments == {}
    assert "JSON" in calls[0].error
    _, calls = parse_tool_calls('<tool_call>function\nlist\n[1, 2]</tool_call>')
    assert calls[0].arguments == {} and "object" in calls[0].error
    _, calls = parse_tool_calls("<tool_call>function\nnoargs</tool_call>")
    assert calls[0].name == "noargs" and calls[0].arguments == {} and calls[0].error is None
    _, calls = parse_tool_calls('<tool_call>{"name": "h", "arguments": {"k": 1}}</tool_call>')
    assert (calls[0].name, calls[0].arguments) == ("h", {"k": 1})


def test_tool_schemas_json_keeps_unicode_and_default_separators() -> None:
    tools = [{"type": "function", "function": {"name": "search", "description": "搜索工具", "parameters": {}}}]
    assert tool_schemas_json(tools) == (
        '[{"type": "function", "function": {"name": "search", "description": "搜索工具", "parameters": {}}}]'
    )
