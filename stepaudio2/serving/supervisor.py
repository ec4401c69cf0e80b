"""`serve`'s watchdog: start tritonserver, warm it, then watch it and restart it in place when it breaks.

Two signals, checked every `interval_s`:
  * process level (instant): tritonserver exited, or a Python-backend stub that was running at ready is gone
    (a dead stub stayed dead in this Triton and every request to it failed; a dead pipeline stub made the LLM's
    batching thread block for ever);
  * end to end (stepaudio2.serving.health): a tiny real request through each stage, with a deadline, so a hung
    server is noticed too. `failures_to_restart` consecutive failures trigger a restart (one slow probe under
    load does not).
A restart stops the whole server (SIGINT, then SIGKILL of its process group), removes its shared memory and
starts it again on the same ports. At most `max_restarts` within `window_s`: beyond that the supervisor gives up,
/health/live turns 503 and `serve` exits non-zero, so Kubernetes replaces the pod.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from stepaudio2.serving.health import (
    PROBE_REQUEST,
    EndToEndCheck,
    HealthReport,
    HealthState,
    _probe_wav,
    probe_llm,
)
from stepaudio2.serving.launcher import ServerConfig, ServerError, TritonProcess
from stepaudio2.serving.topology import FRONT_MODELS

log = logging.getLogger("stepaudio2.supervisor")

PROCESS_POLL_S = 0.25  # how often stubs are looked for while an end-to-end check runs
STUB_COMM = "triton_python_b"  # /proc/<pid>/comm of triton_python_backend_stub (truncated to 15 characters)
_INSTANCE = re.compile(rb"^[A-Za-z0-9_.-]+_\d+_\d+$")  # Triton's instance names: <model>_<group>_<index>


def stub_pids(server_pid: int) -> dict[int, str]:
    """Python-backend stub processes of one tritonserver: {pid: model instance name from the command line}."""
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
            # A killed stub its server has not reaped yet is a zombie: dead all the same.
            if int(ppid) != server_pid or comm != STUB_COMM or state in ("Z", "X"):
                continue
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        # argv: stub, model.py, shm region, sizes, parent pid, backend dir, ipc size, instance name, ...
        name = next((a.decode(errors="replace") for a in args[1:] if _INSTANCE.match(a)), "?")
        found[int(proc.name)] = name
    return found


def tree_rss_mb(root_pid: int) -> float:
    """Resident memory of a process and all its descendants (serve: tritonserver, its stubs, vLLM's engine
    core), MB, from /proc."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(proc.name))
            except (OSError, ValueError):
                pass
    total_kb, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
    return total_kb / 1024


def instance_count(config: Path) -> int:
    """Sum of instance_group counts in a config.pbtxt (1 when none is given)."""
    counts = [int(n) for n in re.findall(r"count:\s*(\d+)", config.read_text(encoding="utf-8"))]
    return sum(counts) or 1


STAGE_MODELS = ("audio_encoder", "llm", "voice_prompt", "token2wav")
DECOUPLED_STAGES = ("llm",)  # stages whose callers read a response stream


