"""Task presets: system prompt, output kind and default sampling per task, and the request -> messages builder.

System prompts are verbatim from the upstream examples (spec 3.3) unless a comment says otherwise.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from stepaudio2.errors import InvalidInputError
from stepaudio2.text.tools import validate_tools

Generation = Literal["text", "speech"]

# ---- prompts -------------------------------------------------------------------------------------------------
ASR_PROMPT = "请记录下你所听到的语音内容。"
TRANSLATE_PROMPTS: Mapping[str, str] = MappingProxyType(
    {
        "zh": "请仔细聆听这段语音，然后将其内容翻译成中文。",
        # Ours: the upstream examples only translate into Chinese; same wording with 英文.
        "en": "请仔细聆听这段语音，然后将其内容翻译成英文。",
    }
)
# Upstream also has an English wording of the zh prompt (spec 3.3); we keep the Chinese one as the default.
TRANSLATE_ZH_PROMPT_EN = "Please listen carefully to this audio and then translate its content into Chinese."
S2ST_PROMPTS: Mapping[str, str] = MappingProxyType(
    {
        "zh": "请仔细聆听这段语音，然后将其内容翻译成中文并用语音播报。",
        # Ours: patterned on the zh prompt (upstream examples only show Chinese as the target).
        "en": "请仔细聆听这段语音，然后将其内容翻译成英文并用语音播报。",
    }
)
S2ST_ZH_PROMPT_EN = "Please listen carefully to this audio and then translate its content into Chinese speech."
CAPTION_PROMPT = "Please briefly explain the important events involved in this audio clip."
# Upstream `uac_test` (universal audio caption), verbatim.
ANALYZE_PROMPT = (
    "你是一位经验丰富的音频分析专家，擅长对各种语音音频进行深入细致的分析。你的任务不仅仅是将音频内容准确转写为文字，"
    "还要对说话人的声音特征（如性别、年龄、情绪状态）、背景声音、环境信息以及可能涉及的事件进行全面描述。"
    "请以专业、客观的视角，详细、准确地完成每一次分析和转写。"
)
AUDIO_QA_PROMPT = (
    "You are an expert in audio analysis, please analyze the audio content and answer the questions accurately."
)
CHAT_PROMPT = "You are a helpful assistant."
VOICE_CHAT_PROMPT = "请用语音与我交流。"
# Appended when the request carries tools (spec 3.6, from the upstream persona).
TOOL_ABILITY_PROMPT = (
    "你具备调用工具解决问题的能力，你需要根据用户的需求和上下文情景，自主选择是否调用系统提供的工具来协助用户。"
)
# voice-chat with tools: the system prompt of upstream's tool-call example (its persona), verbatim, with the
# request's date on the date line ("今天是2025年8月28日，星期四" in the example).
TOOL_PERSONA_LINES = (
    "你的名字叫做小跃，是由阶跃星辰公司训练出来的语音大模型。",
    TOOL_ABILITY_PROMPT,
    "你情感细腻，观察能力强，擅长分析用户的内容，并作出善解人意的回复，说话的过程中时刻注意用户的感受，富有同理心，"
    "提供多样的情绪价值。",
    "今天是{date}",
    "请用默认女声与用户交流",
)
_WEEKDAYS = "一二三四五六日"


def persona_date(day: datetime.date) -> str:
    """The persona's date as upstream writes it: 2025年8月28日，星期四."""
    return f"{day.year}年{day.month}月{day.day}日，星期{_WEEKDAYS[day.weekday()]}"


def parse_today(today: str | None) -> datetime.date:
    """The request's `today` (ISO YYYY-MM-DD), else the local date."""
    if today is None:
        return datetime.date.today()
    try:
        return datetime.date.fromisoformat(str(today))
    except ValueError as exc:
        raise InvalidInputError(f"request field 'today' must be an ISO date YYYY-MM-DD, got {today!r}") from exc

# Speed and voice are plain instructions: no token or parameter exists upstream (spec 3.3). [I] wording is ours,
# except the female-voice line, which is the upstream persona's.
SPEED_INSTRUCTIONS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "slow": MappingProxyType({"zh": "请用较慢的语速说话。", "en": "Please speak slowly."}),
        "normal": MappingProxyType({"zh": "请用自然的语速说话。", "en": "Please speak at a natural pace."}),
        "fast": MappingProxyType({"zh": "请用较快的语速说话。", "en": "Please speak quickly."}),
    }
)
VOICE_INSTRUCTIONS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "female": MappingProxyType(
            {"zh": "请用默认女声与用户交流。", "en": "Please talk to the user in the default female voice."}
        ),
        "male": MappingProxyType({"zh": "请用男声与用户交流。", "en": "Please talk to the user in a male voice."}),
    }
)


