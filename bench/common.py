"""Small helpers shared by the benchmarks: a cached checkpoint per preset, and median/spread reporting."""

from __future__ import annotations

import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkpoint(preset: str, seed: int = 0) -> Path:
    from stepaudio2.export.tiny import make_tiny_checkpoint

    # v2: the small preset has the real 158,720-id vocabulary (issue 13), tiny has head_dim 32
    path = ROOT / ".build" / f"bench-v2-{preset}-{seed}"
    if not (path / "config.json").is_file() or not (path / "token2wav" / "flow.pt").is_file():
        make_tiny_checkpoint(path, seed=seed, preset=preset)
    return path


def summary(values: list[float]) -> str:
    """median [min .. max] (n)"""
    return f"{statistics.median(values):.4f} [{min(values):.4f} .. {max(values):.4f}] (n={len(values)})"
