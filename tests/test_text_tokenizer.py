"""Tokenizer files built by write_tokenizer_files: layout, special ids, round trips, incremental decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepaudio2.errors import CheckpointError
from stepaudio2.text import IncrementalDecoder, StepAudio2Tokenizer, write_tokenizer_files

BASE = 1024


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    assert write_tokenizer_files(d, base_vocab_size=BASE) == BASE + (158720 - 151643)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> StepAudio2Tokenizer:
    return StepAudio2Tokenizer.from_dir(tok_dir)


def test_files_have_the_qwen2_layout(tok_dir: Path) -> None:
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(BASE))
    merges = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == BASE - 256
    added = json.loads((tok_dir / "added_tokens.json").read_text(encoding="utf-8"))
    assert added["<|endoftext|>"] == BASE and added["<audio_6561>"] == BASE + 158257 - 151643
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["bos_token"] is None
    assert cfg["eos_token"] == cfg["pad_token"] == "<|endoftext|>" and cfg["model_max_length"] == 16384
    assert cfg["added_tokens_decoder"][str(BASE + 151665 - 151643)]["content"] == "<|EOT|>"
    assert len(cfg["added_tokens_decoder"]) == len(added)


def test_build_is_deterministic(tok_dir: Path, tmp_path: Path) -> None:
    write_tokenizer_files(tmp_path, base_vocab_size=BASE)
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_special_ids_keep_the_real_relative_offsets(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    real = {
        "endoftext": 151643,
        "eot": 151665,
        "bot": 151666,
        "audio_start": 151688,
        "audio_end": 151689,
        "audio_patch": 151690,
        "tts_pad": 151691,
        "tts_start": 151693,
        "tts_end": 151694,
        "audio_0": 151696,
        "audio_pad": 158257,
        "tool_call_start": 151657,
        "tool_call_end": 151658,
    }
    for name, rid in real.items():
        assert getattr(sp, name) - sp.endoftext == rid - 151643, name
    assert sp.endoftext == BASE
    assert tok.token_to_id("<audio_0>") == sp.audio_0 and tok.token_to_id("<audio_6561>") == sp.audio_pad
    assert tok.token_to_id("<think>") == BASE + 151667 - 151643
    assert tok.vocab_size == BASE + 158258 - 151643
    assert sp.num_audio_codes == 6561


def test_special_helpers(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    assert sp.is_text(sp.eot) and sp.is_text(sp.tool_call_start) and not sp.is_text(sp.audio_start)
    assert sp.is_audio(sp.audio_0) and sp.is_audio(sp.audio_pad) and not sp.is_audio(sp.tts_end)
    assert sp.is_control(sp.tts_pad) and sp.is_control(sp.audio_patch) and not sp.is_control(sp.audio_0)
    assert sp.code(sp.audio_0 + 123) == 123 and sp.code_id(123) == sp.audio_0 + 123
    assert sp.code(sp.audio_pad) == 6561
    assert sp.end_ids >= {sp.eot, sp.endoftext}


@pytest.mark.parametrize(
    "text",
    [
        "Hello, how are you today? It's 2025.",
        "你好，今天天气怎么样？明天上海是晴天。",
        "emoji 😀👍🏽 and a family 👨‍👩‍👧 ok",
        "  lots   of\n\n spaces\tand tabs ",
        "",
    ],
)
def test_round_trip(tok: StepAudio2Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i < tok.special.endoftext for i in ids)  # plain text uses base tokens only


def test_added_tokens_inside_text_are_single_ids(tok: StepAudio2Tokenizer) -> None:
    sp = tok.special
    ids = tok.encode("<|BOT|>human\nhi<|EOT|><audio_start><audio_patch><audio_end><audio_12><tts_start>")
    assert ids[0] == sp.bot
    assert ids[-6:] == [sp.eot, sp.audio_start, sp.audio_patch, sp.audio_end, sp.audio_0 + 12, sp.tts_start]
    assert tok.decode(ids) == "<|BOT|>human\nhi<|EOT|><audio_start><audio_patch><audio_end><audio_12><tts_start>"
    # Not an added token: stays ordinary text.
    assert sp.audio_0 not in tok.encode("<audio_0 >")


def test_segmented_encoding_matches_joined_across_newlines(tok: StepAudio2Tokenizer) -> None:
    # Qwen pre-tokenisation splits at newlines, so header + content tokenise like the joined string.
    assert tok.encode("<|BOT|>human\n") + tok.encode("hello there") == tok.encode("<|BOT|>human\nhello there")


def test_incremental_decoder_holds_back_split_character(tok: StepAudio2Tokenizer) -> None:
    text = "A😀中"
    ids = tok.encode(text)
    assert any(_broken_utf8(tok.token_bytes(i)) for i in ids)  # the tiny vocab splits these characters
    dec = IncrementalDecoder(tok)
    deltas = [dec.feed(i) for i in ids]
    assert "".join(deltas) + dec.flush() == text
    assert "\ufffd" not in "".join(deltas)
    # Feed the raw bytes of the emoji one byte-token at a time: nothing comes out until the 4th byte.
    emoji = "😀".encode()
    byte_ids = [_byte_token(tok, b) for b in emoji]
    dec = IncrementalDecoder(tok)
    outs = [dec.feed(i) for i in byte_ids]
    assert outs[:3] == ["", "", ""] and outs[3] == "😀"
    assert not dec.pending


def test_incremental_decoder_flushes_an_unfinished_character(tok: StepAudio2Tokenizer) -> None:
    dec = IncrementalDecoder(tok)
    assert dec.feed(_byte_token(tok, 0xE4)) == ""
    assert dec.pending
    assert dec.flush() == "\ufffd"
    assert tok.decode([_byte_token(tok, 0xE4)]) == "\ufffd"


def _broken_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _byte_token(tok: StepAudio2Tokenizer, b: int) -> int:
    """Id of the base token that is exactly byte `b`."""
    for i in range(tok.base_vocab_size):
        if tok.token_bytes(i) == bytes([b]):
            return i
    raise AssertionError(f"no single-byte token for {b:#x}")


def test_missing_files_and_tokens_raise_checkpoint_errors(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="vocab.json"):
        StepAudio2Tokenizer.from_dir(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    added = json.loads((tok_dir / "added_tokens.json").read_text(encoding="utf-8"))
    del added["<tts_start>"]
    (tmp_path / "added_tokens.json").write_text(json.dumps(added), encoding="utf-8")
    with pytest.raises(CheckpointError, match="<tts_start>"):
        StepAudio2Tokenizer.from_dir(tmp_path)
