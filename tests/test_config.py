"""One configuration mechanism: every model reads its settings from its own config.pbtxt `parameters`, the
launcher writes them with protobuf's text format (Triton's ModelConfig message), `serve --set MODEL.KEY=VALUE`
reaches every kind of parameter, and bad models, keys or values are refused.

Oracles: Triton's own ModelConfig parser, the served `/v2/models/NAME/config` and the served behaviour.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest

from stepaudio2.serving.parameters import ModelParameters, ParameterError

from .conftest import ASSETS, QUICK_STOP_S, REPO, SERVE_EXTRA, free_port, require_module

MODEL_CODE = sorted([*REPO.glob("model_repository/*/1/*.py"), *REPO.glob("ensemble/*/1/*.py")])
CONFIGS = sorted([*REPO.glob("model_repository/*/config.pbtxt"), *REPO.glob("ensemble/*/config.pbtxt")])
READERS = {"text", "choice", "integer", "number", "flag", "path"}  # ModelParameters accessors


def _environment_reads(tree: ast.AST) -> list[int]:
    """Lines that read the process environment (os.environ in any form but an assignment, os.getenv, ...)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb", "getenvb"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in ("environ", "getenv"):
            lines.append(node.lineno)
    stores = {n.lineno for n in ast.walk(tree)
              if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store)
              and isinstance(n.value, ast.Attribute) and n.value.attr == "environ"}
    return sorted(set(lines) - stores)  # `os.environ[K] = v` passes a setting on (to a library), not a read


def test_no_model_reads_the_environment() -> None:
    assert len(MODEL_CODE) >= 6, MODEL_CODE  # the glob must find the model code
    found = {str(p.relative_to(REPO)): _environment_reads(ast.parse(p.read_text())) for p in MODEL_CODE}
    assert not {k: v for k, v in found.items() if v}, f"models read the environment at (file: lines) {found}"


def test_the_environment_check_catches_each_form() -> None:
    for code in ("import os\nx = os.environ['A']", "import os\nx = os.environ.get('A')", "import os\nos.getenv('A')",
                 "from os import environ\nx = environ['A']", "import os\nenv = dict(os.environ)"):
        assert _environment_reads(ast.parse(code)), code
    assert not _environment_reads(ast.parse("import os\nos.environ['A'] = '1'"))


def _read_keys(path: Path) -> set[str]:
    """Parameter keys a model.py reads through ModelParameters (`params.integer("max_streams")`, ...)."""
    keys = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in READERS
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            keys.add(node.args[0].value)
    return keys


def test_every_config_parses_and_declares_exactly_what_its_model_reads() -> None:
    from stepaudio2.serving.model_config import parameters, read_config

    assert len(CONFIGS) >= 7, CONFIGS
    for path in CONFIGS:
        config = read_config(path)  # Triton's message: a typo in a field name fails here
        assert config.name == path.parent.name
        code = path.parent / "1" / "model.py"
        if not code.is_file():  # the platform ensemble has no code and no parameters
            assert config.platform == "ensemble" and not parameters(config)
            continue
        text = code.read_text()
        assert "ModelParameters.from_args(args)" in text and 'args["model_config"]' not in text, code
        assert _read_keys(code) == set(parameters(config)), f"{config.name}: read vs declared"


def test_set_parameters_rewrites_only_the_values(tmp_path) -> None:
    from stepaudio2.serving.model_config import ConfigError, parameters, read_config, set_parameters

    source = REPO / "model_repository" / "token2wav" / "config.pbtxt"
    config = tmp_path / "config.pbtxt"
    config.write_text(source.read_text())
    set_parameters(config, {"batching": "false", "max_streams": "7"})
    before, after = read_config(source), read_config(config)
    assert parameters(after) == {**parameters(before), "batching": "false", "max_streams": "7"}
    for key in ("batching", "max_streams"):
        del before.parameters[key], after.parameters[key]
    assert after == before  # inputs, outputs, batching, instances: untouched
    with pytest.raises(ConfigError, match="model 'token2wav' has no parameter 'nope'"):
        set_parameters(config, {"nope": "1"})


