"""Audio front end: decoding/validation, resampling, the 16 kHz 128-mel encoder features with 25 s
chunking, and the token2wav prompt front ends (S3 log-mel, 24 kHz 80-mel, Kaldi fbank for CAM++).

numpy/scipy/soundfile only: importing this package never imports torch. The placeholder convention
is documented in ``stepaudio2.audio.features``.
"""

from stepaudio2.audio.fbank import campplus_features, kaldi_fbank_80, kaldi_mel_banks
from stepaudio2.audio.features import (
    CHUNK_SAMPLES,
    CHUNK_SECONDS,
    DEFAULT_MAX_SECONDS,
    AudioFeatures,
    adaptor_output_length,
    chunk_waveform,
    encoder_output_length,
    encoder_valid_length,
    mel_frames,
    pad_mels,
    placeholder_count,
    prepare_audio,
)
from stepaudio2.audio.io import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    check_sample_rate,
    decode_audio,
    encode_wav,
    load_audio,
    to_mono,
    validate_waveform,
)
from stepaudio2.audio.mel import (
    MEL_PAD_SAMPLES,
    N_MELS,
    PROMPT_SAMPLE_RATE,
    SAMPLE_RATE,
    log_mel_128,
    mel_24k_80,
    s3_log_mel,
    slaney_mel_filterbank,
)
from stepaudio2.audio.resample import resample

__all__ = [
    "CHUNK_SAMPLES",
    "CHUNK_SECONDS",
    "DEFAULT_MAX_SECONDS",
    "MAX_SAMPLE_RATE",
    "MEL_PAD_SAMPLES",
    "MIN_SAMPLE_RATE",
    "N_MELS",
    "PROMPT_SAMPLE_RATE",
    "SAMPLE_RATE",
    "AudioFeatures",
    "adaptor_output_length",
    "campplus_features",
    "check_sample_rate",
    "chunk_waveform",
    "decode_audio",
    "encode_wav",
    "encoder_output_length",
    "encoder_valid_length",
    "kaldi_fbank_80",
    "kaldi_mel_banks",
    "load_audio",
    "log_mel_128",
    "mel_24k_80",
    "mel_frames",
    "pad_mels",
    "placeholder_count",
    "prepare_audio",
    "resample",
    "s3_log_mel",
    "slaney_mel_filterbank",
    "to_mono",
    "validate_waveform",
]
