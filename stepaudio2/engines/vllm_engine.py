"""The pieces of the `llm` model that do not need Triton: engine settings from config.pbtxt parameters, the
prompt embeddings vLLM is given, the sampling mapping, and the bookkeeping of live requests.

Why prompt embeddings and not a registered Step-Audio-2 model: the audio encoder is already its own Triton
model (dynamically batched, shared by every pipeline), so the LLM only needs a stock Qwen2 decoder; vLLM runs
that unmodified on CPU and GPU builds, and nothing of ours patches vLLM's model registry.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stepaudio2.engines.sampling import SamplingParams
from stepaudio2.errors import InvalidInputError, QueueFullError


@dataclass(frozen=True)
class EngineSettings:
    """`llm/config.pbtxt` parameters (CPU defaults there; the chart's GPU values override them)."""

    kv_cache_space_gib: int = 1  # CPU: VLLM_CPU_KVCACHE_SPACE (whole GiB); GPU: unused (gpu_memory_utilization)
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 16
    max_queue: int = 32  # requests waiting beyond max_num_seqs before UNAVAILABLE
    max_model_len: int = 8192
    max_num_batched_tokens: int = 8192
    dtype: str = "float32"
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    executor: str = "uni"  # "uni": the model runs in the engine-core process; "mp": in a worker process of its own
    # The engine core's OpenMP threads spin this many times before they sleep (libgomp's GOMP_SPINCOUNT; roughly
    # 0.1 ms for 10,000). The launcher makes every other server process sleep at once (OMP_WAIT_POLICY=PASSIVE).
    omp_spin_count: int = 10000
    # Tokens per streamed response (vLLM's stream_interval; the first and the last are sent at once): fewer, larger
    # responses cost less per token on the way to the pipeline, most where that way is a gRPC hop (an LLM pool).
    stream_interval: int = 1
    # Responses the model sends per engine step, all requests together (0: every token as it comes). Each token
    # event costs about 1.4 ms of CPU on its way to the client (llm stub, tritonserver, pipeline stub, client), taken
    # from the cores vLLM computes on; with many requests live, each response carries ceil(live / this) tokens.
    responses_per_step: int = 4
    python_executable: str = ""  # written by the launcher: vLLM spawns its engine-core process with it



def build_prompt_embeds(
    ids: np.ndarray, table: np.ndarray, vocab_size: int, audio_embeds: np.ndarray | None, audio_spans: np.ndarray | None
):
    """(T, H) float32 torch tensor: token embeddings with audio rows written over the `<audio_patch>` spans."""
    import torch

    from stepaudio2.engines.llm import splice_audio

    if ids.size == 0:
        raise InvalidInputError("'input_ids' is empty")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise InvalidInputError(f"'input_ids' has ids outside [0, {vocab_size})")
    chunks, spans = [], []
    if audio_spans is not None and audio_spans.size:
        spans = [(int(a), int(b)) for a, b in audio_spans.reshape(-1, 2)]
        if audio_embeds is None or audio_embeds.ndim != 2:
            raise InvalidInputError("'audio_spans' given without 2-D 'audio_embeds' [N, hidden]")
        if audio_embeds.shape[1] != table.shape[1]:
            raise InvalidInputError(f"'audio_embeds' rows have width {audio_embeds.shape[1]}, not {table.shape[1]}")
        if any(a < 0 or b < 0 or a + b > ids.size for a, b in spans):
            raise InvalidInputError("'audio_spans' point outside 'input_ids'")
        if sum(b for _, b in spans) != audio_embeds.shape[0]:
            raise InvalidInputError("'audio_spans' counts do not add up to the rows of 'audio_embeds'")
        offsets = np.cumsum([0] + [b for _, b in spans])
        chunks = [audio_embeds[offsets[k] : offsets[k + 1]] for k in range(len(spans))]
    embeds = np.asarray(table[ids], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(splice_audio(embeds, chunks, spans), dtype=np.float32))


def vllm_sampling(params: SamplingParams, stops: Iterable[int]):
    """Our request sampling -> vLLM's SamplingParams (DELTA outputs, token ids only, no detokenizing)."""
    from vllm import SamplingParams as VllmSampling
    from vllm.sampling_params import RequestOutputKind

    return VllmSampling(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        repetition_penalty=params.repetition_penalty,
        max_tokens=params.max_new_tokens,
        seed=params.seed,
        stop_token_ids=sorted(set(stops)),
        output_kind=RequestOutputKind.DELTA,
        detokenize=False,
    )


async def make_engine(model_dir: Path, settings: EngineSettings, stat_logger_factory: Callable | None = None):
    """vLLM's AsyncLLM on the Qwen2 folder written by export (run on the event loop that will serve it)."""
    import multiprocessing

    if settings.python_executable:
        multiprocessing.set_executable(settings.python_executable)
    # vLLM's CPU backend reads the KV space only from its environment; set it from the config parameter.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_space_gib)
    # Read by the spawned engine core's libgomp at start. libgomp's default spin (300,000, about 3 ms) keeps the
    # threads busy between decode steps and took the cores from token2wav and the stubs (a voice-chat stream's
    # first audio came 1.5x later on one server, 2.4x in a split front); sleeping at once cost 15-30 % of vLLM's
    # tokens/s. A short spin keeps the threads hot within a step and asleep between steps (README, "OpenMP threads").
    os.environ.pop("OMP_WAIT_POLICY", None)
    os.environ["GOMP_SPINCOUNT"] = str(settings.omp_spin_count)
    if settings.executor == "uni":
        # vLLM's CPU platform turns a "uni" executor into "mp" (a worker process besides the engine core) unless
        # this is off; AsyncLLM still runs its engine core in a process of its own either way.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(model_dir),
        skip_tokenizer_init=True,
        enable_prompt_embeds=True,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enforce_eager=settings.enforce_eager,
        enable_prefix_caching=settings.enable_prefix_caching,
        distributed_executor_backend=settings.executor,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        disable_log_stats=False,
        stream_interval=settings.stream_interval,
    )
    factories = [stat_logger_factory] if stat_logger_factory else None
    return AsyncLLM.from_engine_args(args, stat_loggers=factories)


