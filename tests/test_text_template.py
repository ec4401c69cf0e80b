"""Chat template and task presets: exact prompt strings, token ids, audio spans, bad input."""

from __future__ import annotations

import pytest

from stepaudio2.errors import InvalidInputError
from stepaudio2.text import (
    TASKS,
    WEB_SEARCH_TOOL,
    StepAudio2Tokenizer,
    assistant_turn_from_reply,
    build_messages,
    encode_prompt,
    list_tasks,
    render_prompt,
    tool_result_turn,
)

A2 = "<audio_start><audio_patch><audio_patch><audio_end>"

EXPECTED = {
    "asr": (
        "<|BOT|>system\n请记录下你所听到的语音内容。<|EOT|>"
        f"<|BOT|>human\n{A2}<|EOT|><|BOT|>assistant\n"
    ),
    "translate": (
        "<|BOT|>system\n请仔细聆听这段语音，然后将其内容翻译成中文。<|EOT|>"
        f"<|BOT|>human\n{A2}<|EOT|><|BOT|>assistant\n"
    ),
    "s2st": (
        "<|BOT|>system\n请仔细聆听这段语音，然后将其内容翻译成中文并用语音播报。<|EOT|>"
        f"<|BOT|>human\n{A2}<|EOT|><|BOT|>assistant\n<tts_start>"
    ),
    "caption": (
        "<|BOT|>system\nPlease briefly explain the important events involved in this audio clip.<|EOT|>"
        f"<|BOT|>human\n{A2}<|EOT|><|BOT|>assistant\n"
    ),
    "analyze": (
        "<|BOT|>system\n你是一位经验丰富的音频分析专家，擅长对各种语音音频进行深入细致的分析。你的任务不仅仅是将音频内容准确转写为文字，"
        "还要对说话人的声音特征（如性别、年龄、情绪状态）、背景声音、环境信息以及可能涉及的事件进行全面描述。"
        f"请以专业、客观的视角，详细、准确地完成每一次分析和转写。<|EOT|><|BOT|>human\n{A2}<|EOT|><|BOT|>assistant\n"
    ),
    "audio-qa": (
        "<|BOT|>system\nYou are an expert in audio analysis, please analyze the audio content and answer the "
        f"questions accurately.<|EOT|><|BOT|>human\n{A2}Which animal is heard?<|EOT|><|BOT|>assistant\n"
    ),
    "chat": (
        "<|BOT|>system\nYou are a helpful assistant.<|EOT|>"
        "<|BOT|>human\nWhich animal is heard?<|EOT|><|BOT|>assistant\n"
    ),
    "voice-chat": (
        f"<|BOT|>system\n请用语音与我交流。<|EOT|><|BOT|>human\n{A2}<|EOT|><|BOT|>assistant\n<tts_start>"
    ),
}

INPUTS = {
    "audio-qa": ([2], "Which animal is heard?"),
    "chat": (None, "Which animal is heard?"),
}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_each_preset_renders_exactly(task: str, tok: StepAudio2Tokenizer) -> None:
    chunks, text = INPUTS.get(task, ([2], None))
    messages, generation = build_messages(task, audio_chunks=chunks, text=text)
    assert generation == TASKS[task].output
    prompt = render_prompt(messages, generation=generation)
    assert prompt == EXPECTED[task]
    # Encoding the segments separately equals encoding the rendered string here (newline boundaries).
    assert encode_prompt(tok, messages, generation=generation).ids == tok.encode(prompt)


def test_every_task_has_an_expected_string() -> None:
    assert set(list_tasks()) == set(EXPECTED)
    assert TASKS["voice-chat"].output == "speech" and TASKS["chat"].output == "text"
    assert set(TASKS["asr"].sampling) == {"temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"}


def test_target_language_speed_voice_and_tools() -> None:
    messages, generation = build_messages(
        "s2st", audio_chunks=[1], text=None, target_language="en", speed="slow", voice="male"
    )
    assert generation == "speech"
    assert render_prompt(messages, generation=generation) == (
        "<|BOT|>system\n请仔细聆听这段语音，然后将其内容翻译成英文并用语音播报。\n请用较慢的语速说话。\n"
        "请用男声与用户交流。<|EOT|><|BOT|>human\n<audio_start><audio_patch><audio_end><|EOT|>"
        "<|BOT|>assistant\n<tts_start>"
    )
    messages, generation = build_messages(
        "voice-chat", audio_chunks=None, text="今天天气怎么样？", tools=[WEB_SEARCH_TOOL], voice="female",
        today="2025-08-28",
    )
    # Upstream's tool-call example: its persona as the system prompt, its `search` schema.
    schema = (
        '[{"type": "function", "function": {"name": "search", "description": "搜索工具", "parameters": '
        '{"type": "object", "properties": {"query": {"type": "string", "description": "搜索关键词"}}, '
        '"required": ["query"], "additionalProperties": false}}}]'
    )
    assert render_prompt(messages, generation=generation) == (
        "<|BOT|>system\n你的名字叫做小跃，是由阶跃星辰公司训练出来的语音大模型。\n"
        "你具备调用工具解决问题的能力，你需要根据用户的需求和上下文情景，自主选择是否调用系统提供的工具来协助用户。\n"
        "你情感细腻，观察能力强，擅长分析用户的内容，并作出善解人意的回复，说话的过程中时刻注意用户的感受，富有同理心，"
        "提供多样的情绪价值。\n今天是2025年8月28日，星期四\n请用默认女声与用户交流"
        f"<|EOT|><|BOT|>tool_json_schemas\n{schema}<|EOT|>"
        "<|BOT|>human\n今天天气怎么样？<|EOT|><|BOT|>assistant\n<tts_start>"
    )


