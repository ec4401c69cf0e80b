"""Triton adapter for token2wav: the dynamic batcher delivers concurrent requests together; their jobs go to the
core SynthesisScheduler in one atomic step, so one round batches the chunks of all their streams into one
estimator call per Euler step.

execute() hands the jobs over and returns at once; each request is answered through its response sender when its
job is done (one response with the final flag: the model stays non-decoupled, a plain unary call for clients).
So requests keep arriving while a round runs, and a late stream's first chunk can join a round that has just
started (SynthesisScheduler restarts it). Every response and metric update goes out on one thread, the
instance's server thread: this Python backend crashed when several threads of one stub sent at once.
"""

from __future__ import annotations

import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from stepaudio2.errors import InvalidInputError
from stepaudio2.serving.metrics import Token2WavMetrics
from stepaudio2.serving.parameters import ModelParameters
from stepaudio2.serving.synthesis import RoundStats, SynthesisScheduler
from stepaudio2.serving.triton_utils import (
    RequestWorker,
    bytes_tensor,
    bytes_value,
    hold_until_exit,
    log_failure,
    optional_input,
    required_input,
    triton_error,
)
from stepaudio2.serving.validation import check_prompt_features
from stepaudio2.token2wav.prompt import VoicePrompt


def _item(request, name: str, required: bool = False) -> np.ndarray | None:
    """One request's input without its batch dimension of 1."""
    value = (required_input if required else optional_input)(pb_utils, request, name)
    return None if value is None else value[0]


def _text(request, name: str) -> str:
    return (bytes_value(_item(request, name)) or b"").decode("utf-8", "replace")


def _prompt(request, flow_cfg) -> VoicePrompt:
    """The request's voice prompt, checked here (token range, shapes, x-vector width, finiteness) so a bad one
    fails alone instead of inside the scheduler's batched estimator call."""
    tokens = _item(request, "prompt_tokens", True).astype(np.int64).reshape(-1)
    mel = _item(request, "prompt_mel", True).astype(np.float32)
    xvector = _item(request, "prompt_xvector", True).astype(np.float32).reshape(-1)
    check_prompt_features(tokens, mel, xvector, speech_vocab=flow_cfg.vocab_size,
                          xvector_dim=flow_cfg.spk_embed_dim, mel_bins=flow_cfg.output_size)
    return VoicePrompt(tokens=tokens, xvector=xvector, mel=mel, key=_text(request, "voice_id") or None)


def _codes(request) -> tuple[np.ndarray, bool]:
    """A push's (codes, last); no codes is an empty push."""
    last, codes = _item(request, "last"), _item(request, "codes")
    return (np.zeros(0, np.int64) if codes is None else codes.reshape(-1),
            bool(last is not None and last.size and last.reshape(-1)[0]))


