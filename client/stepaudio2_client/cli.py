"""`stepaudio2-client`: talk to a running server over gRPC (tritonclient + numpy only)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stepaudio2_client.client import ClientError, StepAudio2Client
from stepaudio2_client.session import Session
from stepaudio2_client.tools import ToolRegistry, WebSearchTool
from stepaudio2_client.upstream_messages import (
    MessagesError,
    convert_messages,
    read_messages_file,
    with_tool_schemas,
)

SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


class FileSearchBackend:
    """web_search backend answering from a JSON file of {"title", "snippet", "url"} records (offline use)."""

    def __init__(self, path: str) -> None:
        self.records = json.loads(Path(path).read_text(encoding="utf-8"))

    def search(self, query: str) -> list[dict[str, str]]:
        words = {w.lower() for w in query.split()}
        scored = sorted(self.records, key=lambda r: -len(words & set(str(r.get("snippet", "")).lower().split())))
        return scored


class WavWriter:
    """16-bit mono wav written as chunks arrive (the header is finalised on close)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.rate = 24000
        self.samples = 0
        self._wav = None

    def write(self, pcm, rate: int) -> None:
        import wave

        import numpy as np

        if self._wav is None:
            self.rate = rate
            self._wav = wave.open(self.path, "wb")  # noqa: SIM115 (closed in close())
            self._wav.setnchannels(1)
            self._wav.setsampwidth(2)
            self._wav.setframerate(rate)
        data = (np.clip(np.asarray(pcm, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2")
        self._wav.writeframes(data.tobytes())
        self.samples += data.size

    def close(self) -> None:
        if self._wav is not None:
            self._wav.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepaudio2-client", description="Step-Audio-2 gRPC client")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC endpoint HOST:PORT")
    p.add_argument("--task", default="chat")
    p.add_argument("--audio", help="wav file to send")
    p.add_argument("--text", help="text of the human turn")
    p.add_argument("--messages", help="a whole conversation in upstream's message format (JSON file; audio items "
                   "name wav files relative to it; the last message is the assistant opener)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print the result object (as `stepaudio2 generate --json`)")
    p.add_argument("--speed", choices=["slow", "normal", "fast"])
    p.add_argument("--voice-style", dest="voice_style", choices=["female", "male"],
                   help="ask the model for a female/male speaking style (instruction in the prompt)")
    p.add_argument("--voice", help="reference wav of the voice to speak in (default: the server's voice)")
    p.add_argument("--out-wav", dest="out_wav", help="write spoken replies here (24 kHz mono), chunk by chunk")
    p.add_argument("--speech-output", dest="speech_output", choices=["stream", "offline", "none"],
                   help="speech synthesis mode of the server (default: stream)")
    p.add_argument("--target-language", dest="target_language")
    p.add_argument("--today", help="ISO date for the tool persona's date line (default: the server's date)")
    p.add_argument("--think", action="store_true",
                   help="think mode: the model reasons first; the reasoning comes back as `reasoning`, never spoken")
    p.add_argument("--tools", choices=["web_search"], help="offer tools to the model; calls run in this client")
    p.add_argument("--search-results", help="JSON file the web_search tool answers from")
    # Same names as `stepaudio2 generate`.
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    request = {"task": args.task}
    for name in ("text", "speed", "target_language", "speech_output", "today"):
        if getattr(args, name) is not None:
            request[name] = getattr(args, name)
    if args.voice_style:
        request["voice"] = args.voice_style
    if args.think:
        request["think"] = True
    sampling = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    if sampling:
        request["sampling"] = sampling
    audio: bytes | list[bytes] | None = Path(args.audio).read_bytes() if args.audio else None
    tools = ToolRegistry()
    if args.tools == "web_search":
        if not args.search_results:
            print("error: --tools web_search needs --search-results FILE (the search backend)", file=sys.stderr)
            return 2
        tool = WebSearchTool(FileSearchBackend(args.search_results))
        tools.register(tool.schema, tool)
    if args.messages:
        if args.audio or args.text:
            print("error: --messages carries the whole conversation: drop --audio/--text", file=sys.stderr)
            return 2
        try:
            conversation, base_dir = read_messages_file(args.messages)
            messages, generation, audio = convert_messages(conversation, Path.read_bytes, base_dir)
        except MessagesError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        del request["task"]  # the conversation is the prompt; its opener says text or speech
        request.update(messages=with_tool_schemas(messages, tools.schemas()), generation=generation)

    import time

    started, first, first_audio = time.perf_counter(), [], []
    wav = WavWriter(args.out_wav) if args.out_wav else None

    def show(event: dict) -> None:
        if not first and event.get("type") in ("text", "audio_codes", "tool_call", "audio"):
            first.append(time.perf_counter() - started)
        if event.get("type") == "audio":
            if not first_audio:
                first_audio.append(time.perf_counter() - started)
            if wav is not None:
                wav.write(event["pcm"], event["sample_rate"])
        if args.stream and not args.json and event.get("type") == "text":
            sys.stdout.write(event["text"])
            sys.stdout.flush()
        elif not args.json and event.get("type") == "tool_call":
            print(f"\n[tool call] {json.dumps(event['call'], ensure_ascii=False)}", flush=True)

    voice = Path(args.voice).read_bytes() if args.voice else None
    try:
        with StepAudio2Client(args.url) as client:
            result = Session(client, tools, voice=voice).ask(request, audio, on_event=show)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if exc.status == "INVALID_ARGUMENT" else 1
    finally:
        if wav is not None:
            wav.close()
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "type"}, ensure_ascii=False))
    else:
        if not args.stream:
            print(result["text"] or result["tts_text"], end="")
        print()
        if result["audio_codes"]:
            print(f"[{len(result['audio_codes'])} audio codes]")
        ttft = f"first event {first[0] * 1000:.0f} ms, " if first else ""
        if first_audio:
            ttft += f"first audio {first_audio[0] * 1000:.0f} ms, "
        if wav is not None and wav.samples:
            ttft += f"{wav.samples / wav.rate:.2f} s of audio in {args.out_wav}, "
        print(f"[{len(result['token_ids'])} tokens, {result['finish_reason']}; {ttft}"
              f"total {time.perf_counter() - started:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
