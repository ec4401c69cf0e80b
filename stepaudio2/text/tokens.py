"""Names of the added tokens and their place in the real Step-Audio-2-mini vocabulary (spec 3.1).

Runtime code resolves every id *by name* from the tokenizer files (spec 3.1 rule); the real ids below only
serve the tiny-tokenizer builder, which reproduces the real relative offsets after a small base vocabulary.
"""

from __future__ import annotations

# Token strings. These are the names the checkpoint files use.
ENDOFTEXT = "<|endoftext|>"
IM_END = "<|im_end|>"
EOT = "<|EOT|>"
BOT = "<|BOT|>"
THINK_START = "<think>"
THINK_END = "</think>"
AUDIO_START = "<audio_start>"
AUDIO_END = "<audio_end>"
AUDIO_PATCH = "<audio_patch>"
TTS_PAD = "<tts_pad>"
TTS_START = "<tts_start>"
TTS_END = "<tts_end>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# 6561 = 3^8 speech codes (CosyVoice2 S3 v2); `<audio_6561>` is the pad code of the ta4 layout.
NUM_AUDIO_CODES = 6561
AUDIO_PAD_CODE = NUM_AUDIO_CODES


def audio_token(code: int) -> str:
    """Name of the token that carries speech code `code` (0..6561, 6561 being the pad)."""
    return f"<audio_{code}>"


# ---- real layout ---------------------------------------------------------------------------------------------
REAL_BASE_VOCAB_SIZE = 151643  # Qwen2 BPE tokens 0..151642; added tokens start here
REAL_MODEL_VOCAB_SIZE = 158720  # rows of embed_tokens / lm_head (config text_config.vocab_size)

# Qwen2.5 added tokens 151643..151664; `special` follows Qwen2.5's tokenizer_config (tool-call and FIM
# markers are not "special" there, so skip_special_tokens keeps them).
_QWEN_ADDED: list[tuple[str, bool]] = [
    (ENDOFTEXT, True),
    ("<|im_start|>", True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    (TOOL_CALL_START, False),  # 151657
    (TOOL_CALL_END, False),  # 151658
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]


def real_added_tokens() -> list[tuple[int, str, bool]]:
    """(real id, content, special) for every added token of the real tokenizer, in id order.

    Confirmed ids (spec 3.1): 151643 endoftext, 151665 EOT, 151688 audio_start, 151690 audio_patch,
    151693/151694 tts_start/tts_end, 151696 + k for `<audio_k>`. Our own choices, not confirmed upstream:
    BOT at 151666, think tags at 151667/151668, tts_pad at 151691, audio_end at 151689 and the names of the
    `<|reserved_N|>` fillers (151669..151687, 151692, 151695). Code never depends on these ids: it looks every
    token up by name in the files, so the real checkpoint's own map wins.
    """
    out: list[tuple[int, str, bool]] = []
    rid = REAL_BASE_VOCAB_SIZE
    for content, special in _QWEN_ADDED:
        out.append((rid, content, special))
        rid += 1
    assert rid == 151665
    reserved = iter(range(1000))

    def filler() -> str:
        return f"<|reserved_{next(reserved)}|>"

    out += [(151665, EOT, True), (151666, BOT, True), (151667, THINK_START, False), (151668, THINK_END, False)]
    out += [(i, filler(), True) for i in range(151669, 151688)]
    out += [
        (151688, AUDIO_START, True),
        (151689, AUDIO_END, True),
        (151690, AUDIO_PATCH, True),
        (151691, TTS_PAD, True),
        (151692, filler(), True),
        (151693, TTS_START, True),
        (151694, TTS_END, True),
        (151695, filler(), True),
    ]
    out += [(151696 + k, audio_token(k), True) for k in range(NUM_AUDIO_CODES + 1)]
    assert out[-1][0] == 158257
    return out
