"""Helpers shared by the Python-backend model.py adapters (pb_utils is passed in: it exists only in the stub)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from stepaudio2.engines.scheduler import QueueFullError
from stepaudio2.errors import InvalidInputError


def triton_error(pb_utils: Any, exc: BaseException):
    """Map a project exception to a TritonError with the right gRPC status."""
    if isinstance(exc, InvalidInputError):
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
    if isinstance(exc, QueueFullError):
        return pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE)
    return pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)


def optional_input(pb_utils: Any, request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def required_input(pb_utils: Any, request: Any, name: str) -> np.ndarray:
    value = optional_input(pb_utils, request, name)
    if value is None:
        raise InvalidInputError(f"missing input tensor '{name}'")
    return value


def bytes_value(array: np.ndarray | None) -> bytes | None:
    """First element of a BYTES tensor as bytes (None when absent or empty)."""
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value if isinstance(value, bytes) else bytes(value)


def json_value(array: np.ndarray | None, name: str) -> Any:
    raw = bytes_value(array)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"input '{name}' is not valid UTF-8 JSON: {exc}") from exc


def bytes_tensor(pb_utils: Any, name: str, value: str | bytes):
    data = value.encode("utf-8") if isinstance(value, str) else value
    return pb_utils.Tensor(name, np.array([data], dtype=np.object_))
