"""First-request work of the pipeline models, done in `initialize` so it happens before the server is ready.

Measured: an instance's first request spent ~4 s of CPU (scipy/soundfile imports, resampler and mel filter
tables) that every later request skips. Running the whole core flow once on a short generated clip, with local
stand-ins for the BLS stages (the stage models may not be loaded yet), pays that cost at load time.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger("stepaudio2.warm")


def warm_pipeline(tokenizer: Any) -> float:
    """Parse, decode, mel and demultiplex one probe ASR request without any stage call; returns seconds."""
    from stepaudio2.pipeline import run_pipeline
    from stepaudio2.request import request_from_json
    from stepaudio2.serving.health import PROBE_REQUEST, _probe_wav

    start = time.perf_counter()
    req = request_from_json(dict(PROBE_REQUEST), _probe_wav())

    def encode(mels, lengths) -> list[np.ndarray]:
        return [np.zeros((1, 1), np.float32) for _ in mels]

    def generate(ids, chunks, spans, sampling):
        yield from tokenizer.encode("ok")

    for _ in run_pipeline(tokenizer, req, encode, generate):
        pass
    return time.perf_counter() - start
