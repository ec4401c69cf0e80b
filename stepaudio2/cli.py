"""`stepaudio2` command line: tiny checkpoints and the reference pipeline (later: export, serve)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stepaudio2.errors import StepAudio2Error


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Sampling flags; the gRPC client reuses the same names."""
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def sampling_from_args(args: argparse.Namespace, task: str | None):
    """Task preset defaults, overridden by whichever flags were given."""
    from stepaudio2.engines.sampling import SamplingParams
    from stepaudio2.text import TASKS

    values: dict = dict(TASKS[task].sampling) if task in TASKS else {}
    for flag in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        v = getattr(args, flag)
        if v is not None:
            values[flag] = v
    return SamplingParams.from_dict(values)


def cmd_tiny(args: argparse.Namespace) -> int:
    if args.taught:
        return _tiny_taught(args)
    from stepaudio2.export.tiny import make_tiny_checkpoint

    out = make_tiny_checkpoint(args.out, seed=args.seed, preset=args.preset)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out}")
    return 0


def _tiny_taught(args: argparse.Namespace) -> int:
    import shutil
    import time

    from stepaudio2.errors import InvalidInputError
    from stepaudio2.export.taught import BASE_PRESET, TAUGHT_INFO, ensure_taught_checkpoint

    if args.preset != BASE_PRESET:
        raise InvalidInputError(f"--taught fits the '{BASE_PRESET}' preset only (got --preset {args.preset})")
    t0 = time.perf_counter()
    cached = ensure_taught_checkpoint(seed=args.seed)  # built once per inputs hash, then reused
    shutil.copytree(cached, args.out, dirs_exist_ok=True)
    info = json.loads((cached / TAUGHT_INFO).read_text(encoding="utf-8"))
    print(f"wrote taught {BASE_PRESET} checkpoint (seed {args.seed}, {info['steps']} steps, built in "
          f"{info['build_seconds']} s, cached at {cached}) to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from stepaudio2.pipeline import GenerationRequest, GenerationResult, ReferencePipeline, load_audio_input
    from stepaudio2.text import TextDelta

    pipe = ReferencePipeline(args.checkpoint, engine=args.engine, repository=args.repository)
    speech = None
    if args.out_wav:
        from stepaudio2.speech import SpeechOutput

        speech = SpeechOutput(args.checkpoint, args.voice, engine=args.engine, repository=args.repository)
    if args.messages:
        from stepaudio2.upstream_messages import load_messages_file

        if args.audio or args.text:
            from stepaudio2.errors import InvalidInputError

            raise InvalidInputError("--messages carries the whole conversation: drop --audio/--text")
        messages, generation, clips = load_messages_file(args.messages)
        from stepaudio2_client.upstream_messages import with_tool_schemas

        messages = with_tool_schemas(messages, _load_tools(args.tools))
        preset = "voice-chat" if generation == "speech" else "chat"  # sampling defaults of the matching preset
        request = GenerationRequest(task=None, messages=messages, generation=generation, audios=clips,
                                    sampling=sampling_from_args(args, preset), think=args.think)
    else:
        request = GenerationRequest(
            task=args.task,
            text=args.text,
            audio=load_audio_input(args.audio) if args.audio else None,
            tools=_load_tools(args.tools),
            speed=args.speed,
            voice=args.voice_style,
            target_language=args.target_language,
            sampling=sampling_from_args(args, args.task),
            think=args.think,
            today=args.today,
        )
    result, pcm, first_audio = None, [], None
    items = pipe.stream(request)
    if speech is not None and args.stream:
        from stepaudio2.speech import SpeechChunk

        items = speech.stream(items, seed=request.sampling.seed or 0)
    for item in items:
        if isinstance(item, GenerationResult):
            result = item
        elif isinstance(item, TextDelta) and not args.json:
            sys.stdout.write(item.text)
            sys.stdout.flush()
        elif speech is not None and args.stream and isinstance(item, SpeechChunk):
            if first_audio is None and item.samples.size:
                first_audio = item.at_s
            pcm.append(item.samples)
    assert result is not None
    if speech is not None:
        _write_speech(args, speech, result, pcm, first_audio)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print()
        if result.audio_codes:
            print(f"[{len(result.audio_codes)} audio codes]")
        for call in result.tool_calls:
            print(f"[tool call] {json.dumps(call, ensure_ascii=False)}")
        print(
            f"[{len(result.token_ids)} tokens, {result.finish_reason}; "
            f"first token {result.time_to_first_token_s * 1000:.0f} ms, total {result.total_s:.2f} s]",
            file=sys.stderr,
        )
    return 0


def _write_speech(args: argparse.Namespace, speech, result, pcm: list, first_audio: float | None) -> None:
    import numpy as np

    from stepaudio2.audio import encode_wav

    if not result.audio_codes:
        print("[no speech codes in the reply: nothing written]", file=sys.stderr)
        return
    wav = np.concatenate(pcm) if args.stream else speech.offline(result.audio_codes, seed=args.seed or 0)
    Path(args.out_wav).write_bytes(encode_wav(wav, speech.sample_rate))
    note = f", first audio chunk after {first_audio * 1000:.0f} ms" if first_audio is not None else ""
    print(f"[wrote {args.out_wav}: {wav.size / speech.sample_rate:.2f} s at {speech.sample_rate} Hz{note}]",
          file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> int:
    from stepaudio2.export.repository import export_checkpoint

    manifest = export_checkpoint(args.checkpoint, args.repository, precision=args.precision, force=args.force)
    if manifest.get("skipped"):
        print(f"{args.repository}: up to date with {args.checkpoint} (nothing to do)")
    else:
        graphs = ", ".join(manifest["graphs"])
        print(f"exported {graphs} into {args.repository} in {manifest['export_seconds']} s")
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    from stepaudio2.export.tensorrt_build import build_engines

    manifest = build_engines(args.repository, precision=args.precision, max_batch=args.max_batch)
    for graph, entry in manifest["engines"].items():
        print(f"{graph}: {entry['path']} ({entry['gpu']}, TensorRT {entry['tensorrt']}, {entry['precision']})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from stepaudio2.serving.gateway_process import start_gateway
    from stepaudio2.serving.launcher import ServerConfig, check_config
    from stepaudio2.serving.model_config import parse_settings
    from stepaudio2.serving.supervisor import serve_supervised

    settings = parse_settings(args.settings)
    topology_args = _apply_topology(settings, args)  # --models/--remote/--session-store: refused early too
    probe = ServerConfig(checkpoint=Path(), runtime=Path(args.runtime), model_parameters=settings)
    check_config(probe)  # unknown models/keys fail here, before the checkpoint is built or anything starts
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is None:  # embedded default: the taught tiny checkpoint (built once, cached by its inputs)
        from stepaudio2.export.taught import ensure_taught_checkpoint

        checkpoint = ensure_taught_checkpoint(seed=0)
    cfg = ServerConfig(
        checkpoint=checkpoint, runtime=Path(args.runtime), grpc_port=args.grpc_port, http_port=args.http_port,
        metrics_port=args.metrics_port, host=args.host,
        tritonserver=Path(args.tritonserver) if args.tritonserver else None, engine=args.engine,
        extra_args=[*topology_args, *args.triton_args, *(f"--trace-config={t}" for t in args.trace)],
        model_parameters=settings,
    )
    # The OpenAI-compatible HTTP door, where this server runs the pipeline it talks to (not on the stage pools).
    # It lives across the supervisor's in-place Triton restarts: it only needs the gRPC port.
    serves_pipeline = not args.models or "pipeline" in [m.strip() for m in args.models.split(",")]
    gateway = None if args.no_gateway or not serves_pipeline else start_gateway(cfg, args.gateway_port)
    try:
        return serve_supervised(cfg, args.health_port, max_restarts=args.max_restarts)
    finally:
        if gateway is not None:
            gateway.stop()


def _apply_topology(settings: dict[str, dict[str, str]], args: argparse.Namespace) -> list[str]:
    """Scale-out options (--models, --remote, --session-store) -> model parameters (merged into `settings`,
    where `--set` values win) + the tritonserver arguments they need."""
    from stepaudio2.serving.topology import parse_models, parse_remotes, topology

    params, extra = topology(parse_models(args.models), parse_remotes(args.remote), args.session_store)
    for model, values in params.items():
        settings[model] = {**values, **settings.get(model, {})}
    return extra


def _load_tools(spec: str | None) -> list[dict] | None:
    if not spec:
        return None
    from stepaudio2.text import WEB_SEARCH_TOOL

    if spec == "web_search":
        return [WEB_SEARCH_TOOL]
    return json.loads(Path(spec).read_text(encoding="utf-8"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepaudio2", description="Step-Audio-2-mini on Triton: core tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="write a random (or --taught) tiny checkpoint in the real layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--taught", action="store_true",
                   help="fit the tiny model to the shipped curriculum (transcripts, a spoken reply, a tool call); "
                        "cached under $STEPAUDIO2_CACHE or .build/taught")
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("generate", help="run the in-process reference pipeline")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--task", default="chat")
    p.add_argument("--audio", help="input wav (any rate; stereo uses channel 0)")
    p.add_argument("--today", help="ISO date for the tool persona's date line (default: today)")
    p.add_argument("--think", action="store_true",
                   help="think mode (upstream examples-think): the model reasons first; the reasoning is returned "
                        "as `reasoning` and never spoken")
    p.add_argument("--messages", help="a whole conversation in upstream's message format (JSON file; audio items "
                                      "name wav files); replaces --task/--text/--audio")
    p.add_argument("--text", help="text input (the human turn)")
    p.add_argument("--tools", help="'web_search' or a JSON file with OpenAI-style tool schemas")
    p.add_argument("--speed", choices=["slow", "normal", "fast"])
    p.add_argument("--voice-style", dest="voice_style", choices=["female", "male"],
                   help="ask the model for a female/male speaking style (instruction in the prompt)")
    p.add_argument("--voice", help="reference wav of the voice to speak in (default: the bundled voice)")
    p.add_argument("--out-wav", dest="out_wav", help="write the spoken reply (24 kHz) here")
    p.add_argument("--stream", action="store_true", help="synthesise chunk by chunk as codes arrive")
    p.add_argument("--target-language", dest="target_language")
    p.add_argument("--engine", default="torch", choices=["torch", "onnx"])
    p.add_argument("--repository", help="model repository for --engine onnx (default: beside the checkpoint)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="export the checkpoint to ONNX inside a Triton model repository")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--force", action="store_true", help="re-export even if the manifest says up to date")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="export if needed, then run Triton with the stages and the pipelines")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the taught tiny checkpoint, built once)")
    p.add_argument("--runtime", default=".build/serve", help="runtime model repositories, logs, build files")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--tritonserver", help="tritonserver binary (default: on PATH, else the nvidia-pytriton one)")
    p.add_argument("--engine", default="onnx-cpu", choices=["onnx-cpu", "onnx-cuda", "tensorrt"])
    p.add_argument("--triton-arg", dest="triton_args", action="append", default=[], metavar="ARG",
                   help="extra tritonserver argument, repeatable (e.g. --triton-arg=--log-verbose=1)")
    p.add_argument("--health-port", type=int, default=8003,
                   help="end-to-end health endpoint (/health/live, /health/ready) for the probes")
    p.add_argument("--max-restarts", type=int, default=5, help="in-place restarts within 10 min before giving up")
    p.add_argument("--trace", action="append", default=[], metavar="SETTING",
                   help="Triton trace setting, repeatable, passed as --trace-config (e.g. --trace mode=opentelemetry "
                        "--trace opentelemetry,url=http://collector:4318/v1/traces --trace rate=100 "
                        "--trace level=TIMESTAMPS)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="MODEL.KEY=VALUE",
                   help="set a config.pbtxt parameter of a model, repeatable (e.g. --set token2wav.batching=false);"
                        " see README 'Model parameters'")
    p.add_argument("--gateway-port", type=int, default=8080, help="OpenAI-compatible HTTP gateway port")
    p.add_argument("--no-gateway", action="store_true", help="do not start the HTTP gateway")
    # Scale-out (README "Scaling"): which models this server runs, where the pipeline reaches the others.
    p.add_argument("--models", help="serve only these models, comma-separated (default: all)")
    p.add_argument("--remote", action="append", default=[], metavar="STAGE=HOST:PORT",
                   help="reach this stage (audio_encoder, llm, voice_prompt, token2wav) over gRPC there; repeatable")
    p.add_argument("--session-store", dest="session_store", metavar="URL",
                   help="sessions and voices: 'embedded' (default, files in --runtime) or redis://[:PASSWORD@]HOST:PORT/DB")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("build-engines", help="build TensorRT plans from the exported ONNX graphs (GPU only)")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--max-batch", type=int, default=8)
    p.set_defaults(func=cmd_build_engines)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StepAudio2Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
