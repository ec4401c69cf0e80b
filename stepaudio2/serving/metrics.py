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
