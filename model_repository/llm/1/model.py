"""Triton adapter for the LLM on vLLM's async engine (paged KV, continuous batching, vLLM's sampler).

Audio reaches vLLM as prompt embeddings: the token embeddings of `input_ids` with the audio encoder's output
written over the `<audio_patch>` spans. Every response, error and cancellation check runs on one asyncio thread
(this Triton's Python backend crashed when several threads of one stub sent at once).
"""

from __future__ import annotations

import locale

# The stub's interpreter starts with an ASCII locale and ignores PYTHONUTF8/LANG; importing vLLM reads UTF-8
# files, so switch before any import that reaches vLLM (ecosystem R6).
locale.setlocale(locale.LC_ALL, "C.UTF-8")

import asyncio  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from stepaudio2.engines.vllm_engine import (  # noqa: E402
    EngineSettings,
    RequestTracker,
    build_prompt_embeds,
    make_engine,
    tokens_per_response,
    vllm_sampling,
)
from stepaudio2.errors import InvalidInputError, QueueFullError  # noqa: E402
from stepaudio2.serving.metrics import LLMMetrics, VllmMetrics  # noqa: E402
from stepaudio2.serving.parameters import ModelParameters  # noqa: E402
from stepaudio2.serving.triton_utils import (  # noqa: E402
    bytes_tensor,
    bytes_value,
    hold_until_exit,
    json_value,
    optional_input,
    required_input,
    triton_error,
)
from stepaudio2.serving.validation import LLMLimits, check_llm_inputs  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# How often the loop asks Triton whether a client left: one round trip per live request each time (a gRPC client
# of this model; the pipeline cancels by a control request at once).
CANCEL_POLL_S = 0.2


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from stepaudio2.config import load_config
        from stepaudio2.engines.sampling import SamplingParams
        from stepaudio2.request import stop_ids
        from stepaudio2.text import StepAudio2Tokenizer

        self._SamplingParams, self._stop_ids = SamplingParams, stop_ids
        params = ModelParameters.from_args(args)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.settings = EngineSettings(
            kv_cache_space_gib=params.integer("kv_cache_space_gib", minimum=1),
            gpu_memory_utilization=params.number("gpu_memory_utilization", minimum=0.0),
            max_num_seqs=params.integer("max_num_seqs", minimum=1),
            max_queue=params.integer("max_queue", minimum=0),
            max_model_len=params.integer("max_model_len", minimum=2),
            max_num_batched_tokens=params.integer("max_num_batched_tokens", minimum=1),
            dtype=params.choice("dtype", ("float32", "bfloat16", "float16")),
            enforce_eager=params.flag("enforce_eager"),
            enable_prefix_caching=params.flag("enable_prefix_caching"),
            executor=params.choice("executor", ("uni", "mp")),
            omp_spin_count=params.integer("omp_spin_count", minimum=0),
            stream_interval=params.integer("stream_interval", minimum=1),
            responses_per_step=params.integer("responses_per_step", minimum=0),
            python_executable=params.text("python_executable"),
        )
        self.config = load_config(version_dir)
        self.tokenizer = StepAudio2Tokenizer.from_dir(version_dir)
        self.vocab_size = self.config.text.vocab_size
        self.table = np.load(version_dir / "embed_tokens.npy", mmap_mode="r")
        # 0: no cap below the engine's max_model_len (which is checked on its own in _parse).
        max_prompt = params.integer("max_prompt_tokens", minimum=0)
        self.limits = LLMLimits(vocab_size=self.vocab_size, hidden_size=int(self.table.shape[1]),
                                context=self.settings.max_model_len, max_prompt_tokens=max_prompt or None)
        self.metrics = LLMMetrics(pb_utils, args["model_name"])
        self.metrics.slots_total.set(self.settings.max_num_seqs)
        self.vllm_metrics = VllmMetrics(pb_utils, args["model_name"], decode_batch=self.metrics.batch)
        hold_until_exit(self.metrics, self.vllm_metrics)  # their teardown crashes this backend's stubs
        self.tracker = RequestTracker(self.settings.max_num_seqs + self.settings.max_queue)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llm-vllm-loop", daemon=True)
        self.thread.start()
        # The engine is built on the loop: vLLM's output handler task lives there.
        self.engine = self._call(make_engine(version_dir / "qwen2", self.settings, self.vllm_metrics.logger_factory))
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._watch_cancellations()))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    # ---- execute: parse on Triton's thread, everything else on the loop ------------------------------------------

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            cancel = bytes_value(optional_input(pb_utils, request, "cancel"))
            if cancel is not None:  # control request: abort that sequence, answer at once
                self._on_loop(self._cancel(cancel.decode(), sender))
                continue
            try:
                job = self._parse(request)
                self.tracker.admit(job["request_id"])
            except Exception as exc:
                self._on_loop(self._fail(sender, exc, rejected=isinstance(exc, QueueFullError)))
                continue
            self._on_loop(self._generate(request, sender, **job))
        return None

    def _on_loop(self, coro) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def _parse(self, request) -> dict:
        # Checked per request before anything reaches the engine: a NaN or wrong-width embedding row, an id
        # outside the vocabulary or a bad span would otherwise fail (or poison) the shared engine step.
        checked = check_llm_inputs(
            required_input(pb_utils, request, "input_ids"), optional_input(pb_utils, request, "audio_embeds"),
            optional_input(pb_utils, request, "audio_spans"), self.limits)
        ids = checked.ids
        if ids.size >= self.settings.max_model_len:
            raise InvalidInputError(
                f"'input_ids' has {ids.size} tokens; the engine's max_model_len is {self.settings.max_model_len}")
        audio_embeds = np.concatenate(checked.chunks) if checked.chunks else None
        audio_spans = np.asarray(checked.spans, np.int64).reshape(-1, 2) if checked.spans else None
        embeds = build_prompt_embeds(ids, self.table, self.vocab_size, audio_embeds, audio_spans)
        sampling = self._SamplingParams.from_dict(
            json_value(optional_input(pb_utils, request, "sampling"), "sampling") or {})
        stops = self._stop_ids(self.tokenizer, self.config, sampling)
        seq_id = (bytes_value(optional_input(pb_utils, request, "sequence_id")) or b"").decode()
        return {"request_id": seq_id or uuid.uuid4().hex, "embeds": embeds,
                "params": vllm_sampling(sampling, stops)}

    # ---- on the loop thread ------------------------------------------------------------------------------------

    async def _generate(self, request, sender, request_id: str, embeds, params) -> None:
        import time

        arrived, last, first = time.perf_counter(), None, True
        reason = "error"
        pending: list[int] = []
        self.tracker.start(request_id, request)
        try:
            async for out in self.engine.generate({"prompt_embeds": embeds}, params, request_id=request_id):
                if self.tracker.is_cancelled(request_id):
                    break
                pending += out.outputs[0].token_ids  # DELTA: only what is new (several when we fell behind)
                # The first token goes at once (TTFT); later ones gather while many requests are live, so the
                # path to the client carries fewer, larger responses when it would fall behind.
                due = first or out.finished or len(pending) >= tokens_per_response(
                    self.tracker.live, self.settings.responses_per_step)
                if pending and due:
                    now = time.perf_counter()
                    (self.metrics.ttft if first else self.metrics.inter_token).observe(now - (last or arrived))
                    first, last = False, now
                    self.metrics.tokens.increment(len(pending))
                    sender.send(pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor("token_ids", np.asarray(pending, np.int64))]))
                    pending = []
                if out.finished:
                    reason = {"stop": "stop", "length": "length"}.get(out.outputs[0].finish_reason, "cancelled")
            if self.tracker.is_cancelled(request_id):
                reason = "cancelled"
                await self.engine.abort(request_id)
            sender.send(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("token_ids", np.zeros(0, np.int64)), bytes_tensor(pb_utils, "finish_reason", reason),
            ]), flags=FINAL)
        except Exception as exc:  # engine errors end this stream only
            reason = "error"
            if type(exc).__name__ == "VLLMValidationError":  # vLLM rejected the request itself
                exc = InvalidInputError(str(exc))
            sender.send(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)), flags=FINAL)
        finally:
            self.tracker.finish(request_id)
            self.metrics.finished(reason)

    async def _cancel(self, request_id: str, sender) -> None:
        if self.tracker.cancel(request_id):
            await self.engine.abort(request_id)  # frees its KV blocks now, not at the next token
        sender.send(flags=FINAL)

    async def _fail(self, sender, exc: BaseException, rejected: bool = False) -> None:
        if rejected:  # counted here: a metric update talks to the server, and only this thread may
            self.metrics.rejected.increment(1)
        sender.send(pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)), flags=FINAL)

    async def _watch_cancellations(self) -> None:
        """Clients that left (gRPC cancel, disconnect): abort their sequences so the KV blocks free."""
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            for request_id in self.tracker.newly_cancelled():
                await self.engine.abort(request_id)

    def finalize(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
