"""Build a small Qwen2-style tokenizer for tiny test checkpoints, locally and deterministically.

The base vocabulary is a byte-level BPE trained on an embedded corpus with Qwen2's pre-tokenisation. The added
tokens then follow in the real order with the real relative offsets: tiny id `base + (real_id - 151643)`.
Files written are the Qwen2 slow-tokenizer layout: vocab.json, merges.txt, added_tokens.json,
tokenizer_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from stepaudio2.errors import InvalidInputError
from stepaudio2.text import tasks as _tasks
from stepaudio2.text.tokenizer import qwen2_pre_tokenizer
from stepaudio2.text.tokens import (
    ENDOFTEXT,
    REAL_BASE_VOCAB_SIZE,
    REAL_MODEL_VOCAB_SIZE,
    real_added_tokens,
)

MODEL_MAX_LENGTH = 16384
MIN_BASE_VOCAB = 300  # 256 byte symbols plus a few merges
MAX_BASE_VOCAB = 8192

_ENGLISH = """\
Hello, how are you today? I am fine, thank you.
The quick brown fox jumps over the lazy dog.
Please listen carefully to this audio and answer the question.
What is the weather like in Shanghai tomorrow? It will be sunny with a light breeze.
She said that she'd rather walk home than take the bus, but it's raining.
We're going to the market; they've already left, and I'll join them later.
Speech recognition turns spoken words into written text.
A short sentence, a longer one with commas, and a question?
Numbers such as 3.14, 2025, 100% and $42.50 appear in text.
This is a test of the tokenizer. Tokens, merges and bytes.
The speaker sounds happy and calm; there is music in the background.
Translate the following sentence into Chinese, please.
You are a helpful assistant who answers briefly and politely.
Good morning! Good evening. Good night...
"""

_MANDARIN = """\
你好，今天天气怎么样？明天上海是晴天，有微风。
请记录下你所听到的语音内容。
我是一个语音助手，可以和你聊天，也可以回答问题。
这段音频里有一个男人在说话，背景有音乐和汽车的声音。
今天是星期五，我们一起去公园散步吧。
请用口语化形式总结检索结果，简短地回答用户的问题。
他说话的语速很快，情绪有点激动。
中文、英文和日文的语音翻译。
北京、上海、广州和深圳都是中国的大城市。
谢谢你的帮助！不客气。
"""

_STRUCTURED = """\
0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2025 3.14159 -7 +8 1e-6
{"type": "function", "function": {"name": "web_search", "description": "搜索工具", "parameters": {}}}
{"query": "上海天气", "count": 3, "ok": true, "none": null, "list": [1, 2, 3]}
[{"name": "a"}, {"name": "b"}] {} [] ": ", "," :: ;; () <> ... --- ___ ***
function
web_search
{"query": "weather in Beijing"}
"""

_SYLLABLES = "ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu " \
    "pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu za ze zi zo zu sh ch th an en in on un".split()


def _filler_lines(n_lines: int) -> list[str]:
    """Deterministic pseudo-words, so any base size up to MAX_BASE_VOCAB has enough distinct merges."""
    out = []
    k = len(_SYLLABLES)
    for i in range(n_lines):
        words = []
        for j in range(8):
            a = (i * 7 + j * 13) % k
            b = (i * 11 + j * 5 + 3) % k
            c = (i * 3 + j * 17 + 1) % k
            words.append(_SYLLABLES[a] + _SYLLABLES[b] + (_SYLLABLES[c] if (i + j) % 3 else ""))
        out.append(" ".join(words))
    return out


def corpus() -> list[str]:
    """The embedded training corpus, one line per item (weights by repetition)."""
    prompts = [p.system_prompt for p in _tasks.TASKS.values()]
    prompts += list(_tasks.TRANSLATE_PROMPTS.values()) + list(_tasks.S2ST_PROMPTS.values())
    prompts += [_tasks.TOOL_ABILITY_PROMPT, _tasks.TRANSLATE_ZH_PROMPT_EN, _tasks.S2ST_ZH_PROMPT_EN]
    prompts += [line["zh"] for line in _tasks.SPEED_INSTRUCTIONS.values()]
    prompts += [line["en"] for line in _tasks.SPEED_INSTRUCTIONS.values()]
    prompts += [line["zh"] for line in _tasks.VOICE_INSTRUCTIONS.values()]
    prompts += [line["en"] for line in _tasks.VOICE_INSTRUCTIONS.values()]
    roles = ["system\n", "human\n", "assistant\n", "tool_json_schemas\n", "input\n"]
    core = prompts * 4 + roles * 8 + (_ENGLISH.splitlines() + _MANDARIN.splitlines()) * 3
    core += _STRUCTURED.splitlines() * 3
    return core + _filler_lines(600)


def _train(base_vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = qwen2_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    if len(vocab) != base_vocab_size:
        raise InvalidInputError(
            f"base_vocab_size {base_vocab_size}: the embedded corpus only supports {len(vocab)} tokens"
        )
    return vocab, merges  # type: ignore[return-value]


def write_tokenizer_files(out_dir: Path, base_vocab_size: int = 1024, first_added_id: int | None = None) -> int:
    """Write vocab.json, merges.txt, added_tokens.json and tokenizer_config.json into `out_dir`.

    Returns the padded model vocabulary size (config.json `text_config.vocab_size`): the same padding past the
    added tokens as the real 158720. `first_added_id` (e.g. REAL_BASE_VOCAB_SIZE) puts the added tokens at
    their real ids after a gap of unused ids, so the model vocabulary is the real 158720.
    """
    if not MIN_BASE_VOCAB <= base_vocab_size <= MAX_BASE_VOCAB:
        raise InvalidInputError(
            f"base_vocab_size must be in [{MIN_BASE_VOCAB}, {MAX_BASE_VOCAB}], got {base_vocab_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train(base_vocab_size)

    first = base_vocab_size if first_added_id is None else first_added_id
    if first < base_vocab_size:
        raise InvalidInputError(f"first_added_id {first} overlaps the {base_vocab_size} base tokens")
    shift = first - REAL_BASE_VOCAB_SIZE
    added = [(rid + shift, content, special) for rid, content, special in real_added_tokens()]

    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (out / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (out / "added_tokens.json").write_text(
        json.dumps({content: tid for tid, content, _ in added}, ensure_ascii=False, indent=2) + "\n",
        encoding="utf-8",
    )
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tid): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for tid, content, special in added
        },
        "additional_special_tokens": [c for _, c, s in added if s and not c.startswith("<audio_")],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return first + (REAL_MODEL_VOCAB_SIZE - REAL_BASE_VOCAB_SIZE)