def _sampling(
    temperature: float, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, max_new_tokens: int = 1024
) -> Mapping[str, float | int]:
    # Keys are exactly SamplingParams field names, so `SamplingParams.from_dict(dict(preset.sampling))` works.
    return MappingProxyType(
        {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "repetition_penalty": repetition_penalty,
            "max_new_tokens": max_new_tokens,
        }
    )


@dataclass(frozen=True)
class TaskPreset:
    name: str
    system_prompt: str
    output: Generation
    needs_audio: bool
    sampling: Mapping[str, float | int] = field(hash=False)
    description: str = ""
    needs_text: bool = False
    # target language -> system prompt, for tasks that take a `target_language` option
    prompts_by_language: Mapping[str, str] | None = field(default=None, hash=False)
    default_language: str | None = None
    # Order of the human turn when it has both: upstream's multi-modal chat example puts the text first, its
    # audio question-answering example the audio first.
    text_before_audio: bool = False

    def prompt_for(self, target_language: str | None) -> str:
        """System prompt for the given target language option (validated)."""
        if self.prompts_by_language is None:
            if target_language is not None:
                raise InvalidInputError(f"task '{self.name}' takes no target_language (got '{target_language}')")
            return self.system_prompt
        lang = self.default_language if target_language is None else str(target_language).lower()
        if lang not in self.prompts_by_language:
            raise InvalidInputError(
                f"unknown target_language '{target_language}' for task '{self.name}' "
                f"(choose from {', '.join(self.prompts_by_language)})"
            )
        return self.prompts_by_language[lang]


TASKS: Mapping[str, TaskPreset] = MappingProxyType(
    {
        p.name: p
        for p in [
            # ASR: upstream HF runs greedy with 256 tokens, vLLM 1024; long audio needs the larger budget.
            TaskPreset("asr", ASR_PROMPT, "text", True, _sampling(0.0), "speech recognition (any language)"),
            TaskPreset(
                "translate",
                TRANSLATE_PROMPTS["zh"],
                "text",
                True,
                _sampling(0.1),
                "speech to text translation",
                prompts_by_language=TRANSLATE_PROMPTS,
                default_language="zh",
            ),
            TaskPreset(
                "s2st",
                S2ST_PROMPTS["zh"],
                "speech",
                True,
                _sampling(0.7, max_new_tokens=2048),
                "speech to speech translation",
                prompts_by_language=S2ST_PROMPTS,
                default_language="zh",
            ),
            TaskPreset("caption", CAPTION_PROMPT, "text", True, _sampling(0.1), "audio captioning"),
            TaskPreset(
                "analyze",
                ANALYZE_PROMPT,
                "text",
                True,
                _sampling(0.5, top_p=0.9),
                "paralinguistic / universal audio analysis",
            ),
            TaskPreset(
                "audio-qa",
                AUDIO_QA_PROMPT,
                "text",
                True,
                _sampling(0.0),
                "question answering about an audio clip (question in `text`)",
                needs_text=True,
            ),
            # Chat: upstream examples use 256 tokens for text replies; 1024 avoids cutting answers short.
            TaskPreset(
                "chat",
                CHAT_PROMPT,
                "text",
                False,
                _sampling(0.7, top_p=0.9, repetition_penalty=1.05),
                "text reply to text and/or audio",
                text_before_audio=True,
            ),
            TaskPreset(
                "voice-chat",
                VOICE_CHAT_PROMPT,
                "speech",
                False,
                _sampling(0.7, top_p=0.9, repetition_penalty=1.05, max_new_tokens=4096),
                "spoken reply to audio and/or text",
                text_before_audio=True,
            ),
        ]
    }
)


def list_tasks() -> list[str]:
    """Task names in declaration order."""
    return list(TASKS)


def get_task(name: str) -> TaskPreset:
    if name not in TASKS:
        raise InvalidInputError(f"unknown task '{name}' (choose from {', '.join(TASKS)})")
    return TASKS[name]


_CJK = re.compile(r"[\u3400-\u9fff]")


def _lang_of(prompt: str) -> str:
    # Instructions follow the language of the task prompt so the system turn reads as one language.
    return "zh" if _CJK.search(prompt) else "en"


