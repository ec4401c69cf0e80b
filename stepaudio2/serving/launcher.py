"""`stepaudio2 serve`: export if needed, then run tritonserver on the model repository and the pipelines.

Embedded default: the `tritonserver` binary carried by the `nvidia-pytriton` wheel, on the CPU, bound to
loopback. With `--tritonserver PATH` (or inside the NGC container, where `tritonserver` is on PATH) that binary
is used instead. The launcher copies the installed model folders (package data `stepaudio2.model_repository`
and `stepaudio2.ensemble`: config.pbtxt + model code) into a runtime folder, exports the ONNX graphs there, and
writes every setting into the runtime copies of config.pbtxt (`--engine`, `--set MODEL.KEY=VALUE`), which is
the only place the models read settings from. It works the same from a wheel and from an editable install.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import stepaudio2
from stepaudio2.errors import StepAudio2Error
from stepaudio2.serving import model_config, shm
from stepaudio2.serving.process_group import own_group_kwargs
from stepaudio2.serving.protection import protection_args, write_admin_key

# Where the installed `stepaudio2` package lives (site-packages for a wheel, the source root for an editable
# install): the Python backend stubs import the model code's dependencies from there.
PACKAGE_ROOT = Path(stepaudio2.__file__).resolve().parent.parent
MODEL_REPOSITORY = Path(str(importlib.resources.files("stepaudio2.model_repository")))
ENSEMBLE_REPOSITORY = Path(str(importlib.resources.files("stepaudio2.ensemble")))
# Models whose `engine` parameter follows `serve --engine` (when their config.pbtxt declares one).
ENGINE_MODELS = ("audio_encoder", "llm")


class ServerError(StepAudio2Error):
    """tritonserver could not be prepared, started or reached."""


SPEECH_STAGES = ("token2wav", "voice_prompt")
SHM_DEFAULT_BYTES = 64 * 1024 * 1024
STUB_TIMEOUT_S = 180
SHM_GROWTH_BYTES = 16 * 1024 * 1024


@dataclass
class ServerConfig:
    checkpoint: Path
    runtime: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    tritonserver: Path | None = None
    engine: str = "onnx-cpu"
    extra_args: list[str] = field(default_factory=list)
    # {model: {parameter: value}} written over the `parameters` of the runtime copies of config.pbtxt
    # (`serve --set MODEL.KEY=VALUE`; e.g. {"token2wav": {"batching": "false"}} for the benchmark's baseline).
    # Only parameters the model's config.pbtxt declares can be set; they win over `engine`.
    model_parameters: dict[str, dict[str, str]] = field(default_factory=dict)
    # Python-backend shared-memory region prefix; set per start (stepaudio2.serving.shm) so exits remove ours only.
    shm_prefix: str = ""


def model_configs() -> dict[str, Path]:
    """{model name: installed config.pbtxt} of every model the server can load."""
    return model_config.model_configs(MODEL_REPOSITORY, ENSEMBLE_REPOSITORY)


def check_config(cfg: ServerConfig) -> None:
    """Refuse unknown models and parameters before anything is exported or started."""
    try:
        model_config.check_settings(cfg.model_parameters, model_configs())
    except model_config.ConfigError as exc:
        raise ServerError(str(exc)) from exc


def _copy_models(src: Path, dst: Path) -> None:
    """Copy each model's config.pbtxt and code (nothing else), keeping exported files already in `dst`."""
    for config in sorted(src.glob("*/config.pbtxt")):
        model = dst / config.parent.name
        (model / "1").mkdir(parents=True, exist_ok=True)  # Triton needs the version folder (an ensemble's is empty)
        shutil.copy2(config, model / "config.pbtxt")
        for code in config.parent.glob("[0-9]*/*.py"):
            shutil.copy2(code, model / code.parent.name / code.name)


