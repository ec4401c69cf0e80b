"""The ASGI app (Starlette): routes, API keys, body limit, metrics, and the chat / audio endpoints."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from stepaudio2_gateway import MODEL_ID
from stepaudio2_gateway.audio import check_audio, wav_bytes
from stepaudio2_gateway.chat import ChatParams, check_model, parse_chat, pipeline_request
from stepaudio2_gateway.config import GatewayConfig
from stepaudio2_gateway.errors import APIError, bad
from stepaudio2_gateway.metrics import GatewayMetrics
from stepaudio2_gateway.reply import Outcome, pieces, usage
from stepaudio2_gateway.streaming import SSEResponse, race, sse, with_deadline
from stepaudio2_gateway.triton import TritonPipeline
from stepaudio2_gateway.voices import NAME, ReplayCache, VoiceRegistry

STATIC = Path(__file__).parent / "static"
TRANSCRIPT_FORMATS = ("json", "text", "verbose_json")


class Gateway:
    def __init__(self, cfg: GatewayConfig, triton: TritonPipeline | None = None) -> None:
        self.cfg = cfg
        self.triton = triton or TritonPipeline(cfg.triton_url)
        self.metrics = GatewayMetrics()
        self.voices = VoiceRegistry(cfg.voices_max)
        self.replay = ReplayCache(cfg.audio_ids_max)
        self.in_flight = 0

    # ---- plumbing -----------------------------------------------------------------------------------------

    def take_slot(self) -> Callable[[], None]:
        """One forwarded request; past `max_in_flight` the client gets 429 at once instead of queueing. Returns
        the release function (idempotent)."""
        if self.in_flight >= self.cfg.max_in_flight:
            raise APIError(429, f"too many requests in flight (limit {self.cfg.max_in_flight}); retry shortly",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.in_flight += 1
        self.metrics.in_flight.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.in_flight.dec()

        return release

    @contextlib.contextmanager
    def slot(self):
        release = self.take_slot()
        try:
            yield
        finally:
            release()

    def events(self, request: dict, audio: bytes | list[bytes] | None, voice: bytes | None = None):
        return with_deadline(self.triton.events(request, audio, voice), self.cfg.timeout_s)

    async def body_json(self, request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc

    # ---- chat completions -----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        arrived = time.perf_counter()
        params = parse_chat(await self.body_json(request), self.voices.__contains__)
        call = pipeline_request(params, self.replay.get, self.cfg.max_audio_seconds)
        voice = self.voices.get(params.voice).wav if params.speech else None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if params.stream:
            release = self.take_slot()  # the 429 comes before the 200 of the stream; released when it ends
            body = self._chat_stream(params, call, voice, rid, created, arrived)
            return SSEResponse(body, on_disconnect=lambda: self.metrics.cancelled.labels("disconnect").inc(),
                               on_close=release)
        with self.slot():
            reply = await race(self._chat_once(params, call, voice), request.receive,
                               lambda: self.metrics.cancelled.labels("disconnect").inc())
        if reply is None:
            return Response(status_code=499)
        message, outcome = reply
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": MODEL_ID,
            "choices": [{"index": 0, "message": message, "finish_reason": outcome.finish_reason, "logprobs": None}],
            "usage": usage(outcome.result),
        })

    async def _chat_once(self, params: ChatParams, call, voice: bytes | None) -> tuple[dict, Outcome]:
        outcome = Outcome()
        content: list[str] = []
        transcript: list[str] = []
        audio: list[bytes] = []
        calls: list[dict] = []
        async for piece in pieces(self.events(call.request, call.audio, voice), params.stop, outcome):
            if piece.kind == "content":
                content.append(piece.text)
            elif piece.kind == "transcript":
                transcript.append(piece.text)
            elif piece.kind == "audio":
                audio.append(piece.pcm)
            else:
                calls.append(piece.call)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        if params.speech and (audio or transcript):
            pcm = b"".join(audio)
            audio_id = f"audio_{uuid.uuid4().hex}"
            expires = self._remember(audio_id, outcome)
            data = wav_bytes(pcm) if params.audio_format == "wav" else pcm
            message["audio"] = {"id": audio_id, "data": base64.b64encode(data).decode(), "expires_at": expires,
                                "transcript": "".join(transcript)}
        return message, outcome

    def _remember(self, audio_id: str, outcome: Outcome) -> int:
        turn = outcome.result.get("assistant_turn") if outcome.result else None
        if turn is None:  # cut by a stop string: nothing exact to replay
            return int(time.time())
        return self.replay.put(audio_id, turn)

    async def _chat_stream(self, params: ChatParams, call, voice, rid: str, created: int, arrived: float):
        def chunk(delta: dict, finish: str | None = None) -> bytes:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        outcome = Outcome()
        audio_id = f"audio_{uuid.uuid4().hex}"
        first_audio = True
        n_calls = 0
        try:
            yield chunk({"role": "assistant", "content": ""})
            # aclosing: when the client hangs up at a `yield`, the gRPC stream is cancelled now, not whenever the
            # abandoned generators happen to be collected.
            async with contextlib.aclosing(pieces(self.events(call.request, call.audio, voice), params.stop,
                                                  outcome)) as reply:
                async for piece in reply:
                    if piece.kind == "content":
                        yield chunk({"content": piece.text})
                    elif piece.kind == "transcript":
                        yield chunk({"audio": {"id": audio_id, "transcript": piece.text}})
                    elif piece.kind == "audio":
                        if first_audio:
                            first_audio = False
                            self.metrics.ttfa.observe(time.perf_counter() - arrived)
                        yield chunk({"audio": {"id": audio_id, "data": base64.b64encode(piece.pcm).decode()}})
                    elif piece.kind == "tool_call":
                        yield chunk({"tool_calls": [{"index": n_calls, **piece.call}]})
                        n_calls += 1
            if params.speech and not first_audio:
                yield chunk({"audio": {"id": audio_id, "expires_at": self._remember(audio_id, outcome)}})
            yield chunk({}, outcome.finish_reason)
            if params.include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                           "choices": [], "usage": usage(outcome.result)})
        except APIError as exc:  # headers are gone: the error travels as an SSE event, OpenAI-style
            self.metrics.errors.labels(str(exc.status)).inc()
            yield sse(exc.body())
        yield b"data: [DONE]\n\n"

    # ---- audio: transcriptions, translations, voices ------------------------------------------------------

    async def transcriptions(self, request: Request) -> Response:
        return await self._audio_text(request, translate=False)

    async def translations(self, request: Request) -> Response:
        return await self._audio_text(request, translate=True)

    async def _audio_text(self, request: Request, translate: bool) -> Response:
        form = await request.form(max_part_size=self.cfg.max_body_bytes)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad("'file' (the audio, as a multipart file) is required", "file")
        raw = await upload.read()
        check_model(form.get("model"))
        seconds = check_audio(raw, "file", self.cfg.max_audio_seconds)
        fmt = form.get("response_format") or "json"
        if fmt not in TRANSCRIPT_FORMATS:
            raise bad(f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}", "response_format")
        language = form.get("language")
        if language is not None and (translate or not re.fullmatch(r"[a-z]{2,3}", str(language))):
            raise bad("'language' is an ISO-639-1 code (transcriptions only)", "language")
        stream = str(form.get("stream") or "false").lower()
        if stream not in ("true", "false") or (translate and stream == "true"):
            raise bad("'stream' must be true or false (transcriptions only)", "stream")
        sampling: dict[str, Any] = {"max_new_tokens": 1024}
        if form.get("temperature") not in (None, ""):
            try:
                t = float(str(form.get("temperature")))
            except ValueError:
                t = -1.0
            if not 0 <= t <= 1:
                raise bad("'temperature' must be a number in [0, 1]", "temperature")
            sampling["temperature"] = t
        req: dict[str, Any] = ({"task": "translate", "target_language": "en"} if translate else {"task": "asr"})
        req["sampling"] = sampling
        prompt = form.get("prompt")
        if prompt:  # a hint in the human turn, after the audio
            req["text"] = str(prompt)
        if stream == "true":
            release = self.take_slot()
            return SSEResponse(self._transcript_stream(req, raw),
                               on_disconnect=lambda: self.metrics.cancelled.labels("disconnect").inc(),
                               on_close=release)
        with self.slot():
            result = await race(self._final(req, raw), request.receive)
        if result is None:
            return Response(status_code=499)
        text = result["text"]
        u = result["usage"]
        if fmt == "text":
            return PlainTextResponse(text)
        tokens = {"type": "tokens", "input_tokens": u["prompt_tokens"], "output_tokens": u["completion_tokens"],
                  "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}
        if fmt == "json":
            return JSONResponse({"text": text, "usage": tokens})
        return JSONResponse({
            "task": "translate" if translate else "transcribe", "language": "english" if translate else language,
            "duration": seconds, "text": text,
            # one segment: the model gives no timestamps
            "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text,
                          "tokens": result["token_ids"], "temperature": sampling.get("temperature", 0.0),
                          "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}],
            "usage": {"type": "duration", "seconds": seconds},
        })

    async def _final(self, req: dict, audio: bytes) -> dict:
        async with contextlib.aclosing(self.events(req, audio)) as events:
            async for event in events:
                if event.get("type") == "result":
                    return event
        raise APIError(502, "the inference server sent no result", code="bad_gateway")

    async def _transcript_stream(self, req: dict, audio: bytes):
        try:
            async with contextlib.aclosing(self.events(req, audio)) as events:  # a hang-up cancels the stream now
                async for event in events:
                    if event.get("type") == "text" and event["text"]:
                        yield sse({"type": "transcript.text.delta", "delta": event["text"]})
                    elif event.get("type") == "result":
                        yield sse({"type": "transcript.text.done", "text": event["text"]})
        except APIError as exc:
            self.metrics.errors.labels(str(exc.status)).inc()
            yield sse(exc.body())
        yield b"data: [DONE]\n\n"

    async def add_voice(self, request: Request) -> Response:
        form = await request.form(max_part_size=self.cfg.max_body_bytes)
        name = form.get("name")
        if not isinstance(name, str) or not NAME.match(name) or name == "default":
            raise bad("'name' must be 1-64 letters, digits, '_', '-' or '.' (and not 'default')", "name")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise bad("'file' (a reference wav of the voice) is required", "file")
        raw = await upload.read()
        check_audio(raw, "file", 30.0)
        voice = self.voices.add(name, raw, await self.triton.register_voice(raw))
        return JSONResponse({"object": "voice", "id": voice.name, "voice_id": voice.voice_id,
                             "created": voice.created})

    async def list_voices(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"object": "voice", "id": n} for n in self.voices.names()]})

    async def delete_voice(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not self.voices.remove(name):
            raise APIError(404, f"no registered voice '{name}'", param="name", code="unknown_voice")
        return JSONResponse({"object": "voice.deleted", "id": name, "deleted": True})

    # ---- models, health, metrics, page ----------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model(self, request: Request) -> Response:
        check_model(request.path_params["model"])
        return JSONResponse(self._model())

    @staticmethod
    def _model() -> dict:
        return {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "stepfun"}

    async def health(self, request: Request) -> Response:
        if await self.triton.ready():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "detail": "Triton or its pipeline model is not ready"}, 503)

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")


def create_app(cfg: GatewayConfig, triton: TritonPipeline | None = None) -> Starlette:
    from stepaudio2_gateway.guard import Guard

    cfg.check()
    gw = Gateway(cfg, triton)
    routes = [
        Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
        Route("/v1/audio/transcriptions", gw.transcriptions, methods=["POST"]),
        Route("/v1/audio/translations", gw.translations, methods=["POST"]),
        Route("/v1/audio/voices", gw.add_voice, methods=["POST"]),
        Route("/v1/audio/voices", gw.list_voices, methods=["GET"]),
        Route("/v1/audio/voices/{name}", gw.delete_voice, methods=["DELETE"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gw.model, methods=["GET"]),
        Route("/health", gw.health, methods=["GET"]),
        Route("/metrics", gw.prometheus, methods=["GET"]),
        Route("/", gw.page, methods=["GET"]),
    ]

    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return JSONResponse(APIError(status, f"{request.method} {request.url.path}: not found or not allowed",
                                     code="not_found").body(), status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await gw.triton.close()

    app = Starlette(routes=routes, exception_handlers={APIError: api_error, 404: not_found, 405: not_found},
                    lifespan=lifespan)
    app.state.gateway = gw
    return Guard(app, gw)