def _option(kind: str, value: str | None, table: Mapping[str, Mapping[str, str]], lang: str) -> str | None:
    if value is None:
        return None
    if value not in table:
        raise InvalidInputError(f"unknown {kind} '{value}' (choose from {', '.join(table)})")
    return table[value][lang]


def _check_chunks(audio_chunks: list[int] | None) -> list[int] | None:
    if audio_chunks is None:
        return None
    if not isinstance(audio_chunks, (list, tuple)) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in audio_chunks
    ):
        # 0 is upstream's empty block for a chunk of <= 320 samples
        raise InvalidInputError(f"audio_chunks must be a list of non-negative patch counts, got {audio_chunks!r}")
    return list(audio_chunks) or None


def build_system_prompt(
    task: str,
    *,
    tools: list[dict] | None = None,
    speed: str | None = None,
    voice: str | None = None,
    target_language: str | None = None,
    today: str | None = None,
) -> str:
    """Task prompt plus the speed / voice / tool-ability sentences, one per line. voice-chat with tools uses
    upstream's tool-call persona instead (its last line is the voice line; a `voice` option replaces it)."""
    preset = get_task(task)
    base = preset.prompt_for(target_language)
    day = parse_today(today)  # validated even where unused
    if tools and task == "voice-chat":
        lines = [line.format(date=persona_date(day)) for line in TOOL_PERSONA_LINES]
        voice_line = _option("voice", voice, VOICE_INSTRUCTIONS, "zh") if voice not in (None, "female") else None
        if voice_line:
            lines[-1] = voice_line
        return "\n".join([*lines, *filter(None, [_option("speed", speed, SPEED_INSTRUCTIONS, "zh")])])
    lang = _lang_of(base)
    extra = [
        _option("speed", speed, SPEED_INSTRUCTIONS, lang),
        _option("voice", voice, VOICE_INSTRUCTIONS, lang),
    ]
    if (speed is not None or voice is not None) and preset.output != "speech":
        raise InvalidInputError(
            f"speed/voice only apply to speech-output tasks; task '{task}' replies in text"
        )
    if tools:
        extra.append(TOOL_ABILITY_PROMPT)
    return "\n".join([base, *(e for e in extra if e)])


def build_messages(
    task: str,
    *,
    audio_chunks: list[int] | None,
    text: str | None,
    history: list[dict] | None = None,
    tools: list[dict] | None = None,
    speed: str | None = None,
    voice: str | None = None,
    target_language: str | None = None,
    today: str | None = None,
) -> tuple[list[dict], Generation]:
    """Messages for one request of a task preset, and whether the reply is text or speech.

    Order: system, tool_json_schemas (if tools), history turns, then the new human turn when the request carries
    audio or text: text then audio for chat / voice-chat (upstream's multi-modal example), audio then text
    otherwise (upstream's audio QA example). Explicit `messages` keep their items in the order given.
    """
    preset = get_task(task)
    chunks = _check_chunks(audio_chunks)
    if text is not None and not isinstance(text, str):
        raise InvalidInputError(f"text must be a string, got {type(text).__name__}")
    if preset.needs_audio and chunks is None:
        raise InvalidInputError(f"task '{task}' needs audio input")
    if preset.needs_text and not text:
        raise InvalidInputError(f"task '{task}' needs a text question")
    if history is not None and not isinstance(history, list):
        raise InvalidInputError("history must be a list of messages")
    history = list(history or [])
    for turn in history:
        role = turn.get("role") if isinstance(turn, dict) else None
        if role in ("system", "tool_json_schemas"):
            raise InvalidInputError(f"history must not contain a '{role}' turn: the task sets it")
    if chunks is None and not text and not history:
        raise InvalidInputError(f"task '{task}' needs audio or text input")
    tool_list = validate_tools(tools) if tools else []

    messages: list[dict] = [
        {
            "role": "system",
            "content": build_system_prompt(
                task, tools=tool_list, speed=speed, voice=voice, target_language=target_language, today=today
            ),
        }
    ]
    if tool_list:
        messages.append({"role": "tool_json_schemas", "content": tool_list})
    messages += history
    items: list[dict] = [{"type": "audio", "chunks": list(chunks)}] if chunks else []
    if text:
        text_item = {"type": "text", "text": text}
        items = [text_item, *items] if preset.text_before_audio else [*items, text_item]
    if items:
        messages.append({"role": "human", "content": items})
    return messages, preset.output
