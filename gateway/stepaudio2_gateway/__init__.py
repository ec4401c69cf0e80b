"""OpenAI-compatible HTTP gateway in front of the Step-Audio-2 Triton `pipeline` model (no torch).

Endpoints: /v1/chat/completions, /v1/audio/transcriptions, /v1/audio/translations, /v1/models, /v1/audio/voices
(extension), /health, /metrics and the voice-chat page at /.
"""

MODEL_ID = "step-audio-2-mini"

__all__ = ["MODEL_ID"]
