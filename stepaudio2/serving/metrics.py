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
ACTIVE = "stepaudio2_llm_active_sequences"  # = KV slots in use (one slot per running sequence)
SLOTS = "stepaudio2_llm_kv_slots_total"
TOOL_CALLS = "stepaudio2_tool_calls_total"
QUEUE = "stepaudio2_llm_queue_depth"
BATCH = "stepaudio2_llm_decode_batch_size"
INTER_TOKEN = "stepaudio2_inter_token_seconds"

# Speech (token2wav model and the streaming pipeline's speech routing), labels {model}.
TTFA = "stepaudio2_time_to_first_audio_seconds"  # histogram: request arrival -> first PCM chunk sent
CHUNK_GAP = "stepaudio2_audio_chunk_gap_seconds"  # histogram: time between consecutive PCM chunks of a stream
UNDERRUNS = "stepaudio2_audio_underruns_total"  # chunks that arrived after the previous audio ran out
AUDIO_SECONDS = "stepaudio2_audio_generated_seconds_total"  # seconds of 24 kHz audio produced
T2W_COMPUTE = "stepaudio2_token2wav_compute_seconds_total"  # wall time spent synthesising (RTF = this / audio)
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
            ACTIVE: MF(ACTIVE, "Sequences in the running decode batch (KV slots in use)", MF.GAUGE),
            SLOTS: MF(SLOTS, "KV slots configured (max concurrent sequences)", MF.GAUGE),
            QUEUE: MF(QUEUE, "Requests waiting for a KV slot", MF.GAUGE),
            BATCH: MF(BATCH, "Sequences per decode step", MF.HISTOGRAM),
        }
        f = self.families
        self.ttft = f[TTFT].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.inter_token = f[INTER_TOKEN].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.tokens = f[TOKENS].Metric(labels=labels)
        self.rejected = f[REJECTED].Metric(labels=labels)
        self.active = f[ACTIVE].Metric(labels=labels)
        self.slots_total = f[SLOTS].Metric(labels=labels)
        self.queue = f[QUEUE].Metric(labels=labels)
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
        }
        f = self.families
        self.audio_seconds = f[AUDIO_SECONDS].Metric(labels=labels)
        self.compute_seconds = f[T2W_COMPUTE].Metric(labels=labels)
        self.active = f[T2W_ACTIVE].Metric(labels=labels)
        self.batch = f[T2W_BATCH].Metric(labels=labels, buckets=BATCH_BUCKETS)
        self.queue = f[T2W_QUEUE].Metric(labels=labels)


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
