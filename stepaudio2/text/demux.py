"""Output demultiplexer: generated ids -> text deltas, speech codes, tool calls, end of turn (spec 1.7, 3.4).

Speech replies use the ta4 layout: after `<tts_start>` (the prompt's last token) come groups of one text token
and four audio tokens, padded with `<tts_pad>` / `<audio_6561>`, closed by `<tts_end>`; whatever follows until
`<|EOT|>` is plain text (e.g. a tool call). Text inside the section is the transcript of the speech (tts_text).
Feeding ids one at a time or all at once gives the same events and result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from stepaudio2.text.tokenizer import IncrementalDecoder, SpecialIds, StepAudio2Tokenizer
from stepaudio2.text.tools import StreamingToolCallParser, ToolCall


@dataclass(frozen=True)
class TextDelta:
    text: str
    in_speech: bool = False  # True: transcript of the speech (tts_text); False: plain content


@dataclass(frozen=True)
class AudioCodes:
    codes: list[int]


@dataclass(frozen=True)
class ToolCallEvent:
    call: ToolCall


@dataclass(frozen=True)
class EndOfTurn:
    pass


@dataclass(frozen=True)
class ReasoningDelta:
    """Think mode: text the model writes before `</think>`. Returned as `reasoning`, never spoken."""

    text: str


Event = TextDelta | AudioCodes | ToolCallEvent | EndOfTurn | ReasoningDelta


@dataclass
class DemuxResult:
    text: str = ""  # plain content, tool-call markup removed
    tts_text: str = ""
    audio_codes: list[int] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # ids consumed, up to and including the end token
    finished: bool = False  # an end-of-turn id was seen
    reasoning: str = ""  # think mode: the text before `</think>`
    answer_start: int = 0  # think mode: index in token_ids of the first id after `</think>`


class OutputDemuxer:
    """Incremental demultiplexer for one reply. `speech=True` when the prompt ended with `<tts_start>`;
    `think=True` when it ended with `<think>\n`: text up to `</think>` is reasoning, then the answer follows (a
    spoken one opens with the model's own `<tts_start>`)."""

    def __init__(
        self, special: SpecialIds, tokenizer: StepAudio2Tokenizer, speech: bool, think: bool = False
    ) -> None:
        self.special = special
        self._decoder = IncrementalDecoder(tokenizer)
        self._tools = StreamingToolCallParser()
        self._in_speech = bool(speech)
        self._thinking = bool(think)
        self._done = False
        self._res = DemuxResult()

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def done(self) -> bool:
        """True once an end-of-turn id has been fed or finish() was called."""
        return self._done

    def _emit_text(self, text: str, in_speech: bool, events: list[Event]) -> None:
        if self._thinking:
            if text:
                self._res.reasoning += text
                events.append(ReasoningDelta(text))
            return
        if in_speech:
            if text:
                self._res.tts_text += text
                events.append(TextDelta(text, True))
            return
        plain, calls = self._tools.feed(text) if text else ("", [])
        self._add_plain(plain, calls, events)

    def _add_plain(self, plain: str, calls: list[ToolCall], events: list[Event]) -> None:
        if plain:
            self._res.text += plain
            events.append(TextDelta(plain, False))
        for call in calls:
            self._res.tool_calls.append(call)
            events.append(ToolCallEvent(call))

    def _flush_section(self, events: list[Event]) -> None:
        """Close the current text section: pending bytes and withheld tool-call prefixes come out."""
        self._emit_text(self._decoder.flush(), self._in_speech, events)
        if not self._in_speech:
            plain, calls = self._tools.flush()
            self._add_plain(plain, calls, events)

    def feed(self, token_id: int) -> list[Event]:
        if self._done:
            return []  # ids after the end of the turn are ignored
        tid = int(token_id)
        sp = self.special
        self._res.token_ids.append(tid)
        events: list[Event] = []
        if tid in sp.end_ids:
            self._flush_section(events)
            self._done = self._res.finished = True
            events.append(EndOfTurn())
        elif sp.is_audio(tid):
            code = tid - sp.audio_0
            if code < sp.num_audio_codes:  # the pad code never reaches token2wav
                self._res.audio_codes.append(code)
                events.append(AudioCodes([code]))
        elif self._thinking and tid == sp.think_end:
            self._emit_text(self._decoder.flush(), False, events)
            self._thinking = False
            self._res.answer_start = len(self._res.token_ids)
        elif tid == sp.tts_start or tid == sp.tts_end:
            self._flush_section(events)
            self._in_speech = tid == sp.tts_start
        elif sp.is_text(tid):
            self._emit_text(self._decoder.feed(tid), self._in_speech, events)
        # Anything else (audio_start..tts_pad controls, ids past the audio pad) is dropped.
        return events

    def feed_many(self, token_ids: Iterable[int]) -> list[Event]:
        events: list[Event] = []
        for tid in token_ids:
            events += self.feed(tid)
        return events

    def finish(self) -> list[Event]:
        """End of generation (stop id or length limit): flush what is held back. Idempotent."""
        if self._done:
            return []
        events: list[Event] = []
        self._flush_section(events)
        self._done = True
        return events

    def result(self) -> DemuxResult:
        """Everything demultiplexed so far (a copy)."""
        r = self._res
        return DemuxResult(r.text, r.tts_text, list(r.audio_codes), list(r.tool_calls), list(r.token_ids), r.finished,
                           r.reasoning, r.answer_start)

    def demux_all(self, token_ids: Iterable[int]) -> DemuxResult:
        """Feed every id, finish, and return the result."""
        self.feed_many(token_ids)
        self.finish()
        return self.result()


def demux_all(tokenizer: StepAudio2Tokenizer, token_ids: Iterable[int], *, speech: bool) -> DemuxResult:
    """One-shot demultiplexing of a whole reply."""
    return OutputDemuxer(tokenizer.special, tokenizer, speech).demux_all(token_ids)
