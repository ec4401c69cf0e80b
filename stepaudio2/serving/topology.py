"""Which models one tritonserver serves and where the pipeline reaches the others: the `serve` options
`--models NAME,...`, `--remote STAGE=HOST:PORT` (repeatable) and `--session-store URL`, turned into the
launcher's `model_parameters` (config.pbtxt parameters of the runtime copies) and tritonserver arguments.

Split example (README "Scaling"): the front serves `pipeline,audio_encoder` with `--remote llm=llm:8001
--remote token2wav=t2w:8001 --remote voice_prompt=t2w:8001`; the pools serve `--models llm` and
`--models token2wav,voice_prompt`.
"""

from __future__ import annotations

import re

from stepaudio2.errors import InvalidInputError
from stepaudio2.serving.remote_stages import STAGES

MODELS = ("audio_encoder", "llm", "voice_prompt", "token2wav", "pipeline", "generate", "text_generate")
FRONT_MODELS = ("pipeline", "generate")  # the models that call stages (and hold sessions: pipeline)
# An LLM pool (the llm served without the models that call it) answers fronts over gRPC, where each response
# crosses two servers and a connection: 4 tokens per response (vLLM's stream_interval) rather than 1. Split /
# single TTFA p95 at 1 stream went from x1.19 to x0.98 (README, "Split vs single benchmark"). `--set` wins.
POOL_STREAM_INTERVAL = "4"
_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


def parse_models(spec: str | None) -> list[str] | None:
    """`--models a,b` -> ["a", "b"] (None: every model)."""
    if not spec:
        return None
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise InvalidInputError(f"--models: unknown model(s) {unknown}; models: {', '.join(MODELS)}")
    return names


def parse_remotes(specs: list[str]) -> dict[str, str]:
    """`--remote llm=HOST:PORT` (repeatable) -> {"llm": "HOST:PORT"}."""
    remotes: dict[str, str] = {}
    for spec in specs:
        stage, sep, address = spec.partition("=")
        if not sep or stage not in STAGES:
            raise InvalidInputError(f"--remote '{spec}': expected STAGE=HOST:PORT with STAGE one of {', '.join(STAGES)}")
        if not _ADDRESS.match(address):
            raise InvalidInputError(f"--remote '{spec}': address must be HOST:PORT")
        remotes[stage] = address
    return remotes


def topology(models: list[str] | None, remotes: dict[str, str], session_store: str | None
             ) -> tuple[dict[str, dict[str, str]], list[str]]:
    """(model_parameters, tritonserver arguments) for these options."""
    if models is not None:
        served_remote = sorted(set(models) & set(remotes))
        if served_remote:
            raise InvalidInputError(f"--remote {served_remote}: also listed in --models; serve it here or there")
    params: dict[str, dict[str, str]] = {}
    for model in FRONT_MODELS:
        if models is not None and model not in models:
            continue
        params[model] = {f"remote_{stage}": address for stage, address in remotes.items()}
    if session_store:
        if any(c in session_store for c in '"\\\n'):  # it is written into config.pbtxt as a quoted string
            raise InvalidInputError("--session-store: the URL must not contain quotes, backslashes or newlines")
        if models is not None and "pipeline" not in models:
            raise InvalidInputError("--session-store needs the pipeline model in --models")
        params.setdefault("pipeline", {})["session_store"] = session_store
    if models is not None and "llm" in models and not set(models) & set(FRONT_MODELS):
        params["llm"] = {"stream_interval": POOL_STREAM_INTERVAL}
    args: list[str] = []
    if models is not None:
        # Explicit control: only these models load, but every model's files stay in the runtime repository
        # (the pipeline reads the tokenizer from llm/1 even where the llm runs elsewhere).
        args = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
    return {m: p for m, p in params.items() if p}, args
