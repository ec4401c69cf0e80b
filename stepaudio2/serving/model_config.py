"""config.pbtxt files as Triton's `ModelConfig` protobuf message: parse, set parameters, serialise.

The launcher writes every setting into the runtime copies of config.pbtxt through this module (protobuf's text
format, the same parser Triton uses), never by editing text. A model's parameters are exactly the keys its
tracked config.pbtxt declares; setting any other key, or a model that does not exist, is an error.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from stepaudio2.errors import StepAudio2Error


class ConfigError(StepAudio2Error):
    """A model or parameter that does not exist, or a config.pbtxt that does not parse."""


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def write_config(path: Path, config: model_config_pb2.ModelConfig) -> None:
    path.write_text(text_format.MessageToString(config), encoding="utf-8")


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    """The declared parameters and their string values, in key order."""
    return {key: config.parameters[key].string_value for key in sorted(config.parameters)}


def set_parameters(path: Path, values: dict[str, str]) -> None:
    """Set declared parameters of the config.pbtxt at `path` (rewritten in canonical text format)."""
    config = read_config(path)
    _refuse_unknown_keys(config.name, parameters(config), values)
    for key, value in values.items():
        config.parameters[key].string_value = str(value)
    write_config(path, config)


def model_configs(*repositories: Path) -> dict[str, Path]:
    """{model name: its config.pbtxt} over the given repositories (one folder per model)."""
    found: dict[str, Path] = {}
    for repo in repositories:
        for path in sorted(repo.glob("*/config.pbtxt")):
            found[path.parent.name] = path
    return found


def check_settings(settings: dict[str, dict[str, str]], configs: dict[str, Path]) -> None:
    """Refuse models and keys the repositories do not declare (before anything is started or exported)."""
    for model, values in settings.items():
        if model not in configs:
            raise ConfigError(f"unknown model '{model}' (models: {', '.join(sorted(configs))})")
        _refuse_unknown_keys(model, parameters(read_config(configs[model])), values)


def _refuse_unknown_keys(model: str, declared: dict[str, str], values: dict[str, str]) -> None:
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ConfigError(f"model '{model}' has no parameter {', '.join(map(repr, unknown))} "
                          f"(it has: {', '.join(declared) or 'none'})")


def parse_setting(text: str) -> tuple[str, str, str]:
    """'MODEL.KEY=VALUE' -> (model, key, value)."""
    name, sep, value = text.partition("=")
    model, dot, key = name.strip().partition(".")
    if not sep or not dot or not model or not key:
        raise ConfigError(f"--set {text!r}: expected MODEL.KEY=VALUE (e.g. token2wav.batching=false)")
    return model, key.strip(), value


def parse_settings(texts: list[str]) -> dict[str, dict[str, str]]:
    """Repeated `--set MODEL.KEY=VALUE` -> {model: {key: value}} (a later value for the same key wins)."""
    settings: dict[str, dict[str, str]] = {}
    for text in texts:
        model, key, value = parse_setting(text)
        settings.setdefault(model, {})[key] = value
    return settings
