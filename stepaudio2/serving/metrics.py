"""Custom Prometheus metrics of the models (served on Triton's /metrics next to its own nv_* series).

Names are the contract with k8s/ (recording rules, alerts, dashboards, autoscaling); change them only together.
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]

TTFT = "stepaudio2_time_to_first_token_seconds"
TOKENS = "stepaudio2_generated_tokens_total"
FINISHED = "stepaudio2_llm_requests_finished_total"
REJECTED = "stepaudio2_llm_requests_rejected_total"
SLOTS = "stepaudio2_llm_kv_slots_total"  # max_num_seqs; running/waiting/KV memory: vLLM's own series below
TOOL_CALLS = "stepaudio2_tool_calls_total"
BATCH = "stepaudio2_llm_decode_batch_size"  # tokens generated per engine step (sequences per decode step)
INTER_TOKEN = "stepaudio2_inter_token_seconds"

# Speech (token2wav model and the streaming pipeline's speech routing), labels {model}.
TTFA = "stepaudio2_time_to_first_audio_seconds"  # histogram: request arrival -> first PCM chunk sent
CHUNK_GAP = "stepaudio2_audio_chunk_gap_seconds"  # histogram: time between consecutive PCM chunks of a stream
UNDERRUNS = "stepaudio2_audio_underruns_total"  # chunks that arrived after the previous audio ran out
AUDIO_SECONDS = "stepaudio2_audio_generated_seconds_total"  # seconds of 24 kHz audio produced
T2W_COMPUTE = "stepaudio2_token2wav_compute_seconds_total"  # wall time spent synthesising (RTF = this / audio)
T2W_RESTARTED = "stepaudio2_token2wav_restarted_rounds_total"  # rounds of first chunks restarted for late joiners
T2W_ACTIVE = "stepaudio2_token2wav_active_streams"  # gauge: open synthesis streams (server-side state)
T2W_BATCH = "stepaudio2_token2wav_batch_streams"  # histogram: streams per batched estimator call
T2W_QUEUE = "stepaudio2_token2wav_queue_depth"  # gauge: chunks waiting for the synthesis loop
SESSIONS = "stepaudio2_pipeline_sessions"  # gauge: server-held multi-turn sessions


class LLMMetrics:
    """Keeps each MetricFamily alive as long as its metrics (python backend requirement)."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        MF = pb_utils.MetricFamily
        labels = {"model": model}
        self.families = {
            TTFT: MF(TTFT, "Time from request arrival to its first generated token", MF.HISTOGRAM),
            INTER_TOKEN: MF(INTER_TOKEN, "Time between consecutive generated tokens of a request", MF.HISTOGRAM),
            TOKENS: MF(TOKENS, "Generated tokens", MF.COUNTER),
            FINISHED: MF(FINISHED, "Finished generation requests by reason", MF.COUNTER),
            REJECTED: MF(REJECTED, "Requests rejected because the LLM was at capacity", MF.COUNTER),
            SLOTS: MF(SLOTS, "Sequences the engine runs at once (vLLM max_num_seqs)", MF.GAUGE),
            BATCH: MF(BATCH, "Sequences per decode step", MF.HISTOGRAM),
        }
        f = self.families
        self.ttft = f[TTFT].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.inter_token = f[INTER_TOKEN].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.tokens = f[TOKENS].Metric(labels=labels)
        self.rejected = f[REJECTED].Metric(labels=labels)
        self.slots_total = f[SLOTS].Metric(labels=labels)
        self.batch = f[BATCH].Metric(labels=labels, buckets=BATCH_BUCKETS)
        self._finished: dict[str, Any] = {}
        self._labels = labels

    def finished(self, reason: str) -> None:
        key = reason.split(":", 1)[0]  # "error: ..." -> "error" (bounded label values)
        if key not in self._finished:
            self._finished[key] = self.families[FINISHED].Metric(labels={**self._labels, "reason": key})
        self._finished[key].increment(1)


