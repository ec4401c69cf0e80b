"""Issue 14 items 5, 6, 7: our presets build the prompt ids of upstream's examples.

Upstream's chat template (stepaudio2.py, reimplemented here): each message is `<|BOT|>{role}\\n` + content +
`<|EOT|>`; string content is one segment with its header and EOT, list content is a header segment, one segment
per text item, one `<audio_start>` + patches + `<audio_end>` segment per 25 s chunk, then `<|EOT|>`; every segment
is tokenised on its own and the ids concatenated. The assistant opener is `<|BOT|>assistant\\n` (+ `<tts_start>`
for speech). The vLLM template adds tools as `<|BOT|>tool_json_schemas\\n{json}<|EOT|>` after the system turn.
The system prompts below are the upstream examples' text (examples.py / examples-vllm.py / stepaudio2.py).
"""

from __future__ import annotations

import json

import pytest

from stepaudio2.request import GenerationRequest, build_prompt
from stepaudio2.text import WEB_SEARCH_TOOL, tool_result_turn
from stepaudio2.text.template import encode_prompt

AUDIO = [13]  # patch counts of the example clip's chunks (any clip: only the count matters here)

UPSTREAM = {
    "asr": "请记录下你所听到的语音内容。",
    "translate": "请仔细聆听这段语音，然后将其内容翻译成中文。",
    "caption": "Please briefly explain the important events involved in this audio clip.",
    "s2st": "请仔细聆听这段语音，然后将其内容翻译成中文并用语音播报。",
    "voice-chat": "请用语音与我交流。",
    "audio-qa": "You are an expert in audio analysis, please analyze the audio content and answer the questions "
                "accurately.",
    "analyze": "你是一位经验丰富的音频分析专家，擅长对各种语音音频进行深入细致的分析。你的任务不仅仅是将音频内容准确转写为文字，"
               "还要对说话人的声音特征（如性别、年龄、情绪状态）、背景声音、环境信息以及可能涉及的事件进行全面描述。"
               "请以专业、客观的视角，详细、准确地完成每一次分析和转写。",
    "chat": "You are a helpful assistant.",
}
PERSONA = ("你的名字叫做小跃，是由阶跃星辰公司训练出来的语音大模型。\n你具备调用工具解决问题的能力，你需要根据用户的需求和上下文情景，"
           "自主选择是否调用系统提供的工具来协助用户。\n你情感细腻，观察能力强，擅长分析用户的内容，并作出善解人意的回复，"
           "说话的过程中时刻注意用户的感受，富有同理心，提供多样的情绪价值。\n今天是2025年8月28日，星期四\n请用默认女声与用户交流")
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "description": "搜索工具", "parameters": {
    "type": "object", "properties": {"query": {"type": "string", "description": "搜索关键词"}}, "required": ["query"],
    "additionalProperties": False}}}
QUESTION = "Which of the following best describes the male vocal in the audio?"