def test_parse_setting() -> None:
    from stepaudio2.serving.model_config import ConfigError, parse_setting

    assert parse_setting("token2wav.batching=false") == ("token2wav", "batching", "false")
    assert parse_setting("pipeline.sessions_dir=/a=b") == ("pipeline", "sessions_dir", "/a=b")
    assert parse_setting("llm.engine=") == ("llm", "engine", "")
    for bad in ("token2wav", "token2wav.batching", "batching=false", ".x=1", "m.=1"):
        with pytest.raises(ConfigError, match="MODEL.KEY=VALUE"):
            parse_setting(bad)


@pytest.mark.parametrize(("setting", "needle"), [
    ("nosuchmodel.batching=false", "unknown model 'nosuchmodel'"),
    ("token2wav.nosuchkey=1", "model 'token2wav' has no parameter 'nosuchkey'"),
    ("text_generate.engine=onnx-cpu", "model 'text_generate' has no parameter 'engine'"),
    ("token2wav", "expected MODEL.KEY=VALUE"),
])
def test_serve_refuses_bad_settings_before_starting(tmp_path, capsys, setting: str, needle: str) -> None:
    from stepaudio2.cli import main

    runtime = tmp_path / "runtime"
    # A checkpoint that does not exist: had the launcher gone on, it would fail on that instead.
    code = main(["serve", "--checkpoint", str(tmp_path / "missing"), "--runtime", str(runtime),
                 "--set", "token2wav.batching=false", "--set", setting])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not runtime.exists()  # nothing was prepared, exported or started