class Supervisor:
    def __init__(self, cfg: ServerConfig, state: HealthState | None = None, *, interval_s: float = 2.0,
                 probe_timeout_s: float = 10.0, failures_to_restart: int = 3, max_restarts: int = 5,
                 window_s: float = 600.0, start_timeout_s: float = 300.0) -> None:
        self.cfg = cfg
        self.state = state or HealthState()
        self.interval_s = interval_s
        self.failures_to_restart = failures_to_restart
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.start_timeout_s = start_timeout_s
        # Explicit model control, so one broken model can be reloaded in place (seconds) instead of restarting
        # the whole server (minutes on a small CPU). The repository API is restricted to our admin key.
        if not any(a.startswith("--model-control-mode") for a in cfg.extra_args):
            cfg.extra_args = [*cfg.extra_args, "--model-control-mode=explicit", "--load-model=*"]
        self.server = TritonProcess(cfg)
        self.check: EndToEndCheck | None = None
        self.probe_timeout_s = probe_timeout_s
        self.reload_timeout_s = 120.0
        # After a reload the stubs are warm already; a warm-up request that hangs means a stage still hangs (the
        # end-to-end check that follows says which), so it is not waited for as long as at the first start.
        self.rewarm_timeout_s = 20.0
        self.llm_probe_timeout_s = 5.0
        self.stubs: dict[int, str] = {}
        self.expected_stubs: int | None = None  # stub count of the first good start
        self.restart_times: list[float] = []
        self.recoveries: list[float] = []  # seconds from noticing a failure to ready again

    # ---- start, warm, restart -------------------------------------------------------------------------------

    def start(self) -> None:
        self.server.start(self.start_timeout_s)
        speech = (self.cfg.runtime / "model_repository" / "token2wav").is_dir()
        self.check = EndToEndCheck(f"{self.cfg.host}:{self.cfg.grpc_port}", speech, self.probe_timeout_s,
                                   models=self.served_models())
        self.after_start()

    def after_start(self, retiring: frozenset[int] = frozenset(), warm_timeout_s: float = 300.0) -> None:
        """Warm, check end to end, and take the stubs running now as the ones to watch (`retiring`: stubs of
        unloaded instances that may still be exiting; they are not watched)."""
        self.warm(warm_timeout_s)
        report = self.check.run()
        if not report.ok:
            raise ServerError(f"server started but the end-to-end check fails: {report.reason}")
        self.stubs = {p: n for p, n in stub_pids(self.server.proc.pid).items() if p not in retiring}
        if self.expected_stubs is None:
            self.expected_stubs = len(self.stubs)
        elif len(self.stubs) < self.expected_stubs:
            raise ServerError(f"{len(self.stubs)} stubs running, {self.expected_stubs} expected")
        self.state.set(report, live=True)
        log.info("ready: %d stubs, end-to-end check %.2f s", len(self.stubs),
                 sum(s.seconds for s in report.stages))

    def served_models(self) -> set[str] | None:
        """The models `--load-model` names (None: every model, `--load-model=*`)."""
        named = {a.split("=", 1)[1] for a in self.cfg.extra_args if a.startswith("--load-model=")}
        return None if not named or "*" in named else named

    def serves(self, model: str) -> bool:
        served = self.served_models()
        return served is None or model in served

    def warm(self, timeout_s: float = 300.0) -> None:
        """First-request work of every pipeline instance before ready: one concurrent probe per instance, so
        Triton hands one to each idle instance (the models warm themselves in initialize). A stage pool of a
        split deployment has no pipeline; its models warm themselves in initialize."""
        from stepaudio2_client import StepAudio2Client

        served = self.served_models()
        if served is not None and "pipeline" not in served:
            return
        n = instance_count(self.cfg.runtime / "ensemble" / "pipeline" / "config.pbtxt")
        wav = _probe_wav()
        url = f"{self.cfg.host}:{self.cfg.grpc_port}"

        def one(_: int) -> str | None:
            try:
                with StepAudio2Client(url) as client:
                    client.generate(PROBE_REQUEST, wav, timeout=timeout_s)
                return None
            except Exception as exc:  # best effort: the end-to-end check that follows decides
                return f"{type(exc).__name__}: {exc}"

        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            failed = [e for e in pool.map(one, range(n)) if e]
        log.info("warmed %d pipeline instances in %.2f s%s", n, time.perf_counter() - start,
                 f" ({len(failed)} failed: {failed[0]})" if failed else "")

    def reload(self, models: list[str]) -> bool:
        """Reload models through Triton's repository API (new stubs replace dead ones); False if any failed."""
        import urllib.request

        def one(model: str) -> bool:
            base = f"http://{self.cfg.host}:{self.cfg.http_port}/v2/repository/models/{model}"
            t0 = time.perf_counter()
            try:
                # Unload first: a load of an already loaded, unchanged model is a no-op and keeps the dead stub.
                for action in ("unload", "load"):
                    req = urllib.request.Request(f"{base}/{action}", data=b"{}", method="POST",
                                                 headers={"Content-Type": "application/json"})
                    self.while_server_runs(lambda req=req: urllib.request.urlopen(req, timeout=self.reload_timeout_s)
                                           .read())
            except Exception as exc:
                log.error("reload of %s failed after %.1f s: %s: %s", model, time.perf_counter() - t0,
                          type(exc).__name__, exc)
                return False
            log.info("reloaded %s in %.1f s", model, time.perf_counter() - t0)
            return True

        # Stages one after the other, then their callers together: reloaded at the same time as the llm, the 16
        # pipeline stubs' start took the CPU from vLLM's (llm 75 s instead of 33 s on the 2-core machine), while
        # the light front models start as fast together as apart.
        stages = [m for m in models if m not in FRONT_MODELS]
        fronts = [m for m in models if m in FRONT_MODELS]
        if not all(one(m) for m in stages):
            return False
        with ThreadPoolExecutor(max(1, len(fronts))) as pool:
            return all(list(pool.map(one, fronts)))

    def while_server_runs(self, call):
        """`call()`'s result, unless tritonserver exits first (ServerError at once). A reload request to a server
        that died under it (its Python backend aborted while the callers' stubs were killed) otherwise waited
        for its whole timeout (120 s) before the restart began."""
        result: list = []

        def run() -> None:
            try:
                result.append((call(), None))
            except BaseException as exc:  # noqa: BLE001 (handed to the caller below)
                result.append((None, exc))

        thread = threading.Thread(target=run, name="supervisor-call", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(PROCESS_POLL_S)
            proc = self.server.proc
            if thread.is_alive() and (proc is None or proc.poll() is not None):
                raise ServerError(f"tritonserver exited ({None if proc is None else proc.returncode})")
        value, error = result[0]
        if error is not None:
            raise error
        return value

    def llm_stuck(self, dead_models: list[str]) -> bool:
        """After a caller of the LLM died mid-stream, this Triton's LLM can block for ever sending to it (its one
        response thread waits on the dead stub), and then every request hangs. True when the LLM served here does
        not answer a one-token request within seconds and generated no token for anyone meanwhile, so it is
        reloaded with its callers at once (waiting for the end-to-end check to fail after reloading the callers
        alone costs half a minute more). Any answer, an error included (e.g. UNAVAILABLE when full), and any token
        generated during the probe (a busy LLM queues the probe) mean it is not blocked."""
        if "llm" in dead_models or not set(dead_models) & set(FRONT_MODELS) or not self.serves("llm"):
            return False
        before = self.generated_tokens()
        try:
            probe_llm(f"{self.cfg.host}:{self.cfg.grpc_port}", self.llm_probe_timeout_s)
            return False
        except TimeoutError as exc:
            after = self.generated_tokens()
            if before is not None and after is not None and after > before:
                log.info("llm generating but slow to answer a probe (%s)", exc)
                return False
            log.warning("llm does not answer since its caller died and generated nothing for %.0f s",
                        self.llm_probe_timeout_s)
            return True
        except Exception as exc:
            log.info("llm answered a probe with an error, so it is not blocked: %s: %s", type(exc).__name__, exc)
            return False

    def generated_tokens(self) -> float | None:
        """vLLM's generated-token counter of the llm model on Triton's metrics endpoint (None: unreadable). It is
        counted on the LLM's response thread, so a blocked LLM stops counting."""
        import urllib.request

        from stepaudio2.serving.metrics import VLLM_GENERATION_TOKENS

        url = f"http://{self.cfg.host}:{self.cfg.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(VLLM_GENERATION_TOKENS + "{") and 'model="llm"' in line)

    def running_stubs(self) -> dict[int, str]:
        """The stubs watched since the last ready and those running now (after a reload, new ones)."""
        proc = self.server.proc
        return {**self.stubs, **(stub_pids(proc.pid) if proc is not None else {})}

    def release_callers(self, dead_models: list[str]) -> list[str]:
        """A request streaming from a decoupled stage whose stub died never gets an error: its caller's BLS response
        iterator waits for ever. Kill the callers' stubs too (their in-flight requests fail at once) and return
        them, to be reloaded with the stage. A caller model with one dead instance (the LLM blocked on it) still
        has live instances whose requests wait on the LLM: they are killed too, and so is a stage stub that is
        alive but blocked (an unload leaves a blocked stub running, with its callers' requests hanging)."""
        stages = sorted(set(dead_models) & set(DECOUPLED_STAGES))
        if not stages:
            return []
        callers = [m for m in FRONT_MODELS if self.serves(m)]
        for pid, name in self.running_stubs().items():
            if name.rsplit("_", 2)[0] in (*stages, *callers):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if callers:
            log.warning("killed the stubs of %s: their requests to the dead %s cannot end otherwise",
                        ", ".join(callers), ", ".join(stages))
        return callers

    def heal(self, reason: str, dead_models: list[str]) -> bool:
        """Reload the dead models when that is enough, else restart the server; False once the budget is spent.

        Stages reload before the models that call them. Only the dead models reload: reloading vLLM costs most of
        a minute on a small CPU. Where a dead pipeline instance left the LLM blocked on it (a one-token probe of the
        LLM fails, or the check after the reload does), the LLM and its callers are reloaded, and the server
        restarted only if that is not enough."""
        if not self._spend(reason):
            return False
        t0 = time.perf_counter()
        if dead_models:
            if self.llm_stuck(dead_models):
                dead_models = [*dead_models, "llm"]
                reason = f"{reason}; llm stopped answering"
            attempts = [dead_models]
            if "llm" not in dead_models and set(dead_models) & set(FRONT_MODELS) and self.serves("llm"):
                attempts.append(["llm"])  # the LLM blocked on the dead caller after the probe above
            for models in attempts:
                models = [*models, *self.release_callers(models)]
                order = sorted(set(models), key=lambda m: (m not in STAGE_MODELS, models.index(m)))
                log.warning("reloading %s: %s", ", ".join(order), reason)
                retiring = frozenset(p for p, n in self.running_stubs().items() if n.rsplit("_", 2)[0] in order)
                if not self.reload(order):
                    break
                try:
                    self.after_start(retiring, self.rewarm_timeout_s)
                    self.recoveries.append(time.perf_counter() - t0)
                    log.info("recovered by reload in %.1f s", self.recoveries[-1])
                    return True
                except Exception as exc:
                    log.error("still broken after reloading %s: %s: %s", ", ".join(order), type(exc).__name__, exc)
                    reason = f"{reason}; then {exc}"
        return self.restart(reason, spent=True, t0=t0)

    def _spend(self, reason: str) -> bool:
        now = time.monotonic()
        self.restart_times = [t for t in self.restart_times if now - t < self.window_s]
        if len(self.restart_times) >= self.max_restarts:
            log.error("giving up: %d recoveries in %.0f s; last failure: %s", len(self.restart_times),
                      self.window_s, reason)
            self.state.set(live=False)
            return False
        self.restart_times.append(now)
        self.state.restarts += 1
        return True

    def restart(self, reason: str, spent: bool = False, t0: float | None = None) -> bool:
        """Stop and start again on the same ports; False when the restart budget is spent."""
        if not spent and not self._spend(reason):
            return False
        log.warning("restart %d (%d in window): %s", self.state.restarts, len(self.restart_times), reason)
        t0 = time.perf_counter() if t0 is None else t0
        self.server.stop()
        try:
            self.start()
        except Exception as exc:  # counted against the budget; the next check tries again
            log.error("restart failed: %s: %s", type(exc).__name__, exc)
            self.state.set(HealthReport(ok=False, checked_at=time.time(), reason=f"restart failed: {exc}"))
            return True
        self.recoveries.append(time.perf_counter() - t0)
        log.info("recovered in %.1f s", self.recoveries[-1])
        return True

    # ---- watching ---------------------------------------------------------------------------------------------

    def process_problem(self) -> tuple[str, list[str]] | None:
        """(what is wrong, models whose stubs died) or None; no models means the server itself is gone."""
        proc = self.server.proc
        if proc is None or proc.poll() is not None:
            return f"tritonserver exited ({None if proc is None else proc.returncode})", []
        alive = stub_pids(proc.pid)
        gone = {pid: name for pid, name in self.stubs.items() if pid not in alive}
        if gone:
            models = sorted({name.rsplit("_", 2)[0] for name in gone.values()})
            return "stub process died: " + ", ".join(f"{n} (pid {p})" for p, n in gone.items()), models
        return None

    def checked(self, pool: ThreadPoolExecutor) -> tuple[HealthReport | None, tuple[str, list[str]] | None]:
        """(end-to-end report, None), or (None, process problem) when one shows up while the check runs: a dead
        stub can hold the check for its whole deadline (e.g. the LLM blocked on a dead caller), and is acted on
        at once instead. An abandoned check ends by its own deadline on `pool`'s thread."""
        future = pool.submit(self.check.run)
        while True:
            try:
                return future.result(timeout=PROCESS_POLL_S), None
            except FutureTimeout:
                found = self.process_problem()
                if found:
                    return None, found

    def watch(self, stopping: threading.Event) -> int:
        """Check until `stopping` is set (returns 0) or the restart budget is spent (returns 1)."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="end-to-end-check")
        try:
            return self._watch(stopping, pool)
        finally:
            pool.shutdown(wait=False)

    def _watch(self, stopping: threading.Event, pool: ThreadPoolExecutor) -> int:
        failures = 0
        while not stopping.wait(self.interval_s):
            found = self.process_problem()
            report = None
            if found is None:
                report, found = self.checked(pool)
            problem, dead_models = found if found else (None, [])
            if problem is None:
                self.state.set(report)
                if report.ok:
                    failures = 0
                    continue
                failures += 1
                log.warning("end-to-end check failed (%d/%d): %s", failures, self.failures_to_restart,
                            report.reason)
                if failures < self.failures_to_restart or stopping.is_set():
                    continue
                problem = f"end-to-end check failed {failures} times: {report.reason}"
            self.state.set(HealthReport(ok=False, checked_at=time.time(), reason=problem))
            failures = 0
            if stopping.is_set():
                break
            if not self.heal(problem, [m for m in dead_models if m != "?"]):
                return 1
        return 0

    def stop(self) -> None:
        self.server.stop()


class _Stop(BaseException):
    """A stop signal that arrived while the server was starting."""


def serve_supervised(cfg: ServerConfig, health_port: int = 8003, **options) -> int:
    """`stepaudio2 serve`: start, warm, print the endpoints, watch and heal until SIGINT/SIGTERM/SIGHUP.
    The server and its shared memory are removed on every way out of here."""
    import signal

    from stepaudio2.serving.health import serve_health

    # Our loggers only: the exporter's libraries are chatty at INFO.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("stepaudio2")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    state = HealthState()
    httpd = serve_health(state, cfg.host, health_port)
    stopping = threading.Event()

    def interrupt(*_) -> None:  # while starting: leave start() at once (the finally below cleans up)
        stopping.set()
        raise _Stop()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    sup = Supervisor(cfg, state, **options)
    try:
        try:
            sup.start()
        except ServerError as exc:  # e.g. this Triton's Python backend aborting while 24 stubs start at once
            log.error("start failed: %s", str(exc).splitlines()[0])
            if not sup.restart(f"start failed: {str(exc).splitlines()[0]}"):
                return 1
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # while watching: finish the current check
            signal.signal(sig, lambda *_: stopping.set())
        print(f"ready: gRPC {cfg.host}:{cfg.grpc_port}  HTTP {cfg.host}:{cfg.http_port}  "
              f"metrics http://{cfg.host}:{cfg.metrics_port}/metrics  "
              f"health http://{cfg.host}:{health_port}/health/ready  (log {sup.server.log_path})", flush=True)
        return sup.watch(stopping)
    except _Stop:
        return 0
    finally:
        state.set(HealthReport(ok=False, checked_at=time.time(), reason="stopping"))
        sup.stop()
        httpd.shutdown()
        print("stopped", flush=True)