def tokens_per_response(live: int, responses_per_step: int) -> int:
    """Tokens to gather before a request's next response, so that `live` requests together send about
    `responses_per_step` responses per engine step (one token each while few are live; 0 turns this off)."""
    if responses_per_step <= 0:
        return 1
    return max(1, -(-live // responses_per_step))


class RequestTracker:
    """Live requests of the model: admission against capacity and cancellation marks.

    Admission happens on Triton's thread, the rest on the loop thread; a lock keeps the two consistent.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._admitted: set[str] = set()
        self._requests: dict[str, Any] = {}  # request id -> Triton request (for is_cancelled)
        self._cancelled: set[str] = set()

    def admit(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._admitted:
                raise InvalidInputError(f"'sequence_id' {request_id!r} is already generating")
            if len(self._admitted) >= self.capacity:
                raise QueueFullError(f"the LLM is at capacity ({self.capacity} sequences running or waiting)")
            self._admitted.add(request_id)

    def start(self, request_id: str, request: Any) -> None:
        with self._lock:
            self._requests[request_id] = request

    @property
    def live(self) -> int:
        """Requests generating now (started and not finished)."""
        return len(self._requests)

    def finish(self, request_id: str) -> None:
        with self._lock:
            self._admitted.discard(request_id)
            self._requests.pop(request_id, None)
            self._cancelled.discard(request_id)

    def cancel(self, request_id: str) -> bool:
        """Mark a live request cancelled; False when it is not live (already finished or unknown)."""
        with self._lock:
            if request_id not in self._requests:
                return False
            self._cancelled.add(request_id)
            return True

    def is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    def newly_cancelled(self) -> list[str]:
        """Requests whose client left since the last call (asks Triton; call from the loop thread only)."""
        with self._lock:
            live = [(rid, req) for rid, req in self._requests.items() if rid not in self._cancelled]
        gone = [rid for rid, req in live if req.is_cancelled()]
        with self._lock:
            self._cancelled.update(r for r in gone if r in self._requests)
        return gone