def _settings(cfg: ServerConfig) -> dict[str, dict[str, str]]:
    """Everything the launcher writes into the runtime config.pbtxt files: `engine`, then the `--set` values."""
    configs = model_configs()
    settings: dict[str, dict[str, str]] = {}
    for name in ENGINE_MODELS:
        if name in configs and "engine" in model_config.parameters(model_config.read_config(configs[name])):
            settings[name] = {"engine": cfg.engine}
    if "llm" in configs and "python_executable" in model_config.parameters(model_config.read_config(configs["llm"])):
        # vLLM spawns its engine-core process; inside the stub sys.executable is not Python, so llm is told ours.
        settings.setdefault("llm", {})["python_executable"] = sys.executable
    for name, values in cfg.model_parameters.items():
        settings.setdefault(name, {}).update({k: str(v) for k, v in values.items()})
    return settings


def prepare_runtime(cfg: ServerConfig) -> tuple[Path, Path]:
    """Runtime model repository (stages + exported graphs) and runtime ensemble repository."""
    from stepaudio2.export.repository import export_checkpoint

    check_config(cfg)
    stages, pipelines = cfg.runtime / "model_repository", cfg.runtime / "ensemble"
    _copy_models(MODEL_REPOSITORY, stages)
    _copy_models(ENSEMBLE_REPOSITORY, pipelines)
    export_checkpoint(cfg.checkpoint, stages)  # no-op when up to date
    for name, values in _settings(cfg).items():
        folder = stages if (stages / name).is_dir() else pipelines
        model_config.set_parameters(folder / name / "config.pbtxt", values)
    if not (stages / "token2wav" / "1" / "flow.yaml").is_file():
        # A checkpoint without token2wav/ serves text only: the speech stages would fail to load.
        for name in SPEECH_STAGES:
            shutil.rmtree(stages / name, ignore_errors=True)
    return stages, pipelines


# Held while we write executables and while we spawn tritonserver. Servers started from several threads at once
# (tests/test_scaleout.py) failed with ETXTBSY: a child forked by one thread inherited another thread's still-open
# write descriptor of the tritonserver binary it had just copied, and exec of that binary was refused.
_SPAWN_LOCK = threading.Lock()


def _pytriton_bundle(build: Path) -> tuple[Path, Path, dict[str, str]]:
    """tritonserver from the nvidia-pytriton wheel, with the Python backend stub of this interpreter."""
    try:
        import pytriton
    except ImportError as exc:
        raise ServerError("no tritonserver: install the 'serve' extra (nvidia-pytriton) or pass --tritonserver") from exc
    src = Path(pytriton.__file__).parent / "tritonserver"
    site = Path(pytriton.__file__).parent.parent
    dst = build / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    with _SPAWN_LOCK:
        if not (dst / "bin" / "tritonserver").is_file():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("python_backend_stubs"), dirs_exist_ok=True)
            shutil.copy2(stub, dst / "backends" / "python" / "triton_python_backend_stub")
    # Pitfall P1: the stub must load this interpreter's libpython, not the system one.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = {
        "LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(site / "nvidia_pytriton.libs"), libdir,
                                                        os.environ.get("LD_LIBRARY_PATH", "")) if p),
        "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_ROOT), str(site), os.environ.get("PYTHONPATH", "")) if p),
        "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", ""))),
    }
    return dst / "bin" / "tritonserver", dst / "backends", env


# OpenMP (torch's and vLLM's CPU kernels) lets idle threads spin for a while after each parallel region. The
# server runs many processes on few cores (vLLM's engine core, a stub per model instance, Triton's own threads), and
# spinning threads took the cores from the ones with work. Every server process sleeps at once unless the
# environment says otherwise; vLLM's engine core gets a short spin of its own (llm `omp_spin_count`; README,
# "OpenMP threads").
OMP_WAIT_POLICY = "PASSIVE"
# numpy's OpenBLAS runs a matmul on every core and its idle threads then busy-wait. A stub's numpy work is small
# (the pipeline's log-mel: 2 ms on one thread, the same wall time and twice the CPU on two); concurrency comes
# from model instances, so each process keeps one BLAS thread.
OPENBLAS_NUM_THREADS = "1"


