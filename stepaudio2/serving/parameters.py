"""A served model's settings, read from the `parameters` of its own config.pbtxt (the only place they come from).

Triton hands `initialize()` the model's configuration as JSON (`args["model_config"]`). Every setting a model uses
is declared in its tracked config.pbtxt with its default value, so there are no hidden defaults in code: a
parameter missing from the configuration is an error, as is a value of the wrong kind. Errors name the model and
the key (`token2wav.max_streams`), so a bad `stepaudio2 serve --set` value is easy to trace in the server log.
Relative paths are resolved against the model's own folder (`args["model_repository"]`).

This module is imported inside the Python backend stub: standard library only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from stepaudio2.errors import StepAudio2Error


class ParameterError(StepAudio2Error):
    """A config.pbtxt parameter is missing or has a value the model cannot use."""


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ModelParameters:
    """Typed access to one model's config.pbtxt parameters."""

    def __init__(self, model: str, values: dict[str, str], folder: Path) -> None:
        self.model = model
        self.values = values
        self.folder = folder

    @classmethod
    def from_args(cls, args: dict) -> ModelParameters:
        """From the `args` Triton passes to `initialize()`."""
        config = json.loads(args["model_config"])
        values = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        return cls(args["model_name"], values, Path(args["model_repository"]))

    def _raw(self, key: str) -> str:
        if key not in self.values:
            raise ParameterError(f"{self.model}.{key}: parameter missing from config.pbtxt")
        return self.values[key].strip()

    def _bad(self, key: str, value: str, wanted: str) -> ParameterError:
        return ParameterError(f"{self.model}.{key}: {value!r} is not {wanted}")

    def text(self, key: str) -> str:
        return self._raw(key)

    def choice(self, key: str, options: Iterable[str]) -> str:
        options = tuple(options)
        value = self._raw(key)
        if value not in options:
            raise self._bad(key, value, "one of " + ", ".join(options))
        return value

    def integer(self, key: str, minimum: int | None = None) -> int:
        value = self._raw(key)
        try:
            number = int(value)
        except ValueError:
            raise self._bad(key, value, "an integer") from None
        if minimum is not None and number < minimum:
            raise self._bad(key, value, f"an integer >= {minimum}")
        return number

    def number(self, key: str, minimum: float | None = None) -> float:
        value = self._raw(key)
        try:
            number = float(value)
        except ValueError:
            raise self._bad(key, value, "a number") from None
        if number != number or (minimum is not None and number < minimum):  # NaN or below the bound
            raise self._bad(key, value, f"a number >= {minimum}" if minimum is not None else "a number")
        return number

    def flag(self, key: str) -> bool:
        value = self._raw(key).lower()
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise self._bad(key, value, "true or false")

    def path(self, key: str) -> Path:
        """A path; a relative one is taken from the model's own folder."""
        value = self._raw(key)
        if not value:
            raise self._bad(key, value, "a path")
        path = Path(value)
        return path if path.is_absolute() else (self.folder / path).resolve()
