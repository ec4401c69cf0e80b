"""Iteration-level continuous batching for the LLM.

Requests join and leave the running batch between decode steps. Each running request owns one slot: its KV
cache (numpy, per layer stacked), position, sampler and stop set. A step:

  1. admits waiting requests into free slots (prefill each, batch 1: prompts differ in length);
  2. runs ONE decode call for all running requests, left-padding their caches to a common past length with an
     attention mask (the decoder graph takes a ragged batch);
  3. samples each row with its own sampler, emits the token, and frees slots that stopped, hit their length
     limit or were cancelled.

The decoder is any Runner with the `llm_decoder` signature (ONNX Runtime, TensorRT, or the torch graph), so the
same scheduler runs on every engine. A bounded queue rejects with QueueFullError instead of exhausting memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stepaudio2.engines.runners import Runner
from stepaudio2.engines.sampling import Sampler, SamplingParams
from stepaudio2.errors import StepAudio2Error


class QueueFullError(StepAudio2Error):
    """The server is at capacity (all slots busy and the queue full); maps to gRPC UNAVAILABLE."""


@dataclass
class SequenceRequest:
    request_id: str
    prompt_embeds: np.ndarray  # (T, H), audio already spliced in
    prompt_ids: list[int]
    sampling: SamplingParams
    stop_ids: frozenset[int]
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]  # reason: stop | length | cancelled | error: ...
    is_cancelled: Callable[[], bool] = lambda: False


@dataclass(eq=False)  # identity semantics: slots hold arrays, and list.remove must not compare them
class _Slot:
    req: SequenceRequest
    sampler: Sampler
    keys: np.ndarray  # (L, 1, KV, P, D)
    values: np.ndarray
    history: list[int]
    generated: int = 0
    logits: np.ndarray | None = None
    done: str | None = None


@dataclass
class SchedulerStats:
    steps: int = 0
    max_batch: int = 0  # largest decode batch seen (bounded state: the server runs for weeks)


class ContinuousBatcher:
    def __init__(
        self,
        decoder: Runner,
        embed: Callable[[list[int]], np.ndarray],
        kv_shape: tuple[int, int, int, int],
        max_slots: int = 8,
        max_queue: int = 64,
        on_step: Callable[[int, int, int], None] | None = None,
    ) -> None:
        """kv_shape = (layers, kv_heads, head_dim, max_context); the empty cache is (L, 1, KV, 0, D)."""
        self.decoder = decoder
        self.num_layers, self.kv_heads, self.head_dim, self.max_context = kv_shape
        self.embed = embed
        self.max_slots = max_slots
        self.max_queue = max_queue
        self.waiting: deque[SequenceRequest] = deque()
        self.running: list[_Slot] = []
        self.stats = SchedulerStats()
        self.on_step = on_step  # (decode batch size, running, waiting) after each step, e.g. for metrics
        self._cv = threading.Condition()
        self._stop = False

    # ---- submission ---------------------------------------------------------------------------------------
    def submit(self, req: SequenceRequest) -> None:
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(
                    f"LLM is at capacity ({len(self.running)} running, {len(self.waiting)} queued); retry later"
                )
            self.waiting.append(req)
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self.waiting) + len(self.running)

    # ---- engine calls -------------------------------------------------------------------------------------
    def _prefill(self, req: SequenceRequest) -> _Slot:
        t = req.prompt_embeds.shape[0]
        empty = np.zeros((self.num_layers, 1, self.kv_heads, 0, self.head_dim), np.float32)
        out = self.decoder(
            inputs_embeds=req.prompt_embeds[None].astype(np.float32),
            attention_mask=np.ones((1, t), np.int64),
            position_ids=np.arange(t, dtype=np.int64)[None],
            past_keys=empty,
            past_values=empty,
        )
        slot = _Slot(req, Sampler(req.sampling), out["present_keys"], out["present_values"], list(req.prompt_ids))
        slot.logits = out["logits"][0, -1]
        return slot

    def _decode(self, slots: list[_Slot], tokens: list[int]) -> None:
        pasts = [s.keys.shape[3] for s in slots]
        p_max = max(pasts)
        L, _, kv, _, d = slots[0].keys.shape
        b = len(slots)
        keys = np.zeros((L, b, kv, p_max, d), np.float32)
        values = np.zeros_like(keys)
        mask = np.zeros((b, p_max + 1), np.int64)
        for i, (s, p) in enumerate(zip(slots, pasts, strict=True)):
            keys[:, i, :, p_max - p :] = s.keys[:, 0]
            values[:, i, :, p_max - p :] = s.values[:, 0]
            mask[i, p_max - p :] = 1
        out = self.decoder(
            inputs_embeds=self.embed(tokens)[:, None, :].astype(np.float32),
            attention_mask=mask,
            position_ids=np.asarray(pasts, np.int64)[:, None],
            past_keys=keys,
            past_values=values,
        )
        for i, (s, p) in enumerate(zip(slots, pasts, strict=True)):
            # Drop the left padding again so each slot keeps exactly its own cache.
            s.keys = out["present_keys"][:, i : i + 1, :, p_max - p :].copy()
            s.values = out["present_values"][:, i : i + 1, :, p_max - p :].copy()
            s.logits = out["logits"][i, -1]

    # ---- one iteration ------------------------------------------------------------------------------------
    def step(self) -> int:
        """Admit, decode once, retire. Returns the number of running requests after the step."""
        with self._cv:
            while self.waiting and len(self.running) < self.max_slots:
                req = self.waiting.popleft()
                self._cv.release()
                try:
                    slot = self._admit(req)
                finally:
                    self._cv.acquire()
                if slot is not None:
                    self.running.append(slot)
            active = list(self.running)
        if not active:
            return 0
        # Sample from the current logits of every slot, emit, and decide who continues.
        tokens, cont = [], []
        for s in active:
            if s.req.is_cancelled():
                s.done = "cancelled"
                continue
            token = s.sampler(s.logits, s.history)
            s.history.append(token)
            s.generated += 1
            s.req.on_token(token)
            if token in s.req.stop_ids:
                s.done = "stop"
            elif s.generated >= s.req.sampling.max_new_tokens or len(s.history) >= self.max_context:
                s.done = "length"
            else:
                tokens.append(token)
                cont.append(s)
        if cont:
            try:
                self._decode(cont, tokens)
            except Exception as exc:  # an engine failure ends these requests, not the server
                for s in cont:
                    s.done = f"error: {exc}"
            self.stats.steps += 1
            self.stats.max_batch = max(self.stats.max_batch, len(cont))
        with self._cv:
            for s in active:
                if s.done is not None:
                    self.running.remove(s)
                    s.req.on_finish(s.done)
            running, waiting = len(self.running), len(self.waiting)
        if self.on_step is not None:  # also after the last retire, so gauges fall back to 0
            self.on_step(len(cont), running, waiting)
        return running

    def _admit(self, req: SequenceRequest) -> _Slot | None:
        if req.is_cancelled():
            req.on_finish("cancelled")
            return None
        try:
            return self._prefill(req)
        except Exception as exc:
            req.on_finish(f"error: {exc}")
            return None

    # ---- background loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        """Step while there is work; sleep on a condition (no polling) when idle. Ends after stop()."""
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.running:
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as exc:  # never let the loop die: fail what it held, keep serving new requests
                self._fail_all(f"error: scheduler step failed: {exc}")

    def _fail_all(self, reason: str) -> None:
        with self._cv:
            victims = [s.req for s in self.running] + list(self.waiting)
            self.running.clear()
            self.waiting.clear()
        for req in victims:
            try:
                req.on_finish(reason)
            except Exception:
                pass  # the sender may already be closed (client gone)

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