def server_command(cfg: ServerConfig, stages: Path, pipelines: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    env.setdefault("OPENBLAS_NUM_THREADS", OPENBLAS_NUM_THREADS)
    binary = cfg.tritonserver or (Path(shutil.which("tritonserver")) if shutil.which("tritonserver") else None)
    args: list[str] = []
    if binary is None:
        binary, backends, extra_env = _pytriton_bundle(cfg.runtime / "build")
        env.update(extra_env)
        args += [f"--backend-directory={backends}", f"--cache-directory={backends.parent / 'caches'}"]
    args = [str(binary), f"--model-repository={stages}", f"--model-repository={pipelines}", *args,
            f"--http-address={cfg.host}", f"--grpc-address={cfg.host}", f"--metrics-address={cfg.host}",
            f"--http-port={cfg.http_port}", f"--grpc-port={cfg.grpc_port}", f"--metrics-port={cfg.metrics_port}",
            "--exit-timeout-secs=10",
            # Each Python-backend stub starts with this much shared memory for tensors. Growing a region while
            # other threads of the stub use it crashed the server under concurrent speech streams (PCM chunks and
            # voice prompts are 100 kB+ each), so start large: tmpfs pages cost nothing until touched.
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            # A stub has this long to answer the server (initialize included). The default 30 s is less than
            # vLLM's engine start when a reload meets a busy 2-core machine; the stub then counted as unhealthy
            # and the whole reload failed.
            f"--backend-config=python,stub-timeout-seconds={STUB_TIMEOUT_S}"]
    if cfg.shm_prefix:
        args.append(f"--backend-config=python,shm-region-prefix-name={cfg.shm_prefix}")
    args += protection_args()
    if cfg.engine == "onnx-cpu":  # no GPU to watch; the CPU build would log errors trying
        args.append("--allow-gpu-metrics=false")
    args += cfg.extra_args
    return args, env


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class TritonProcess:
    """A running tritonserver: start, wait until ready, stop."""

    def __init__(self, cfg: ServerConfig, log_path: Path | None = None) -> None:
        self.cfg = cfg
        self.log_path = log_path or cfg.runtime / "tritonserver.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300.0) -> None:
        shm.remove_stale()  # leftovers of launchers that died without cleaning up
        self.cfg.shm_prefix = shm.new_prefix()
        write_admin_key(self.cfg.runtime)
        stages, pipelines = prepare_runtime(self.cfg)
        cmd, env = server_command(self.cfg, stages, pipelines)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the server's lifetime)
        with _SPAWN_LOCK:
            self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                         **own_group_kwargs())
        self.wait_ready(timeout_s)

    @property
    def ready_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.http_port}/v2/health/ready"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with {self.proc.returncode}; log: {self.log_path}\n"
                                  + "".join(f"{e}\n" for e in self.load_errors()) + self.log_tail())
            try:
                with urllib.request.urlopen(self.ready_url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)  # start-up only: readiness has no push notification
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s; log: {self.log_path}\n" + self.log_tail())

    def load_errors(self) -> list[str]:
        """Why models failed to load (e.g. a bad parameter value: `token2wav.max_streams: 'x' is not an integer`)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        found = []
        for line in lines:
            if "failed to load '" in line and "' version " in line:
                found.append(line[line.index("failed to load '"):].split("\\n", 1)[0].rstrip('"'))
        return found

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGINT (Triton drains in-flight requests and unloads its models, up to --exit-timeout-secs), SIGKILL of
        the whole process group after `grace_s`, then our shared-memory regions are removed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc is not None:
            _kill_group(self.proc.pid)  # stubs that outlived their server would keep their regions mapped
        self.proc = None
        if self.cfg.shm_prefix:
            shm.remove_regions(self.cfg.shm_prefix)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


def serve_forever(cfg: ServerConfig) -> int:
    """Start, print the endpoints, and stop cleanly on SIGINT/SIGTERM (or when tritonserver exits)."""
    import threading

    server = TritonProcess(cfg)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    server.start()
    print(f"ready: gRPC {cfg.host}:{cfg.grpc_port}  HTTP {cfg.host}:{cfg.http_port}  "
          f"metrics http://{cfg.host}:{cfg.metrics_port}/metrics  (log {server.log_path})", flush=True)
    while not stopping.wait(1.0):
        if server.proc is None or server.proc.poll() is not None:
            break
    code = 0 if stopping.is_set() else 1
    server.stop()
    print("stopped", flush=True)
    return code