class PipelineMetrics:
    """Tool calls the model made, by tool name (bounded by the tools a deployment offers)."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        MF = pb_utils.MetricFamily
        self.family = MF(TOOL_CALLS, "Tool calls emitted by the model", MF.COUNTER)
        self._labels = {"model": model}
        self._by_name: dict[str, Any] = {}

    def tool_call(self, name: str) -> None:
        if name not in self._by_name:
            self._by_name[name] = self.family.Metric(labels={**self._labels, "tool": name[:64]})
        self._by_name[name].increment(1)


class Token2WavMetrics:
    """Synthesis side: audio produced, compute spent, open streams, batch sizes and queue depth."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        MF = pb_utils.MetricFamily
        labels = {"model": model}
        self.families = {
            AUDIO_SECONDS: MF(AUDIO_SECONDS, "Seconds of 24 kHz audio synthesised", MF.COUNTER),
            T2W_COMPUTE: MF(T2W_COMPUTE, "Wall seconds spent in synthesis rounds", MF.COUNTER),
            T2W_ACTIVE: MF(T2W_ACTIVE, "Open synthesis streams (server-side state)", MF.GAUGE),
            T2W_BATCH: MF(T2W_BATCH, "Streams (or offline requests) per batched estimator call", MF.HISTOGRAM),
            T2W_QUEUE: MF(T2W_QUEUE, "Synthesis jobs waiting for the scheduler", MF.GAUGE),
            T2W_RESTARTED: MF(T2W_RESTARTED, "Rounds of first chunks restarted so that a late first chunk joins them",
                              MF.COUNTER),
        }
        f = self.families
        self.audio_seconds = f[AUDIO_SECONDS].Metric(labels=labels)
        self.compute_seconds = f[T2W_COMPUTE].Metric(labels=labels)
        self.active = f[T2W_ACTIVE].Metric(labels=labels)
        self.batch = f[T2W_BATCH].Metric(labels=labels, buckets=BATCH_BUCKETS)
        self.queue = f[T2W_QUEUE].Metric(labels=labels)
        self.restarted_rounds = f[T2W_RESTARTED].Metric(labels=labels)


