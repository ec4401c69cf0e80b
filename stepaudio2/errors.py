"""Project exception types. Every user-facing failure raises one of these with a message naming the problem."""

from __future__ import annotations


class StepAudio2Error(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidInputError(StepAudio2Error, ValueError):
    """A request field is wrong (bad audio, unknown task, bad sampling parameter, unknown role, ...).

    The server maps this to gRPC INVALID_ARGUMENT.
    """


class AudioError(InvalidInputError):
    """Audio that cannot be decoded or used (empty, NaN samples, not audio at all, too long)."""


class CapacityError(StepAudio2Error):
    """The server is full (e.g. every synthesis stream slot is taken); retry later. Mapped to gRPC UNAVAILABLE."""


class CheckpointError(StepAudio2Error):
    """A checkpoint on disk does not match what the code expects (missing, unexpected or misshaped tensor...)."""


class QueueFullError(StepAudio2Error):
    """The server is at capacity (every sequence slot and the waiting room in use); maps to gRPC UNAVAILABLE."""


class UnavailableError(StepAudio2Error):
    """Something the request needs is down or busy (the session store, a stage at a remote address).

    The server maps this to gRPC UNAVAILABLE (retry later or elsewhere).
    """
