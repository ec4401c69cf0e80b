"""End-to-end health: a tiny real request through each stage, cached for a few seconds, served over HTTP.

Triton's /v2/health/ready says only that the server process and its models loaded; it stayed 200 while every
request failed (dead stub) or hung (an LLM thread blocked on a departed caller). This check sends real work:
a one-token ASR request through `pipeline` (audio_encoder + llm + pipeline) and, when speech is served, the
default voice from `voice_prompt` and a few codes through `token2wav`, each under a deadline. A server of a split
deployment (`serve --models`) probes only what it serves: an LLM pool answers a one-token raw `llm` request, a
token2wav pool the speech probe, a front the pipeline probe (which crosses to the pools). The launcher adds
its own process-level facts (server alive, every stub alive) and serves the verdict on
`/health/live` and `/health/ready` for the chart's probes.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger("stepaudio2.health")

PROBE_REQUEST = {"task": "asr", "sampling": {"max_new_tokens": 1, "temperature": 0.0}}


@dataclass
class StageResult:
    stage: str
    ok: bool
    seconds: float
    error: str = ""


@dataclass
class HealthReport:
    ok: bool
    checked_at: float  # time.time()
    stages: list[StageResult] = field(default_factory=list)
    reason: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _probe_wav(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """A short quiet tone as 16-bit wav (pure silence is fine too; a tone keeps the front end honest)."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.05 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def probes_for(models: set[str] | None, speech: bool) -> list[str]:
    """The probes for a server serving `models` (None: every model; `speech`: token2wav is in its repository)."""
    served = (lambda m: models is None or m in models)  # noqa: E731
    probes = ["pipeline"] if served("pipeline") else (["llm"] if served("llm") else [])
    if speech and served("token2wav") and served("voice_prompt"):
        probes.append("voice_prompt+token2wav")
    return probes


def probe_llm(grpc_url: str, timeout_s: float) -> None:
    """One greedy token from a two-token prompt, straight to the (decoupled) llm model; raises unless a token
    arrives within `timeout_s`. Also tells the supervisor whether the LLM still answers after a caller died."""
    import queue

    import tritonclient.grpc as grpcclient

    answers: queue.Queue = queue.Queue()
    ids = grpcclient.InferInput("input_ids", [2], "INT64")
    ids.set_data_from_numpy(np.array([1, 2], np.int64))
    sampling = grpcclient.InferInput("sampling", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps(PROBE_REQUEST["sampling"]).encode()], np.object_))
    g = grpcclient.InferenceServerClient(grpc_url)
    tokens = 0
    try:
        g.start_stream(callback=lambda result, error: answers.put((result, error)))
        g.async_stream_infer("llm", [ids, sampling], enable_empty_final_response=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result, error = answers.get(timeout=max(0.001, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"llm: no answer within {timeout_s} s") from None
            if error is not None:
                raise RuntimeError(f"llm: {error.message() if hasattr(error, 'message') else error}")
            out = result.as_numpy("token_ids")
            tokens += 0 if out is None else out.size
            if result.get_response().parameters.get("triton_final_response"):
                break
    finally:
        g.stop_stream(cancel_requests=True)
        g.close()
    if tokens == 0:
        raise RuntimeError("llm finished without a token")


class EndToEndCheck:
    """Runs the stage probes against one server over gRPC; `get()` answers from a cache of `cache_s` seconds."""

    def __init__(self, grpc_url: str, speech: bool, timeout_s: float = 10.0, cache_s: float = 3.0,
                 models: set[str] | None = None) -> None:
        self.grpc_url = grpc_url
        self.probes = probes_for(models, speech)
        if not self.probes:
            raise ValueError(f"nothing to probe on a server serving {sorted(models or [])}")
        self.timeout_s = timeout_s
        self.cache_s = cache_s
        self._wav = _probe_wav()
        self._lock = threading.Lock()
        self._last: HealthReport | None = None

    def _timed(self, stage: str, fn: Callable[[], None]) -> StageResult:
        start = time.perf_counter()
        try:
            fn()
            return StageResult(stage, True, time.perf_counter() - start)
        except Exception as exc:  # every failure is a verdict, never an exception of the check itself
            message = getattr(exc, "message", None)
            text = message() if callable(message) else (message or str(exc))
            return StageResult(stage, False, time.perf_counter() - start, f"{type(exc).__name__}: {text}"[:300])

    def _pipeline(self) -> None:
        from stepaudio2_client import StepAudio2Client

        with StepAudio2Client(self.grpc_url) as client:
            result = client.generate(PROBE_REQUEST, self._wav, timeout=self.timeout_s)
        if not result.get("token_ids"):
            raise RuntimeError("pipeline answered without tokens")

    def _llm(self) -> None:
        probe_llm(self.grpc_url, self.timeout_s)

    def _speech(self) -> None:
        import tritonclient.grpc as grpcclient

        g = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            voice = g.infer("voice_prompt", [], client_timeout=self.timeout_s)
            inputs = []
            for name, dtype in (("op", "BYTES"), ("codes", "INT64"), ("prompt_tokens", "INT64"),
                                ("prompt_mel", "FP32"), ("prompt_xvector", "FP32")):
                if name == "op":
                    value = np.array([[b"offline"]], dtype=np.object_)
                elif name == "codes":
                    value = np.zeros((1, 4), np.int64)
                else:
                    value = voice.as_numpy(name)[None]
                t = grpcclient.InferInput(name, list(value.shape), dtype)
                t.set_data_from_numpy(value)
                inputs.append(t)
            pcm = g.infer("token2wav", inputs, client_timeout=self.timeout_s).as_numpy("pcm")
            if pcm is None or pcm.size == 0 or not np.isfinite(pcm).all():
                raise RuntimeError("token2wav answered without finite audio")
        finally:
            g.close()

    def run(self) -> HealthReport:
        run = {"pipeline": self._pipeline, "llm": self._llm, "voice_prompt+token2wav": self._speech}
        stages = [self._timed(probe, run[probe]) for probe in self.probes]
        bad = [s for s in stages if not s.ok]
        report = HealthReport(ok=not bad, checked_at=time.time(), stages=stages,
                              reason="; ".join(f"{s.stage}: {s.error}" for s in bad))
        with self._lock:
            self._last = report
        return report

    def get(self) -> HealthReport:
        with self._lock:
            last = self._last
        if last is not None and time.time() - last.checked_at < self.cache_s:
            return last
        return self.run()


class HealthState:
    """What the probes see: set by the supervisor, read by the HTTP handler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.live = True  # false once the supervisor gave up (the pod should be restarted)
        self.report = HealthReport(ok=False, checked_at=time.time(), reason="starting")
        self.restarts = 0

    def set(self, report: HealthReport | None = None, live: bool | None = None) -> None:
        with self._lock:
            if report is not None:
                self.report = report
            if live is not None:
                self.live = live

    def snapshot(self) -> dict:
        with self._lock:
            return {"live": self.live, "ready": self.report.ok, "restarts": self.restarts,
                    **self.report.to_json()}


def serve_health(state: HealthState, host: str, port: int) -> ThreadingHTTPServer:
    """Start the probe endpoint in a daemon thread: GET /health/live and /health/ready (200 or 503, JSON)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            snap = state.snapshot()
            if self.path.rstrip("/") == "/health/live":
                ok = snap["live"]
            elif self.path.rstrip("/") in ("/health/ready", "/health"):
                ok = snap["live"] and snap["ready"]
            else:
                self.send_error(404)
                return
            body = json.dumps(snap).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # probes every few seconds would flood the log
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="health-http", daemon=True).start()
    return httpd