class SpeechDeliveryMetrics:
    """What a listener experiences: time to first audio, gaps between chunks, underruns."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        MF = pb_utils.MetricFamily
        labels = {"model": model}
        self.families = {
            TTFA: MF(TTFA, "Time from request arrival to its first audio chunk", MF.HISTOGRAM),
            CHUNK_GAP: MF(CHUNK_GAP, "Time between consecutive audio chunks of a stream", MF.HISTOGRAM),
            UNDERRUNS: MF(UNDERRUNS, "Audio chunks sent after the previous audio would have finished playing",
                          MF.COUNTER),
            SESSIONS: MF(SESSIONS, "Multi-turn sessions held by the server", MF.GAUGE),
        }
        f = self.families
        self.ttfa = f[TTFA].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.chunk_gap = f[CHUNK_GAP].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.underruns = f[UNDERRUNS].Metric(labels=labels)
        self.sessions = f[SESSIONS].Metric(labels=labels)


# vLLM's own series, under the names vLLM's Prometheus exporter gives them (counters with _total, as Triton's
# vLLM backend exports them), labels {model}.
VLLM_RUNNING = "vllm:num_requests_running"
VLLM_WAITING = "vllm:num_requests_waiting"
VLLM_KV_USAGE = "vllm:kv_cache_usage_perc"
VLLM_PREFIX_QUERIES = "vllm:prefix_cache_queries_total"  # counter, tokens looked up in the prefix cache
VLLM_PREFIX_HITS = "vllm:prefix_cache_hits_total"  # counter, tokens found there
VLLM_PROMPT_TOKENS = "vllm:prompt_tokens_total"
VLLM_GENERATION_TOKENS = "vllm:generation_tokens_total"
VLLM_TTFT = "vllm:time_to_first_token_seconds"
VLLM_ITL = "vllm:inter_token_latency_seconds"
VLLM_SUCCESS = "vllm:request_success_total"  # counter {finished_reason}
VLLM_PREEMPTIONS = "vllm:num_preemptions_total"
ITL_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5]


def _add(counter: Any, amount: float) -> None:
    if amount:
        counter.increment(amount)


class VllmMetrics:
    """vLLM's engine statistics on Triton's /metrics: a StatLoggerBase whose record() sets pb_utils metrics.

    vLLM's own PrometheusStatLogger writes to prometheus_client's registry inside the stub process, which
    Triton never serves; this logger is the bridge (what Triton's vLLM backend does too).
    """

    def __init__(self, pb_utils: Any, model: str, decode_batch: Any = None) -> None:
        MF = pb_utils.MetricFamily
        labels = {"model": model}
        self.decode_batch = decode_batch  # our BATCH histogram: tokens generated per engine step
        self.families = {
            VLLM_RUNNING: MF(VLLM_RUNNING, "Requests in the engine's running batch", MF.GAUGE),
            VLLM_WAITING: MF(VLLM_WAITING, "Requests waiting in the engine's queue", MF.GAUGE),
            VLLM_KV_USAGE: MF(VLLM_KV_USAGE, "KV-cache usage, 1 = full", MF.GAUGE),
            VLLM_PREFIX_QUERIES: MF(VLLM_PREFIX_QUERIES, "Prompt tokens looked up in the prefix cache", MF.COUNTER),
            VLLM_PREFIX_HITS: MF(VLLM_PREFIX_HITS, "Prompt tokens found in the prefix cache", MF.COUNTER),
            VLLM_PROMPT_TOKENS: MF(VLLM_PROMPT_TOKENS, "Prefilled prompt tokens", MF.COUNTER),
            VLLM_GENERATION_TOKENS: MF(VLLM_GENERATION_TOKENS, "Generated tokens", MF.COUNTER),
            VLLM_PREEMPTIONS: MF(VLLM_PREEMPTIONS, "Requests preempted (KV cache full)", MF.COUNTER),
            VLLM_TTFT: MF(VLLM_TTFT, "Engine time to first token", MF.HISTOGRAM),
            VLLM_ITL: MF(VLLM_ITL, "Engine time between tokens of a request", MF.HISTOGRAM),
            VLLM_SUCCESS: MF(VLLM_SUCCESS, "Finished requests by finish reason", MF.COUNTER),
        }
        f = self.families
        self.running = f[VLLM_RUNNING].Metric(labels=labels)
        self.waiting = f[VLLM_WAITING].Metric(labels=labels)
        self.kv_usage = f[VLLM_KV_USAGE].Metric(labels=labels)
        self.prefix_queries = f[VLLM_PREFIX_QUERIES].Metric(labels=labels)
        self.prefix_hits = f[VLLM_PREFIX_HITS].Metric(labels=labels)
        self.prompt_tokens = f[VLLM_PROMPT_TOKENS].Metric(labels=labels)
        self.generation_tokens = f[VLLM_GENERATION_TOKENS].Metric(labels=labels)
        self.preemptions = f[VLLM_PREEMPTIONS].Metric(labels=labels)
        self.ttft = f[VLLM_TTFT].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.itl = f[VLLM_ITL].Metric(labels=labels, buckets=ITL_BUCKETS)
        self._success: dict[str, Any] = {}
        self._labels = labels
        self._last: dict[int, float] = {}  # id(gauge) -> value last sent

    def _set(self, gauge: Any, value: float) -> None:
        if self._last.get(id(gauge)) != value:
            gauge.set(value)
            self._last[id(gauge)] = value

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        # Called every engine step, and every metric call is a round trip to the server: gauges are sent when
        # they change and counters when they move.
        if scheduler_stats is not None:
            self._set(self.running, scheduler_stats.num_running_reqs)
            self._set(self.waiting, scheduler_stats.num_waiting_reqs)
            self._set(self.kv_usage, scheduler_stats.kv_cache_usage)
            pc = scheduler_stats.prefix_cache_stats
            if pc is not None:
                _add(self.prefix_queries, pc.queries)
                _add(self.prefix_hits, pc.hits)
        if iteration_stats is not None:
            _add(self.prompt_tokens, iteration_stats.num_prompt_tokens)
            _add(self.generation_tokens, iteration_stats.num_generation_tokens)
            if self.decode_batch is not None and iteration_stats.num_generation_tokens:
                self.decode_batch.observe(iteration_stats.num_generation_tokens)
            _add(self.preemptions, iteration_stats.num_preempted_reqs)
            for t in iteration_stats.time_to_first_tokens_iter:
                self.ttft.observe(t)
            for t in iteration_stats.inter_token_latencies_iter:
                self.itl.observe(t)
            for done in iteration_stats.finished_requests:
                reason = str(getattr(done.finish_reason, "name", done.finish_reason)).lower()
                if reason not in self._success:
                    self._success[reason] = self.families[VLLM_SUCCESS].Metric(
                        labels={**self._labels, "finished_reason": reason})
                self._success[reason].increment(1)

    def logger_factory(self, vllm_config: Any, engine_index: int = 0):
        """A vLLM per-engine StatLoggerFactory feeding this object."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class TritonStatLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                sink.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return TritonStatLogger(vllm_config, engine_index)