def _params(values: dict[str, str], folder: Path = Path("/m/pipeline")) -> ModelParameters:
    args = {"model_name": "pipeline", "model_repository": str(folder),
            "model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in values.items()}})}
    return ModelParameters.from_args(args)


def test_model_parameters_are_typed_and_errors_name_the_key(tmp_path) -> None:
    p = _params({"n": "3", "x": "0.5", "on": "False", "eng": "onnx-cpu", "rel": "../llm/1", "abs": "/data/s",
                 "bad": "three"}, tmp_path / "pipeline")
    assert p.integer("n", minimum=1) == 3 and p.number("x") == 0.5 and p.flag("on") is False
    assert p.choice("eng", ("onnx-cpu", "tensorrt")) == "onnx-cpu"
    assert p.path("rel") == (tmp_path / "llm" / "1").resolve() and p.path("abs") == Path("/data/s")
    cases = [(lambda: p.integer("missing"), "pipeline.missing: parameter missing"),
             (lambda: p.integer("bad"), "pipeline.bad: 'three' is not an integer"),
             (lambda: p.integer("n", minimum=4), "pipeline.n: '3' is not an integer >= 4"),
             (lambda: p.number("bad"), "pipeline.bad: 'three' is not a number"),
             (lambda: p.flag("bad"), "pipeline.bad: 'three' is not true or false"),
             (lambda: p.choice("eng", ("torch",)), "pipeline.eng: 'onnx-cpu' is not one of torch")]
    for call, message in cases:
        with pytest.raises(ParameterError) as err:
            call()
        assert str(err.value).startswith(message), err.value


def _readme_parameters() -> dict[tuple[str, str], str]:
    """{(model, key): default} from the README's parameter table."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Model parameters", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| `([a-z_0-9]+)` \| `([^`]*)` \|", section, flags=re.M)
    return {(model, key): default for model, key, default in rows}


def test_readme_lists_every_parameter_with_its_default() -> None:
    from stepaudio2.serving.model_config import parameters, read_config

    declared = {(p.parent.name, key): value for p in CONFIGS for key, value in parameters(read_config(p)).items()}
    assert _readme_parameters() == declared


# --- on a real server ------------------------------------------------------------------------------------------

SETTINGS = {
    "token2wav": {"engine": "onnx-cpu", "batching": "false", "max_streams": "5"},  # engine, batching, limit
    "voice_prompt": {"max_prompt_seconds": "1.5"},                                  # limit with a visible effect
    "pipeline": {"max_sessions": "3"},                                              # + sessions_dir (a path) below
}


def test_a_bad_value_stops_the_server_with_the_key_named(taught_export: Path, taught_checkpoint: Path, tmp_path) -> None:
    require_module("pytriton", SERVE_EXTRA)
    from stepaudio2.serving.launcher import ServerConfig, ServerError, TritonProcess

    shutil.copytree(taught_export, tmp_path / "model_repository")
    # Only the model with the bad value is loaded: the others (vLLM's start above all) would add half a minute
    # before Triton gives up, and change nothing here.
    cfg = ServerConfig(checkpoint=taught_checkpoint, runtime=tmp_path, grpc_port=free_port(),
                       http_port=free_port(), metrics_port=free_port(),
                       model_parameters={"voice_prompt": {"max_voices": "lots"}},
                       extra_args=["--model-control-mode=explicit", "--load-model=voice_prompt"])
    proc = TritonProcess(cfg)
    with pytest.raises(ServerError) as err:
        proc.start(timeout_s=300)
    proc.stop()
    # The launcher puts the load failure first, with the model and key named.
    assert str(err.value).splitlines()[1] == ("failed to load 'voice_prompt' version 1: Internal: ParameterError: "
                                             "voice_prompt.max_voices: 'lots' is not an integer")


@pytest.fixture(scope="module")
def set_server(taught_export: Path, taught_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    require_module("pytriton", SERVE_EXTRA)
    from stepaudio2.serving.launcher import ServerConfig, TritonProcess

    sessions = tmp_path_factory.mktemp("held-sessions")
    settings = {**SETTINGS, "pipeline": {**SETTINGS["pipeline"], "sessions_dir": str(sessions)}}
    cfg = ServerConfig(checkpoint=taught_checkpoint, runtime=tmp_path_factory.mktemp("set-serve"),
                       grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                       model_parameters=settings)
    shutil.copytree(taught_export, cfg.runtime / "model_repository")
    proc = TritonProcess(cfg)
    proc.start(timeout_s=300)
    yield cfg, sessions
    proc.stop(QUICK_STOP_S)


def _served_parameters(cfg, model: str) -> dict[str, str]:
    with urllib.request.urlopen(f"http://{cfg.host}:{cfg.http_port}/v2/models/{model}/config", timeout=10) as r:
        config = json.load(r)
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def test_set_reaches_every_kind_of_parameter_on_a_live_server(set_server) -> None:
    from stepaudio2.serving.model_config import parameters, read_config
    from stepaudio2_client import ClientError, StepAudio2Client

    cfg, sessions = set_server
    # What Triton loaded (and handed each model's initialize) is the tracked defaults with the settings over them.
    for model, values in {**SETTINGS, "pipeline": {**SETTINGS["pipeline"], "sessions_dir": str(sessions)},
                          "audio_encoder": {"engine": cfg.engine},
                          "llm": {"python_executable": sys.executable}}.items():  # written by the launcher
        folder = "ensemble" if model == "pipeline" else "model_repository"
        tracked = parameters(read_config(REPO / folder / model / "config.pbtxt"))
        assert _served_parameters(cfg, model) == {**tracked, **values}, model
    with StepAudio2Client(f"127.0.0.1:{cfg.grpc_port}") as client:
        # A path: the server-held session is written into the folder that was set.
        first = client.generate({"task": "voice-chat", "session_id": "new", "sampling": {"max_new_tokens": 90},
                                 "speech_output": "offline"}, (ASSETS / "hello_en.wav").read_bytes())
        assert [p.stem for p in sessions.glob("*.json")] == [first["session_id"]]
        # The exported graphs (token2wav.engine=onnx-cpu) spoke the reply.
        assert first["audio"]["samples"] > 0 and len(first["pcm"]) == first["audio"]["samples"]
        # A limit: a 2 s voice prompt is over the 1.5 s that was set (the default is 30 s).
        with pytest.raises(ClientError) as err:
            client.generate({"task": "voice-chat", "sampling": {"max_new_tokens": 30}},
                            (ASSETS / "hello_en.wav").read_bytes(), voice=_tone_wav(2.0))
    assert err.value.status == "INVALID_ARGUMENT" and "over the limit max_prompt_seconds=1.5" in err.value.message, err.value


def _tone_wav(seconds: float, rate: int = 16000) -> bytes:
    import io
    import wave

    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()

