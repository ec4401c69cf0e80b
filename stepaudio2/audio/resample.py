"""Sample-rate conversion that reproduces torchaudio's default resampler in numpy.

Upstream resamples with ``torchaudio.transforms.Resample(orig, new)``: a windowed-sinc polyphase
filter (Hann window, 6 zero crossings, cutoff 0.99 x the lower Nyquist). Matching it keeps the top
mel bins (6-8 kHz) equal to upstream; a generic FIR (resample_poly) shifts them by up to ~0.1 in
normalised log-mel units. For rate pairs whose reduced ratio needs a huge filter table (e.g. 16001 ->
16000) we fall back to scipy's resample_poly, as torchaudio itself would be impractically slow there.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from stepaudio2.audio.io import check_sample_rate
from stepaudio2.errors import AudioError

_ZERO_CROSSINGS = 6  # torchaudio lowpass_filter_width
_ROLLOFF = 0.99
_MAX_TABLE = 1 << 22  # phases x taps above which the sinc table is not worth building
_BLOCK_ELEMS = 1 << 22  # input elements per matmul block, bounds peak memory


@lru_cache(maxsize=16)
def _sinc_table(orig: int, new: int) -> tuple[np.ndarray, int]:
    """(taps, new) float32 polyphase table and the half width, for reduced rates orig -> new."""
    base = min(orig, new) * _ROLLOFF
    width = math.ceil(_ZERO_CROSSINGS * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64) / orig
    # torchaudio divides an integer arange in float32 here; keep that rounding for equal taps.
    phase = (np.arange(0, -new, -1) / new).astype(np.float32).astype(np.float64)
    t = np.clip((phase[:, None] + idx[None, :]) * base, -_ZERO_CROSSINGS, _ZERO_CROSSINGS)
    window = np.cos(t * math.pi / _ZERO_CROSSINGS / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    table = (sinc * window * (base / orig)).astype(np.float32).T.copy()
    table.flags.writeable = False
    return table, width


def _sinc_resample(x: np.ndarray, orig: int, new: int) -> np.ndarray:
    table, width = _sinc_table(orig, new)
    taps = table.shape[0]
    padded = np.pad(x.astype(np.float32), (width, width + orig))
    # Row j of the view is the input window of output block j (stride orig), like conv1d(stride=orig).
    windows = np.lib.stride_tricks.sliding_window_view(padded, taps)[::orig]
    step = max(1, _BLOCK_ELEMS // taps)
    out = np.concatenate([windows[i : i + step] @ table for i in range(0, windows.shape[0], step)])
    target = math.ceil(new * x.size / orig)
    return out.reshape(-1)[:target]


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample a 1-D waveform from ``orig_sr`` to ``target_sr``; returns float32.

    Output length is ceil(N * target_sr / orig_sr), as torchaudio's Resample gives; identity when
    the rates are equal.
    """
    src = check_sample_rate(orig_sr)
    dst = check_sample_rate(target_sr)
    arr = np.asarray(wav)
    if arr.ndim != 1:
        raise AudioError(f"waveform must be 1-D mono, got shape {arr.shape}")
    if src == dst:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size == 0:
        return np.zeros(0, dtype=np.float32)
    g = math.gcd(src, dst)
    orig, new = src // g, dst // g
    taps = 2 * math.ceil(_ZERO_CROSSINGS * orig / (min(orig, new) * _ROLLOFF)) + orig
    if taps * new <= _MAX_TABLE:
        return np.ascontiguousarray(_sinc_resample(arr, orig, new), dtype=np.float32)
    # Imported here: scipy.signal takes about 1 s to import, and few rates come this way.
    from scipy.signal import resample_poly

    out = resample_poly(arr.astype(np.float64), new, orig)
    return np.ascontiguousarray(out, dtype=np.float32)
