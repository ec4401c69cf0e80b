"""A taught tiny checkpoint: the random tiny checkpoint, fitted to a small scripted curriculum.

A random model never says anything on purpose, so transcripts, spoken replies in the TA4 layout and tool calls
could not be asserted through the real engines. This module fits the tiny encoder + adaptor + LLM (torch, CPU,
fixed seed) until greedy decoding reproduces every reply of the curriculum exactly:

- `asr` on each shipped clip -> its transcript (the clip's .txt);
- `translate` (into English) on the Mandarin clip -> a fixed translation;
- `voice-chat` on one clip -> a spoken reply: `<tts_start>`, groups of 1 text + 4 audio tokens (padded with
  `<tts_pad>` / `<audio_6561>`), `<tts_end>`, `<|EOT|>`;
- `voice-chat` with the web-search tool (upstream's `search` schema) on a question that needs fresh facts -> `<tts_end>` then a tool call
  in the real markup; after the tool result comes back as an `input` turn -> a spoken answer.

Prompts come from the project's own prompt builder (`stepaudio2.request.build_prompt`) on the same requests a
client sends, so the server sees exactly the prompts the model was taught. The result is written by the tiny
maker's own shard writer (bf16 safetensors, same layout and names); loading code does not know it was taught.
Builds are cached by a hash of their inputs (`ensure_taught_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from stepaudio2.errors import StepAudio2Error

ASSETS = Path(__file__).resolve().parents[1] / "stepaudio2" / "assets"
if not ASSETS.is_dir():  # installed (non-editable): the assets travel inside the stepaudio2 package
    import stepaudio2

    ASSETS = Path(stepaudio2.__file__).parent / "assets"

DEFAULT_SEED = 0
BASE_PRESET = "tiny"  # the tiny dims memorise the curriculum; no larger preset is needed
TAUGHT_INFO = "taught.json"  # build record beside the weights (ignored by the loaders)


class TaughtBuildError(StepAudio2Error):
    """The fitted model does not reproduce its curriculum (before or after the bf16 round trip)."""


# ---- the curriculum (data: tests and the demo assert against it) ---------------------------------------------


def _codes(start: int, count: int) -> tuple[int, ...]:
    # Distinct, scattered speech codes (397 is coprime with 6561 = 3^8), fixed independently of the seed.
    return tuple((17 + 397 * k) % 6561 for k in range(start, start + count))


@dataclass(frozen=True)
class SpokenReply:
    text: str  # transcript of the speech (tts_text)
    codes: tuple[int, ...]  # speech codes (audio_codes)


@dataclass(frozen=True)
class Curriculum:
    transcripts: Mapping[str, str] = field(hash=False)  # clip stem -> transcript
    translation_clip: str
    translation_language: str
    translation: str
    voice_chat_clip: str
    voice_reply: SpokenReply
    tool_clip: str
    tool_call: Mapping[str, Any] = field(hash=False)  # {"name", "arguments"}, as results carry it
    search_hit: Mapping[str, str] = field(hash=False)  # the one search record ({"title", "snippet", "url"})
    tool_result: str  # the tool's output for it, as the client's WebSearchTool formats it (the `input` turn)
    spoken_answer: SpokenReply

    def to_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    """JSON-able copy (read-only mappings become dicts, replies become {"text", "codes"})."""
    if isinstance(value, SpokenReply):
        return {"text": value.text, "codes": list(value.codes)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _transcripts() -> Mapping[str, str]:
    stems = sorted(p.stem for p in ASSETS.glob("*.wav") if p.with_suffix(".txt").is_file())
    return MappingProxyType({s: (ASSETS / f"{s}.txt").read_text(encoding="utf-8").strip() for s in stems})


CURRICULUM = Curriculum(
    transcripts=_transcripts(),
    translation_clip="nihao_zh",
    translation_language="en",
    translation="Hello, how is the weather today?",
    voice_chat_clip="hello_en",
    # Code counts: more groups than text tokens (<tts_pad> fill) and not a multiple of 4 (<audio_6561> fill).
    voice_reply=SpokenReply("I am fine, thank you.", _codes(0, 58)),
    tool_clip="weather_en",
    tool_call=MappingProxyType({"name": "search", "arguments": {"query": "weather in Paris today"}}),
    search_hit=MappingProxyType(
        {"title": "Paris weather", "snippet": "sunny, 22 degrees, light wind.", "url": "https://weather.example/paris"}
    ),
    tool_result="Paris weather: sunny, 22 degrees, light wind. (https://weather.example/paris)",
    spoken_answer=SpokenReply("It is sunny in Paris today.", _codes(58, 78)),
)


def clip_path(stem: str) -> Path:
    return ASSETS / f"{stem}.wav"


@dataclass(frozen=True)
class Lesson:
    """One first-turn request (wire form, as a client sends it) on one clip, and the reply it must get."""

    name: str
    request: dict[str, Any]
    clip: str
    expect: dict[str, Any]  # result fields: text, tts_text, audio_codes, tool_calls


def lessons(c: Curriculum = CURRICULUM) -> list[Lesson]:
    """The first-turn lessons. The tool answer is a follow-up turn: see `tool_follow_up`."""
    from stepaudio2.text import WEB_SEARCH_TOOL

    out = [
        Lesson(f"asr-{clip}", {"task": "asr"}, clip, {"text": text, "tts_text": "", "audio_codes": [], "tool_calls": []})
        for clip, text in c.transcripts.items()
    ]
    out.append(Lesson(
        f"translate-{c.translation_clip}",
        {"task": "translate", "target_language": c.translation_language},
        c.translation_clip,
        {"text": c.translation, "tts_text": "", "audio_codes": [], "tool_calls": []},
    ))
    out.append(Lesson(
        f"voice-chat-{c.voice_chat_clip}", {"task": "voice-chat"}, c.voice_chat_clip,
        {"text": "", "tts_text": c.voice_reply.text, "audio_codes": list(c.voice_reply.codes), "tool_calls": []},
    ))
    out.append(Lesson(
        # The persona's date line is pinned (upstream example's date) so the lesson's prompt never changes.
        f"tool-call-{c.tool_clip}", {"task": "voice-chat", "tools": [WEB_SEARCH_TOOL], "today": "2025-08-28"},
        c.tool_clip,
        {"text": "", "tts_text": "", "audio_codes": [], "tool_calls": [_plain(c.tool_call)]},
    ))
    return out


def tool_follow_up(first_result: Mapping[str, Any], c: Curriculum = CURRICULUM) -> dict[str, Any]:
    """The request a client session sends after running the tool: the conversation so far (the result's
    `messages` + `assistant_turn`) plus an `input` turn with the tool result, speech generation."""
    from stepaudio2.text import tool_result_turn

    messages = [*first_result["messages"], first_result["assistant_turn"], tool_result_turn(c.tool_result)]
    return {"messages": messages, "generation": first_result["generation"]}


def tool_answer_expect(c: Curriculum = CURRICULUM) -> dict[str, Any]:
    a = c.spoken_answer
    return {"text": "", "tts_text": a.text, "audio_codes": list(a.codes), "tool_calls": []}


# ---- targets ---------------------------------------------------------------------------------------------------


def ta4_ids(tok: Any, reply: SpokenReply) -> list[int]:
    """The reply after the prompt's `<tts_start>`: 1 text + 4 audio tokens per group, pads, `<tts_end>`."""
    sp = tok.special
    text = tok.encode(reply.text)
    audio = [sp.audio_0 + c for c in reply.codes]
    groups = max(len(text), -(-len(audio) // 4))
    ids: list[int] = []
    for g in range(groups):
        ids.append(text[g] if g < len(text) else sp.tts_pad)
        slot = audio[4 * g : 4 * g + 4]
        ids += slot + [sp.audio_pad] * (4 - len(slot))
    return ids + [sp.tts_end]


def _target_ids(tok: Any, lesson: Lesson, c: Curriculum) -> list[int]:
    from stepaudio2.text import render_tool_call

    sp = tok.special
    if lesson.request["task"] == "voice-chat" and lesson.request.get("tools"):
        call = c.tool_call
        return [sp.tts_end, *tok.encode(render_tool_call(call["name"], dict(call["arguments"]))), sp.eot]
    if lesson.request["task"] == "voice-chat":
        return [*ta4_ids(tok, c.voice_reply), sp.eot]
    return [*tok.encode(lesson.expect["text"]), sp.eot]


@dataclass
class Example:
    name: str
    request: Any  # GenerationRequest
    prompt: Any  # stepaudio2.request.Prompt
    target: list[int]


def _first_result(tok: Any, prompt: Any, target: list[int]) -> dict[str, Any]:
    """What the pipeline returns for `target` (the fields a session carries on), without running a model."""
    from stepaudio2.request import wire_messages
    from stepaudio2.text import assistant_turn_from_reply

    turn = assistant_turn_from_reply(prompt.generation, target, "", special=tok.special)
    return {"messages": wire_messages(prompt.messages), "assistant_turn": turn, "generation": prompt.generation}


def examples(tok: Any, c: Curriculum = CURRICULUM) -> list[Example]:
    """Every (request, prompt ids, reply ids) the model is taught, tool follow-up included."""
    from stepaudio2.request import build_prompt, request_from_json

    out: list[Example] = []
    for lesson in lessons(c):
        audio = clip_path(lesson.clip).read_bytes()
        req = request_from_json(json.loads(json.dumps(lesson.request)), audio)
        prompt = build_prompt(tok, req)
        target = _target_ids(tok, lesson, c)
        out.append(Example(lesson.name, req, prompt, target))
        if lesson.request.get("tools"):
            # JSON round trip: the follow-up is exactly what a client re-sends over the wire.
            wire = json.loads(json.dumps(tool_follow_up(_first_result(tok, prompt, target), c)))
            req2 = request_from_json(wire, audio)
            out.append(Example(f"tool-answer-{lesson.clip}", req2, build_prompt(tok, req2),
                               [*ta4_ids(tok, c.spoken_answer), tok.special.eot]))
    return out


# ---- fitting ---------------------------------------------------------------------------------------------------

LR = 6e-3
MAX_STEPS = 600
CHECK_EVERY = 10
MARGIN = 4.0  # logit gap of every target token over the runner-up, in fp32 ...
BF16_MARGIN = 2.0  # ... and after rounding the weights to bf16 (what is stored)


@dataclass
class FitReport:
    steps: int
    seconds: float
    loss: float
    min_margin: float
    min_margin_bf16: float


@dataclass
class _Row:
    """One training sequence: a host example, plus the replies of examples whose prompt + reply is a prefix of
    it (the tool call is a prefix of the tool follow-up), so shared tokens are computed once."""

    host: Example
    labels: list[tuple[int, list[int]]]  # (prompt length, reply ids)

    @property
    def ids(self) -> list[int]:
        return self.host.prompt.ids + self.host.target[:-1]  # the last reply token is only predicted


def _contains(host: Example, guest: Example) -> bool:
    import numpy as np

    full, part = host.prompt.ids + host.target, guest.prompt.ids + guest.target
    return (
        len(full) > len(part) and full[: len(part)] == part
        and host.prompt.audio_spans == guest.prompt.audio_spans
        and all(np.array_equal(a, b) for a, b in zip(host.prompt.mels, guest.prompt.mels, strict=True))
    )


def _rows(exs: list[Example]) -> list[_Row]:
    rows: dict[int, _Row] = {}
    for i, e in enumerate(exs):
        host = next((j for j, h in enumerate(exs) if j != i and _contains(h, e)), i)
        rows.setdefault(host, _Row(exs[host], []))
    for i, e in enumerate(exs):
        host = next((j for j, h in enumerate(exs) if j != i and _contains(h, e)), i)
        rows[host].labels.append((len(e.prompt.ids), e.target))
    return list(rows.values())


class _Bucket:
    """Right-padded rows of similar length. Causal attention: right padding never reaches real positions."""

    def __init__(self, rows: list[_Row], pad_id: int) -> None:
        import numpy as np
        import torch

        from stepaudio2.audio import pad_mels

        length = max(len(r.ids) for r in rows)
        self.ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            self.ids[i, : len(r.ids)] = torch.tensor(r.ids)
            for p, tgt in r.labels:
                labels[i, p - 1 : p - 1 + len(tgt)] = torch.tensor(tgt)
        self.positions = torch.arange(length)[None].expand(len(rows), length)
        self.mask = labels >= 0
        self.targets = labels[self.mask]
        # One encoder batch over every audio chunk of the bucket; each chunk keeps its own request's batch
        # length (mel_frames), so it encodes exactly as at inference (the encoder is batch-invariant).
        self.owner = [(i, span) for i, r in enumerate(rows) for span in r.host.prompt.audio_spans]
        batch, _ = pad_mels([m for r in rows for m in r.host.prompt.mels])
        self.mels = torch.from_numpy(batch)
        self.mel_lengths = torch.as_tensor(np.array([n for r in rows for n in r.host.prompt.mel_lengths]))
        self.mel_frames = torch.as_tensor(
            np.array([max(m.shape[1] for m in r.host.prompt.mels) for r in rows for _ in r.host.prompt.mels])
        )

    def logits(self, model: Any) -> Any:
        """Logits at the reply positions only: the vocabulary projection would dominate the cost otherwise."""
        import torch

        emb, n = model.encode_audio(self.mels, self.mel_lengths, self.mel_frames)
        rows = list(model.model.embed_tokens(self.ids).unbind(0))
        for k, (i, (start, count)) in enumerate(self.owner):
            if int(n[k]) != count:
                raise TaughtBuildError(f"encoder gives {int(n[k])} embeddings for a block of {count} placeholders")
            rows[i] = torch.cat([rows[i][:start], emb[k, :count], rows[i][start + count :]])
        out = model.model(inputs_embeds=torch.stack(rows), position_ids=self.positions, use_cache=False)
        return model.lm_head(out.last_hidden_state[self.mask])


def _buckets(exs: list[Example], pad_id: int) -> list[_Bucket]:
    """Rows sorted by length, a new bucket whenever a row is under half the bucket's longest (little padding)."""
    groups: list[list[_Row]] = []
    for row in sorted(_rows(exs), key=lambda r: -len(r.ids)):
        if groups and 2 * len(row.ids) >= len(groups[-1][0].ids):
            groups[-1].append(row)
        else:
            groups.append([row])
    return [_Bucket(g, pad_id) for g in groups]


def _loss_and_margin(model: Any, buckets: list[_Bucket]) -> tuple[Any, float]:
    """Mean cross-entropy over every reply token, and the smallest lead of a target logit over the runner-up."""
    import torch

    total, count, margin = 0.0, 0, float("inf")
    for b in buckets:
        logits = b.logits(model)
        total = total + torch.nn.functional.cross_entropy(logits, b.targets, reduction="sum")
        count += int(b.targets.numel())
        with torch.no_grad():
            tgt = b.targets[:, None]
            lead = logits.gather(1, tgt)[:, 0] - logits.scatter(1, tgt, float("-inf")).max(1).values
            margin = min(margin, float(lead.min()))
    return total / count, margin


def _bf16_margin(model: Any, buckets: list[_Bucket]) -> float:
    import copy

    import torch

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        return _loss_and_margin(rounded, buckets)[1]


def fit(model: Any, exs: list[Example], pad_id: int, seed: int, max_steps: int = MAX_STEPS) -> FitReport:
    """Teacher-forced cross-entropy on the reply tokens (full batch, AdamW) until every target token leads by
    MARGIN in fp32 and BF16_MARGIN with bf16 weights, or `max_steps` (the caller verifies what it got)."""
    import torch

    threads = torch.get_num_threads()
    # One thread: these matrices are too small to gain from two, a shared CPU makes OpenMP barriers stall, and
    # the float reduction order (hence the bytes written) no longer depends on the core count.
    torch.set_num_threads(1)
    try:
        return _fit(model, exs, pad_id, seed, max_steps)
    finally:
        torch.set_num_threads(threads)


def _fit(model: Any, exs: list[Example], pad_id: int, seed: int, max_steps: int) -> FitReport:
    import torch

    torch.manual_seed(seed)
    buckets = _buckets(exs, pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    loss_v, margin16, step = float("nan"), float("-inf"), 0
    while True:
        loss, margin = _loss_and_margin(model, buckets)
        loss_v = float(loss.detach())
        if step % CHECK_EVERY == 0 and margin >= MARGIN:
            margin16 = _bf16_margin(model, buckets)
            if margin16 >= BF16_MARGIN:
                break
        if step >= max_steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    model.eval()
    return FitReport(step, time.perf_counter() - t0, loss_v, margin, margin16)


# ---- build, verify ---------------------------------------------------------------------------------------------


def verify_checkpoint(checkpoint: str | Path, c: Curriculum = CURRICULUM) -> list[str]:
    """Greedy decoding of every taught request on the checkpoint as stored (bf16 on disk, strict loading, the
    reference pipeline); returns one line per reply that differs from its target (empty: all exact)."""
    from stepaudio2.pipeline import ReferencePipeline

    pipe = ReferencePipeline(checkpoint)
    problems = []
    for ex in examples(pipe.tokenizer, c):
        got = pipe.generate(ex.request).token_ids
        if got != ex.target:
            problems.append(f"{ex.name}: expected {ex.target}, got {got}")
    return problems


def build_taught_checkpoint(
    out_dir: str | Path,
    seed: int = DEFAULT_SEED,
    max_steps: int = MAX_STEPS,
    verify: bool = True,
    with_token2wav: bool = True,
) -> Path:
    """Write the taught checkpoint into `out_dir`: the random tiny checkpoint of `seed` (same files, same
    token2wav/), its encoder + adaptor + LLM fitted to the curriculum, stored by the tiny maker's shard writer.

    verify=True reloads what was written and raises TaughtBuildError unless greedy decoding reproduces every
    reply exactly. verify=False with a small `max_steps` is for cheap reproducibility checks (and
    with_token2wav=False skips the random token2wav/, as in the tiny maker).
    """
    from stepaudio2.export.tiny import PRESETS, _write_shards, make_tiny_checkpoint
    from stepaudio2.models.step_audio2 import load_model
    from stepaudio2.text import StepAudio2Tokenizer

    t0 = time.perf_counter()
    out = make_tiny_checkpoint(out_dir, seed=seed, preset=BASE_PRESET, with_token2wav=with_token2wav)
    model = load_model(out)
    tok = StepAudio2Tokenizer.from_dir(out)
    report = fit(model, examples(tok), tok.special.endoftext, seed, max_steps)
    _write_shards(model.state_dict(), out, PRESETS[BASE_PRESET].num_shards)
    if verify:
        problems = verify_checkpoint(out)
        if problems:
            raise TaughtBuildError(
                f"taught checkpoint (seed {seed}, {report.steps} steps, margin {report.min_margin:.2f} fp32 / "
                f"{report.min_margin_bf16:.2f} bf16) does not reproduce its curriculum:\n" + "\n".join(problems)
            )
    info = {
        "seed": seed, "base_preset": BASE_PRESET, "max_steps": max_steps, "steps": report.steps, "loss": report.loss,
        "min_margin": report.min_margin, "min_margin_bf16": report.min_margin_bf16, "verified": verify,
        "fit_seconds": round(report.seconds, 2), "build_seconds": round(time.perf_counter() - t0, 2),
        "curriculum": CURRICULUM.to_json(),
    }
    (out / TAUGHT_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return out


# ---- cache -----------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
# Everything the written files depend on: this module and the tiny maker, the model code, the prompt side
# (text protocol, request builder, audio front end: they make the training prompts), and the token2wav code
# whose tiny writer fills token2wav/.
_CODE_PATHS = ("export/taught.py", "export/tiny.py", "stepaudio2/models", "stepaudio2/text", "stepaudio2/audio",
               "stepaudio2/request.py", "stepaudio2/token2wav")
# token2wav modules used only at synthesis time (not by the tiny writer): editing them must not force a refit.
_RUNTIME_ONLY = frozenset({"stepaudio2/token2wav/synth.py", "stepaudio2/token2wav/engine.py",
                           "stepaudio2/token2wav/graphs.py", "stepaudio2/token2wav/prompt.py"})
STALE_AFTER_S = 3600.0  # other builds of a seed untouched this long are pruned after a new build


def _code_files() -> list[tuple[str, Path]]:
    import stepaudio2
    import stepaudio2.export

    roots = {"export": Path(stepaudio2.export.__file__).parent, "stepaudio2": Path(stepaudio2.__file__).parent}
    files = []
    for rel in _CODE_PATHS:
        top, _, rest = rel.partition("/")
        path = roots[top] / rest
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files += [(f"{top}/{f.relative_to(roots[top])}", f) for f in found]
    return [(rel, f) for rel, f in files if rel not in _RUNTIME_ONLY]


def cache_key(seed: int = DEFAULT_SEED, max_steps: int = MAX_STEPS, verify: bool = True) -> str:
    """Hash of the build's inputs: seed, curriculum, clips, code, and the torch / transformers versions."""
    from importlib.metadata import version

    h = hashlib.sha256()
    meta = {"seed": seed, "max_steps": max_steps, "verify": verify, "curriculum": CURRICULUM.to_json(),
            "versions": {p: version(p) for p in ("torch", "transformers", "safetensors")}}
    h.update(json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
    for stem in sorted(CURRICULUM.transcripts):
        h.update(stem.encode() + clip_path(stem).read_bytes())
    for rel, path in _code_files():
        h.update(rel.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def default_cache_root() -> Path:
    """$STEPAUDIO2_CACHE/taught, else .build/taught in the source tree (or ~/.cache/stepaudio2/taught)."""
    env = os.environ.get("STEPAUDIO2_CACHE")
    if env:
        return Path(env) / "taught"
    if (REPO / "pyproject.toml").is_file():
        return REPO / ".build" / "taught"
    return Path.home() / ".cache" / "stepaudio2" / "taught"


class _FileLock:
    """Exclusive lock on a file (fcntl), so racing processes build once; the others wait and reuse it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _FileLock:
        self._f = open(self.path, "a+")  # noqa: SIM115 (held until __exit__)
        try:
            import fcntl

            fcntl.flock(self._f, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): the atomic rename below still keeps the cache consistent
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()  # closing releases the lock


def ensure_taught_checkpoint(
    cache_root: Path | None = None, seed: int = DEFAULT_SEED, *, max_steps: int = MAX_STEPS, verify: bool = True
) -> Path:
    """The taught checkpoint for `seed`, built on first use and cached under `cache_root` by `cache_key`.

    Built in a temporary folder next to its final place and renamed into place (atomic), under a lock file;
    a process that loses a race uses the winner's copy. `max_steps` / `verify` (part of the key) exist so
    tests can exercise the cache with a cheap, unverified build.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / f"seed{seed}-{cache_key(seed, max_steps, verify)[:20]}"
    if (final / TAUGHT_INFO).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _FileLock(root / f"{final.name}.lock"):
        if (final / TAUGHT_INFO).is_file():
            return final
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            build_taught_checkpoint(tmp, seed=seed, max_steps=max_steps, verify=verify)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / TAUGHT_INFO).is_file():  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _prune(root, seed, keep=final.name)
    return final


def _prune(root: Path, seed: int, keep: str) -> None:
    """Remove this seed's other builds (older code or curriculum: never hit again), with their exports, lock
    files and abandoned temporary folders, once untouched for STALE_AFTER_S (a running session keeps its copy)."""
    now = time.time()
    for path in root.iterdir():
        name = path.name.lstrip(".")
        if not name.startswith(f"seed{seed}-") or name.startswith(keep):
            continue
        try:
            if now - path.stat().st_mtime < STALE_AFTER_S:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # another process pruned it first
            pass