def test_encode_prompt_audio_spans(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [
            {"type": "audio", "chunks": [3, 2]},
            {"type": "text", "text": "and"},
            {"type": "audio", "chunks": [4]},
        ]},
    ]
    p = encode_prompt(tok, messages, generation="speech")
    assert [n for _, n in p.audio_spans] == [3, 2, 4]
    for start, n in p.audio_spans:
        assert p.ids[start - 1] == sp.audio_start and p.ids[start + n] == sp.audio_end
        assert p.ids[start : start + n] == [sp.audio_patch] * n
    assert p.ids.count(sp.audio_patch) == 9
    assert p.ids[-1] == sp.tts_start and p.ids[-2] != sp.eot
    assert render_prompt(messages, generation="speech") == (
        "<|BOT|>system\nS<|EOT|><|BOT|>human\n<audio_start><audio_patch><audio_patch><audio_patch><audio_end>"
        "<audio_start><audio_patch><audio_patch><audio_end>and<audio_start><audio_patch><audio_patch>"
        "<audio_patch><audio_patch><audio_end><|EOT|><|BOT|>assistant\n<tts_start>"
    )


def test_history_replays_speech_ids_and_tool_results(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    reply = [*tok.encode("Hi"), sp.audio_0 + 5, sp.audio_0 + 6, sp.audio_0 + 7, sp.audio_pad, sp.tts_end, sp.eot]
    turn = assistant_turn_from_reply("speech", reply, "", special=sp)
    assert turn["content"][1]["ids"] == reply[:-1]
    history = [{"role": "human", "content": "hello"}, turn, tool_result_turn("result")]
    messages, generation = build_messages("voice-chat", audio_chunks=None, text=None, history=history)
    p = encode_prompt(tok, messages, generation=generation)
    i = p.ids.index(sp.audio_0 + 5)
    assert p.ids[i - len(tok.encode("Hi")) - 1] == sp.tts_start
    assert p.ids[i + 4 : i + 6] == [sp.tts_end, sp.eot]
    assert render_prompt(messages, generation=generation, tokenizer=tok) == (
        "<|BOT|>system\n请用语音与我交流。<|EOT|><|BOT|>human\nhello<|EOT|>"
        "<|BOT|>assistant\n<tts_start>Hi<audio_5><audio_6><audio_7><audio_6561><tts_end><|EOT|>"
        "<|BOT|>input\nresult\n\n\n请用口语化形式总结检索结果，简短地回答用户的问题。<|EOT|>"
        "<|BOT|>assistant\n<tts_start>"
    )
    text_turn = assistant_turn_from_reply("text", [1, 2], "plain answer")
    assert text_turn == {"role": "assistant", "content": "plain answer"}


def test_openai_tool_calls_in_history_are_written_as_markup() -> None:
    messages = [
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "web_search", "arguments": '{"query": "上海"}'}}]},
        {"role": "tool", "content": "晴"},
    ]
    assert render_prompt(messages, generation="text") == (
        '<|BOT|>assistant\n<tool_call>function\nweb_search\n{"query": "上海"}</tool_call><|EOT|>'
        "<|BOT|>input\n晴<|EOT|><|BOT|>assistant\n"
    )


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: render_prompt([{"role": "robot", "content": "hi"}], generation="text"), "robot"),
        (lambda: render_prompt([{"role": "user", "content": [{"type": "video"}]}], generation=None), "video"),
        (lambda: render_prompt([{"role": "user", "content": [{"type": "audio", "chunks": [-1]}]}],
                               generation=None), "patch count"),
        (lambda: render_prompt([{"role": "user", "content": "x"}], generation="song"), "song"),
        (lambda: build_messages("dance", audio_chunks=[1], text=None), "dance"),
        (lambda: build_messages("voice-chat", audio_chunks=[1], text=None, speed="warp"), "warp"),
        (lambda: build_messages("voice-chat", audio_chunks=[1], text=None, voice="robot"), "robot"),
        (lambda: build_messages("chat", audio_chunks=None, text="hi", speed="slow"), "speech-output"),
        (lambda: build_messages("asr", audio_chunks=None, text="hi"), "needs audio"),
        (lambda: build_messages("translate", audio_chunks=[1], text=None, target_language="fr"), "fr"),
        (lambda: build_messages("asr", audio_chunks=[1], text=None, target_language="en"), "target_language"),
        (lambda: build_messages("chat", audio_chunks=None, text=None), "audio or text"),
        (lambda: build_messages("chat", audio_chunks=None, text="x", tools=[{"name": "f"}]), "tool #0"),
    ],
)
def test_bad_input_names_the_problem(call, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        call()


def test_encode_prompt_rejects_unknown_role(tok: StepAudio2Tokenizer) -> None:
    with pytest.raises(InvalidInputError, match="'wizard'"):
        encode_prompt(tok, [{"role": "wizard", "content": "x"}], generation="text")


def test_render_token_ids_needs_tokenizer() -> None:
    with pytest.raises(InvalidInputError, match="tokenizer"):
        render_prompt([{"role": "assistant", "content": [{"type": "token_ids", "ids": [1]}]}], generation=None)


def test_system_prompt_unchanged_for_normal_defaults() -> None:
    messages, _ = build_messages("translate", audio_chunks=[1], text=None, target_language="en")
    assert messages[0]["content"] == "请仔细聆听这段语音，然后将其内容翻译成英文。"
    messages, _ = build_messages("voice-chat", audio_chunks=[1], text=None, speed="normal")
    assert messages[0]["content"] == "请用语音与我交流。\n请用自然的语速说话。"
