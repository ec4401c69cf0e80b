"""Helpers shared by the Python-backend model.py adapters (pb_utils is passed in: it exists only in the stub)."""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from stepaudio2.errors import CapacityError, InvalidInputError, QueueFullError, UnavailableError


def triton_error(pb_utils: Any, exc: BaseException):
    """Map a project exception to a TritonError with the right gRPC status.

    gRPC *streams* (decoupled models) carry only an error message, not a status, so the status name also
    leads the message as "[STATUS] ..."; the client library reads it back from there.
    """
    if isinstance(exc, InvalidInputError):
        code, name, text = pb_utils.TritonError.INVALID_ARG, "INVALID_ARGUMENT", str(exc)
    elif isinstance(exc, (QueueFullError, CapacityError, UnavailableError)):
        code, name, text = pb_utils.TritonError.UNAVAILABLE, "UNAVAILABLE", str(exc)
    else:
        code, name, text = pb_utils.TritonError.INTERNAL, "INTERNAL", f"{type(exc).__name__}: {exc}"
    return pb_utils.TritonError(f"[{name}] {text}", code)


def strip_status(message: str) -> tuple[str | None, str]:
    """Inverse of the "[STATUS] " prefix: (status or None, message without it)."""
    if message.startswith("[") and "] " in message:
        head, rest = message[1:].split("] ", 1)
        if head.replace("_", "").isalpha() and head.isupper():
            return head, rest
    return None, message


def optional_input(pb_utils: Any, request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def required_input(pb_utils: Any, request: Any, name: str) -> np.ndarray:
    value = optional_input(pb_utils, request, name)
    if value is None:
        raise InvalidInputError(f"missing input tensor '{name}'")
    return value


def bytes_value(array: np.ndarray | None) -> bytes | None:
    """First element of a BYTES tensor as bytes (None when absent or empty)."""
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value if isinstance(value, bytes) else bytes(value)


def bytes_values(array: np.ndarray | None) -> list[bytes]:
    """Every element of a BYTES tensor (several audio clips of one conversation); empty elements dropped."""
    if array is None:
        return []
    return [v if isinstance(v, bytes) else bytes(v) for v in array.reshape(-1) if len(v)]


def json_value(array: np.ndarray | None, name: str) -> Any:
    raw = bytes_value(array)
    if raw is None:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"input '{name}' is not valid UTF-8 JSON: {exc}") from exc


def bytes_tensor(pb_utils: Any, name: str, value: str | bytes):
    data = value.encode("utf-8") if isinstance(value, str) else value
    return pb_utils.Tensor(name, np.array([data], dtype=np.object_))


def log_failure(pb_utils: Any, stage: str, request: Any, exc: BaseException, started: float | None = None) -> None:
    """One line per failed request: request id, stage, error class, duration. Input errors are INFO (the
    client's fault), everything else ERROR. Written with `logging` to the stub's stderr, which Triton's log
    receives: pb_utils.Logger from many stubs at once hung or aborted this Triton's Python backend (lock
    exceptions in its shared-memory message queue), so it is not used here. `pb_utils` is kept for when it is."""
    import time

    try:
        request_id = request.request_id() or "-"
    except Exception:  # a request object that cannot say its id must not hide the failure
        request_id = "-"
    took = "" if started is None else f" after {time.perf_counter() - started:.3f} s"
    line = f"request {request_id} failed in {stage}{took}: {type(exc).__name__}: {str(exc)[:300]}"
    _failure_logger().log(logging.INFO if isinstance(exc, InvalidInputError) else logging.ERROR, line)


def _failure_logger() -> logging.Logger:
    logger = logging.getLogger("stepaudio2.requests")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


_HELD_UNTIL_EXIT: list[Any] = []


def hold_until_exit(*metrics: Any) -> None:
    """For a model's custom metrics: keep them alive for the stub's whole life and let the stub exit without
    tearing its interpreter down. This Python backend destroys metric families after its shared memory is gone,
    whether they die with the model object (after `finalize`) or in the interpreter's teardown, and the stub then
    died of SIGSEGV (`MetricFamily::SaveToSharedMemory`) on every server stop: a crash report per stub in the
    server's log and the kernel's. Held here, they are never destroyed, and the exit hook (run first in the
    teardown, after the stub's last message to the server) ends the process at once."""
    import atexit
    import os

    if not _HELD_UNTIL_EXIT:
        def leave() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

        atexit.register(leave)
    _HELD_UNTIL_EXIT.extend(metrics)


class RequestWorker:
    """Serves a model instance's requests off `execute`, so `execute` can hand a request over and return at once
    (decoupled models, and the default mode through the response sender), with all of the instance's talk to the
    server (responses, cancel checks, BLS, metrics) on one thread, the server thread. Used by `pipeline` and
    `generate` in a front whose stages are remote.

    Why off `execute`: while `execute` runs, this Python backend's server process checks the stub's heartbeat
    every second. In split fronts on our 2-core VM (where a thread sleeping 0.3 s woke up to 0.5 s late) it
    declared live, busy `pipeline` stubs dead ("Stub process '...' is not healthy"), answered their requests with
    that error, then crashed (SIGSEGV in TRITONBACKEND_ResponseSend) when the stub's next response for the
    released request arrived. Handed over, a request is exposed to that check for the milliseconds `execute`
    takes, not for the whole reply. The price: if the stub dies, its requests get no error (the server no longer
    waits on them) and their clients wait for their own deadline; served in `execute` (one server), they fail at
    once.

    `concurrent=True`: each request runs on its own thread and reaches the server only through `on_server`. An
    instance whose `execute` returns at once looks idle to Triton, which then gives it the next request too (in
    an 8-stream benchmark, streams waited up to 6 s for a reply ahead of them on the same instance); served
    side by side, they do not wait. Only for requests whose own waiting (remote stages over gRPC) happens off the
    server thread: a BLS stream waited on there would hold every other request's calls.
    `concurrent=False`: requests are served one after another on the server thread itself."""

    def __init__(self, handle: Any, name: str, concurrent: bool = False) -> None:
        self._handle = handle
        self._name = name
        self._concurrent = concurrent
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # (fn, args, future or None); None stops
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, *job: Any) -> None:
        if self._concurrent:
            threading.Thread(target=self._handle, args=job, name=f"{self._name}-request", daemon=True).start()
        else:
            self._calls.put((self._handle, job, None))

    def on_server(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` run on the server thread (at once when called from it); its result or exception."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        done: Future = Future()
        self._calls.put((fn, args, done))
        return done.result()

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, args, done = call
            if done is None:
                fn(*args)
                continue
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 (raised again in the calling thread)
                done.set_exception(exc)

    def close(self, timeout_s: float = 10.0) -> None:
        """Serve what is queued, then stop."""
        self._calls.put(None)
        self._thread.join(timeout_s)


def on_this_thread(fn: Any, *args: Any) -> Any:
    """`RequestWorker.on_server`'s stand-in where requests are served in `execute`."""
    return fn(*args)
