"""Step-Audio-2-mini serving core: checkpoint, text protocol, audio front end, models, engines, pipeline.

Heavy parts (torch, transformers) are imported lazily by the modules that need them.
"""

from stepaudio2.errors import AudioError, CheckpointError, InvalidInputError, StepAudio2Error

__all__ = ["AudioError", "CheckpointError", "InvalidInputError", "StepAudio2Error"]
__version__ = "0.1.0"