def _seed(request) -> int:
    seed = _item(request, "seed")
    return 0 if seed is None or seed.size == 0 else int(seed.reshape(-1)[0])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        from stepaudio2.token2wav.synth import Token2Wav

        params = ModelParameters.from_args(args)
        if params.integer("torch_threads", minimum=0) > 0:
            torch.set_num_threads(params.integer("torch_threads"))
        # "torch": the reference modules; otherwise the exported graphs on that runtime.
        engine = params.choice("engine", ("torch", "onnx-cpu", "onnx-cuda", "tensorrt"))
        t2w = Token2Wav(params.path("model_dir"), engine=engine)
        self.flow_cfg = t2w.flow.cfg
        self._warm(t2w, self.flow_cfg)
        self.metrics = Token2WavMetrics(pb_utils, args["model_name"])
        hold_until_exit(self.metrics)  # its teardown crashes this backend's stubs
        self.server = RequestWorker(_run_logged, "token2wav-server")  # runs the calls it is given, in order
        self.scheduler = SynthesisScheduler(
            t2w,
            batching=params.flag("batching"),
            max_batch=params.integer("max_batch_streams", minimum=1),
            max_streams=params.integer("max_streams", minimum=1),
            stream_ttl_s=params.number("stream_ttl_s", minimum=0),
            join_until_step=params.integer("join_until_step", minimum=-1),
            max_restarts=params.integer("max_restarts", minimum=0),
            on_round=self._on_round,
        )

    @staticmethod
    def _warm(t2w, cfg) -> None:
        """First-request work before ready (lazy allocations, first estimator and vocoder runs): one short offline
        synthesis and one streamed chunk with a neutral prompt."""
        prompt = VoicePrompt(tokens=np.zeros(4, np.int64), xvector=np.zeros(cfg.spk_embed_dim, np.float32),
                             mel=np.zeros((8, cfg.output_size), np.float32), key=None)
        t2w.offline(np.zeros(8, np.int64), prompt)
        t2w.push(t2w.start_stream(prompt), np.zeros(8, np.int64), last=True)

    def _on_round(self, stats: RoundStats) -> None:  # scheduler thread
        self.server.submit(self._record_round, stats)

    def _record_round(self, stats: RoundStats) -> None:  # server thread
        self.metrics.compute_seconds.increment(stats.compute_s)
        if stats.kind == "restarted":
            self.metrics.restarted_rounds.increment(1)
        else:
            self.metrics.batch.observe(stats.estimator_batch)
            self.metrics.audio_seconds.increment(stats.audio_s)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.active.set(self.scheduler.active_streams)
        self.metrics.queue.set(self.scheduler.queue_depth)

    def _submit(self, request, sender) -> None:
        """Start the request's work; it is answered through `sender` (now, or when the scheduler is done)."""
        op = _text(request, "op")
        stream_id = _text(request, "stream_id")
        if op == "start":
            prompt, seed = _prompt(request, self.flow_cfg), _seed(request)
            if _item(request, "codes") is None:
                sid = self.scheduler.start_stream(prompt, seed=seed)
                self._answer(sender, [bytes_tensor(pb_utils, "stream_id", sid)])
                return
            # A start with codes also pushes them, and answers the stream id with the pcm. The job cannot run
            # before open_stream returns the id (execute holds the scheduler); the event makes that explicit.
            opened: list[str] = []
            ready = threading.Event()

            def started(pcm, error) -> None:
                ready.wait()
                self._done(sender, pcm, error, opened[0] if opened else None)

            try:
                opened.append(self.scheduler.open_stream(prompt, seed, *_codes(request), started))
            finally:
                ready.set()
            return
        if op == "cancel":
            self.scheduler.cancel(stream_id)  # unknown ids are fine: the stream may have just finished
            self._answer(sender, [])
            return
        done = lambda pcm, error: self._done(sender, pcm, error)  # noqa: E731
        if op == "push":
            if not stream_id:
                raise InvalidInputError("op 'push' needs a stream_id")
            self.scheduler.push(stream_id, *_codes(request), done)
        elif op == "offline":
            codes = _item(request, "codes", True).reshape(-1)
            self.scheduler.offline(codes, _prompt(request, self.flow_cfg), _seed(request), done)
        else:
            raise InvalidInputError(f"unknown op '{op[:32]}' (start, push, cancel or offline)")

    def _done(self, sender, pcm: np.ndarray | None, error: BaseException | None, stream_id: str | None = None
              ) -> None:
        """A job's result (scheduler thread): its response goes out on the server thread."""
        if error is not None:
            self._fail(sender, error)
            return
        outputs = [pb_utils.Tensor("pcm", pcm[None])]
        if stream_id is not None:
            outputs.append(bytes_tensor(pb_utils, "stream_id", stream_id))
        self._answer(sender, outputs)

    def _answer(self, sender, outputs: list) -> None:
        self.server.submit(self._reply, sender, pb_utils.InferenceResponse(output_tensors=outputs))

    def _fail(self, sender, exc: BaseException) -> None:
        self.server.submit(self._reply, sender, pb_utils.InferenceResponse(error=triton_error(pb_utils, exc)))

    def _reply(self, sender, response) -> None:  # server thread
        # Gauges first: a client that reads the metrics right after its answer (say, after a stream's last
        # chunk) sees the stream already released, never the state before its own request.
        self._gauges()
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests: list) -> None:
        with self.scheduler.hold():  # every job of this batch joins the same round
            for request in requests:
                sender = request.get_response_sender()
                try:
                    self._submit(request, sender)
                except Exception as exc:
                    log_failure(pb_utils, "token2wav", request, exc)
                    self._fail(sender, exc)
        self.server.submit(self._gauges)
        return None

    def finalize(self) -> None:
        self.scheduler.close()  # fails what is still queued: those answers go out before the server thread stops
        self.server.close()


def _run_logged(fn, *args) -> None:
    """One call on the server thread; a failure (say, a send for a request the server already released) is
    logged and must not stop the thread that answers everyone else."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        log_failure(pb_utils, "token2wav (server thread)", None, exc)
