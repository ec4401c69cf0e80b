"""Step-Audio-2 tokenizer: Qwen2 byte-level BPE plus StepFun's added tokens, without transformers.

Loads vocab.json + merges.txt + added_tokens.json (+ tokenizer_config.json), the files of the real checkpoint
and of our tiny ones. Added tokens inside text are matched first (leftmost-longest, like HF), the rest goes
through the `tokenizers` BPE with Qwen2 pre-tokenisation. Every special id is resolved by name at load time.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from stepaudio2.errors import CheckpointError, InvalidInputError
from stepaudio2.text import tokens as T

# Qwen2's pre-tokenisation split (single digits, no prefix space); byte-level mapping comes after it.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onward."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the pipeline needs, looked up by name in the tokenizer files."""

    endoftext: int
    eot: int
    bot: int
    audio_start: int
    audio_end: int
    audio_patch: int
    tts_start: int
    tts_end: int
    tts_pad: int
    audio_0: int  # first audio code token, `<audio_0>`
    audio_pad: int  # `<audio_6561>`, the ta4 pad code
    tool_call_start: int
    tool_call_end: int
    im_end: int | None = None
    think_start: int | None = None
    think_end: int | None = None
    num_audio_codes: int = T.NUM_AUDIO_CODES

    def is_text(self, token_id: int) -> bool:
        """Text (and turn-control) ids come before `<audio_start>` (spec 1.7)."""
        return token_id < self.audio_start

    def is_audio(self, token_id: int) -> bool:
        """Audio code ids, pad code included."""
        return self.audio_0 <= token_id <= self.audio_pad

    def is_control(self, token_id: int) -> bool:
        """`<audio_start>` .. the last id before `<audio_0>`: dropped from both output streams."""
        return self.audio_start <= token_id < self.audio_0

    def code(self, token_id: int) -> int:
        """Speech code of an audio id (6561 for the pad)."""
        if not self.is_audio(token_id):
            raise InvalidInputError(f"token id {token_id} is not an audio code token")
        return token_id - self.audio_0

    def code_id(self, code: int) -> int:
        """Token id of speech code `code` (0..6561)."""
        if not 0 <= code <= self.num_audio_codes:
            raise InvalidInputError(f"speech code {code} is outside 0..{self.num_audio_codes}")
        return self.audio_0 + code

    @property
    def end_ids(self) -> frozenset[int]:
        """Ids that end a reply: EOT, and the other eos ids config.json lists (endoftext, im_end)."""
        return frozenset(i for i in (self.eot, self.endoftext, self.im_end) if i is not None)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read tokenizer file {path}: {exc}") from exc


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"{path}:{n}: a merge must be two symbols separated by one space: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class StepAudio2Tokenizer:
    """Encode/decode text with the checkpoint's tokenizer; `special` holds the resolved control ids."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added_tokens: dict[str, int]) -> None:
        self._vocab = dict(vocab)
        self.added_tokens: dict[str, int] = dict(sorted(added_tokens.items(), key=lambda kv: kv[1]))
        self._id_to_token: dict[int, str] = {i: t for t, i in self._vocab.items()}
        for content, tid in self.added_tokens.items():
            other = self._id_to_token.get(tid)
            if other is not None and other != content and other not in self.added_tokens:
                raise CheckpointError(f"added token {content!r} reuses id {tid} of base token {other!r}")
            self._id_to_token[tid] = content
        self._token_to_id = {**self._vocab, **self.added_tokens}
        self.vocab_size: int = max(self._id_to_token) + 1

        try:
            bpe = models.BPE(vocab=self._vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
        except Exception as exc:  # the Rust side raises a plain Exception on inconsistent vocab/merges
            raise CheckpointError(f"vocab and merges do not form a BPE model: {exc}") from exc
        self._bpe = Tokenizer(bpe)
        self._bpe.normalizer = normalizers.NFC()
        self._bpe.pre_tokenizer = qwen2_pre_tokenizer()
        # Added-token matcher: first char -> candidate lengths, longest first (leftmost-longest like HF).
        self._added_lengths: dict[str, list[int]] = {}
        for content in self.added_tokens:
            self._added_lengths.setdefault(content[0], []).append(len(content))
        for key, lens in self._added_lengths.items():
            self._added_lengths[key] = sorted(set(lens), reverse=True)
        self._bytes_cache: dict[int, bytes] = {}
        self.special = self._resolve_special()

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> StepAudio2Tokenizer:
        """Load from a checkpoint directory (vocab.json + merges.txt, or tokenizer.json as a fallback)."""
        d = Path(path)
        if not d.is_dir():
            raise CheckpointError(f"tokenizer directory {d} does not exist")
        added: dict[str, int] = {}
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            vocab = _read_json(d / "vocab.json")
            if not isinstance(vocab, dict):
                raise CheckpointError(f"{d / 'vocab.json'} is not a token -> id map")
            merges = _read_merges(d / "merges.txt")
        elif (d / "tokenizer.json").is_file():
            raw = _read_json(d / "tokenizer.json")
            model = raw.get("model", {}) if isinstance(raw, dict) else {}
            if model.get("type") != "BPE":
                raise CheckpointError(f"{d / 'tokenizer.json'} is not a BPE tokenizer")
            vocab = model["vocab"]
            merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
            added.update({t["content"]: int(t["id"]) for t in raw.get("added_tokens", [])})
        else:
            raise CheckpointError(f"no tokenizer in {d}: expected vocab.json and merges.txt (or tokenizer.json)")
        if (d / "added_tokens.json").is_file():
            extra = _read_json(d / "added_tokens.json")
            if not isinstance(extra, dict):
                raise CheckpointError(f"{d / 'added_tokens.json'} is not a token -> id map")
            added.update({str(k): int(v) for k, v in extra.items()})
        if (d / "tokenizer_config.json").is_file():
            cfg = _read_json(d / "tokenizer_config.json")
            decoder = cfg.get("added_tokens_decoder", {}) if isinstance(cfg, dict) else {}
            for sid, entry in decoder.items():
                content, tid = entry["content"], int(sid)
                if added.get(content, tid) != tid:
                    raise CheckpointError(
                        f"added token {content!r} has id {added[content]} in added_tokens.json "
                        f"but {tid} in tokenizer_config.json"
                    )
                added[content] = tid
        # Base-vocab entries that are also listed as added keep their id; drop them from the added map.
        added = {c: i for c, i in added.items() if vocab.get(c) != i}
        if not added:
            raise CheckpointError(f"no added tokens found in {d} (added_tokens.json or tokenizer_config.json)")
        return cls(vocab, merges, added)

    def _resolve_special(self) -> SpecialIds:
        def need(name: str) -> int:
            tid = self.added_tokens.get(name)
            if tid is None:
                raise CheckpointError(f"tokenizer lacks the required special token {name}")
            return tid

        ids = SpecialIds(
            endoftext=need(T.ENDOFTEXT),
            eot=need(T.EOT),
            bot=need(T.BOT),
            audio_start=need(T.AUDIO_START),
            audio_end=need(T.AUDIO_END),
            audio_patch=need(T.AUDIO_PATCH),
            tts_start=need(T.TTS_START),
            tts_end=need(T.TTS_END),
            tts_pad=need(T.TTS_PAD),
            audio_0=need(T.audio_token(0)),
            audio_pad=need(T.audio_token(T.AUDIO_PAD_CODE)),
            tool_call_start=need(T.TOOL_CALL_START),
            tool_call_end=need(T.TOOL_CALL_END),
            im_end=self.added_tokens.get(T.IM_END),
            think_start=self.added_tokens.get(T.THINK_START),
            think_end=self.added_tokens.get(T.THINK_END),
        )
        # The code <-> id arithmetic relies on contiguous `<audio_k>` ids; check it once here.
        for k in range(T.NUM_AUDIO_CODES + 1):
            if self.added_tokens.get(T.audio_token(k)) != ids.audio_0 + k:
                raise CheckpointError(
                    f"audio token {T.audio_token(k)} is not at <audio_0> + {k} = {ids.audio_0 + k}"
                )
        if not (ids.eot < ids.audio_start and ids.tts_start < ids.audio_0 and ids.tts_end < ids.audio_0):
            raise CheckpointError("special token ids are not in the expected order (text < control < audio)")
        return ids

    # ---- lookups ------------------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._id_to_token.get(token_id)

    @property
    def base_vocab_size(self) -> int:
        return len(self._vocab)

    # ---- encode -------------------------------------------------------------------------------------------
    def _split_added(self, text: str) -> list[str | int]:
        """Text pieces and added-token ids, in order."""
        out: list[str | int] = []
        start = i = 0
        n = len(text)
        while i < n:
            lens = self._added_lengths.get(text[i])
            if lens:
                for length in lens:
                    tid = self.added_tokens.get(text[i : i + length]) if i + length <= n else None
                    if tid is not None:
                        if start < i:
                            out.append(text[start:i])
                        out.append(tid)
                        i += length
                        start = i
                        break
                else:
                    i += 1
            else:
                i += 1
        if start < n:
            out.append(text[start:])
        return out

    @staticmethod
    def _check_text(text: object) -> None:
        if not isinstance(text, str):
            raise InvalidInputError(f"can only tokenise a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800") would fail deep in the BPE
            raise InvalidInputError(f"text is not valid Unicode at position {exc.start} (lone surrogate)") from None

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with every added token written inside it treated as plain text, never as a
        control id. For user and tool text: only the prompt builder may emit control tokens."""
        self._check_text(text)
        return list(self._bpe.encode(text, add_special_tokens=False).ids) if text else []

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens written inside it become single ids. No BOS/EOS is added."""
        self._check_text(text)
        pieces = self._split_added(text)
        texts = [p for p in pieces if isinstance(p, str)]
        encoded = iter(self._bpe.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        ids: list[int] = []
        for p in pieces:
            if isinstance(p, int):
                ids.append(p)
            else:
                ids.extend(next(encoded).ids)
        return ids

    # ---- decode -------------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for (b'' for ids the tokenizer does not know, as HF does)."""
        b = self._bytes_cache.get(token_id)
        if b is None:
            tok = self._id_to_token.get(int(token_id))
            if tok is None:
                b = b""
            elif tok in self.added_tokens:
                b = tok.encode("utf-8")
            else:
                table = _unicode_to_byte()
                b = b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in tok)
            self._bytes_cache[token_id] = b
        return b

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; added tokens are kept as their strings, broken UTF-8 becomes U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


class IncrementalDecoder:
    """Streams text deltas from token ids, holding back an incomplete UTF-8 sequence until it completes.

    The concatenation of all deltas plus `flush()` equals `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: StepAudio2Tokenizer) -> None:
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids: int | Iterable[int]) -> str:
        ids = list(token_ids) if isinstance(token_ids, Iterable) else [int(token_ids)]
        return self._dec.decode(b"".join(self._tok.token_bytes(i) for i in ids), final=False)

    def flush(self) -> str:
        """End of stream: pending bytes of an unfinished character come out as U+FFFD."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._dec.getstate()[0])
