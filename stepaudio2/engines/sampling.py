"""Per-request sampling: temperature, top-k, top-p, repetition penalty, seed. Numpy only, engine-agnostic.

Greedy when temperature is 0. Each request owns its own generator (seeded), so concurrent requests in one
batch never share random state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import numpy as np

from stepaudio2.errors import InvalidInputError

# Bounds beyond which a value is a client bug, not a preference.
MAX_TEMPERATURE = 10.0
MAX_REPETITION_PENALTY = 10.0
MAX_NEW_TOKENS = 16384
MAX_TOP_K = 1_000_000


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidInputError:
            return InvalidInputError(f"sampling parameter '{name}'={getattr(self, name)!r} {why}")

        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise bad(name, "must be a finite number")
        for name in ("top_k", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise bad(name, "must be an integer")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"must be in [0, {MAX_TEMPERATURE}]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"must be in [0, {MAX_TOP_K}] (0 disables it)")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY}]")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise bad("max_new_tokens", f"must be in [1, {MAX_NEW_TOKENS}]")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or not 0 <= self.seed < 2**63
        ):
            raise bad("seed", "must be an integer in [0, 2**63)")

    @classmethod
    def from_dict(cls, values: dict) -> SamplingParams:
        """Build from a request dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidInputError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        clean = {k: v for k, v in values.items() if v is not None or k == "seed"}
        if "stop_ids" in clean:
            ids = clean["stop_ids"]
            # A string, a dict or a float would otherwise reach int() and fail as INTERNAL.
            if not isinstance(ids, (list, tuple)) or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids
            ):
                raise InvalidInputError("sampling parameter 'stop_ids' must be a list of token ids (integers >= 0)")
            clean["stop_ids"] = tuple(int(i) for i in ids)
        return cls(**clean)

    def to_dict(self) -> dict:
        """JSON-able form; from_dict(to_dict()) round-trips."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks the next token from one row of logits under one request's SamplingParams."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, previous_ids: Iterable[int] = ()) -> int:
        p = self.params
        scores = np.asarray(logits, dtype=np.float64).copy()
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.fromiter(previous_ids, dtype=np.int64))
            if seen.size:
                s = scores[seen]
                # HF convention: shrink positive logits, push negative ones further down.
                scores[seen] = np.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(scores))
        scores /= p.temperature
        if 0 < p.top_k < scores.size:
            kth = np.partition(scores, -p.top_k)[-p.top_k]
            scores[scores < kth] = -np.inf
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cut = int(np.searchsorted(cum, p.top_p)) + 1
            keep = order[:cut]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self._rng.choice(probs.size, p=probs))