def upstream_ids(tok, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    segments: list[str] = []
    for n, msg in enumerate(messages):
        role, content = msg["role"], msg["content"]
        if isinstance(content, str):
            segments.append(f"<|BOT|>{role}\n{content}" + ("<|EOT|>" if msg.get("eot", True) else ""))
        elif content is None:
            segments.append(f"<|BOT|>{role}\n")
        else:
            segments.append(f"<|BOT|>{role}\n")
            for item in content:
                if item["type"] == "text":
                    segments.append(item["text"])
                else:
                    segments += ["<audio_start>" + "<audio_patch>" * c + "<audio_end>" for c in item["chunks"]]
            segments.append("<|EOT|>")
        if n == 0 and tools:
            segments.append(f"<|BOT|>tool_json_schemas\n{json.dumps(tools, ensure_ascii=False)}<|EOT|>")
    return [i for s in segments for i in tok.encode(s)]


def _audio() -> dict:
    return {"type": "audio", "chunks": AUDIO}


def _ours(tok, **fields) -> list[int]:
    from stepaudio2.text import build_messages, encode_prompt

    messages, generation = build_messages(fields.pop("task"), audio_chunks=fields.pop("audio", None), **fields)
    return encode_prompt(tok, messages, generation=generation).ids


SPEECH = {"role": "assistant", "content": "<tts_start>", "eot": False}
TEXT = {"role": "assistant", "content": None}


@pytest.mark.parametrize("task", ["asr", "translate", "caption", "analyze", "s2st", "voice-chat"])
def test_audio_presets_equal_upstream_examples(tok, task: str) -> None:
    reply = SPEECH if task in ("s2st", "voice-chat") else TEXT
    expect = upstream_ids(tok, [{"role": "system", "content": UPSTREAM[task]},
                                {"role": "human", "content": [_audio()]}, reply])
    assert _ours(tok, task=task, audio=AUDIO, text=None) == expect


def test_audio_qa_puts_audio_then_question(tok) -> None:  # upstream mmau example
    expect = upstream_ids(tok, [{"role": "system", "content": UPSTREAM["audio-qa"]},
                                {"role": "human", "content": [_audio(), {"type": "text", "text": QUESTION}]}, TEXT])
    assert _ours(tok, task="audio-qa", audio=AUDIO, text=QUESTION) == expect


@pytest.mark.parametrize(("task", "reply"), [("chat", TEXT), ("voice-chat", SPEECH)])
def test_chat_with_text_and_audio_puts_text_first(tok, task: str, reply: dict) -> None:
    # Upstream's multi-modal example: [text, audio] in one human turn (item 5).
    text = "Translate the speech into Chinese."
    expect = upstream_ids(tok, [{"role": "system", "content": UPSTREAM[task]},
                                {"role": "human", "content": [{"type": "text", "text": text}, _audio()]}, reply])
    assert _ours(tok, task=task, audio=AUDIO, text=text) == expect


def test_explicit_messages_keep_their_item_order(tok) -> None:
    for items in ([{"type": "text", "text": "first"}, {"type": "audio"}],
                  [{"type": "audio"}, {"type": "text", "text": "first"}]):
        import numpy as np

        from stepaudio2.request import AudioInput

        request = GenerationRequest(messages=[{"role": "human", "content": items}], task=None,
                                    audio=AudioInput(np.full(16000, 0.1, np.float32), 16000))
        prompt = build_prompt(tok, request)
        filled = [{"type": "audio", "chunks": [13]} if i["type"] == "audio" else i for i in items]
        assert prompt.ids == upstream_ids(tok, [{"role": "human", "content": filled}, TEXT])


def test_tool_call_prompt_and_result_equal_upstream(tok) -> None:
    assert WEB_SEARCH_TOOL == SEARCH_TOOL  # the default web-search tool is upstream's `search`, exactly
    first = [{"role": "system", "content": PERSONA}, {"role": "human", "content": [_audio()]}]
    expect = upstream_ids(tok, [*first, SPEECH], tools=[SEARCH_TOOL])
    ours = _ours(tok, task="voice-chat", audio=AUDIO, text=None, tools=[WEB_SEARCH_TOOL], today="2025-08-28")
    assert ours == expect
    # The tool result goes back as two text items, each tokenised on its own (upstream's tool_call_test).
    result = "上证指数今日开盘3800.12点。"
    instruction = "\n\n\n请用口语化形式总结检索结果，简短地回答用户的问题。"
    turn = tool_result_turn(result)
    assert turn == {"role": "input", "content": [{"type": "text", "text": result},
                                                 {"type": "text", "text": instruction}]}
    call = {"role": "assistant", "content": '<tool_call>function\nsearch\n{"query": "上证指数开盘价"}</tool_call>'}
    ours_ids = encode_prompt(tok, [call, turn], generation="speech").ids
    assert ours_ids == upstream_ids(tok, [call, turn, SPEECH])
