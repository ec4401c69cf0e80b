"""Shared fixtures (one tiny checkpoint per test session, made from a seed in seconds) and the rules for
missing tools.

Missing tools and packages: use `require_module` / `require_tool` instead of `pytest.importorskip` or a
`skipif` on an import. On a developer machine a missing dependency skips the test with the reason; under
`CI=true` (which `make test` sets) it FAILS with a message naming what is missing and how to install it, so a
broken install step can never turn the suite green by skipping. For example:

    torch = require_module("torch", "pip install -e '.[torch]'")
    exe = require_tool("promtool", "apt-get install -y --no-install-recommends prometheus")

Only hardware-gated tests (GPU, TensorRT) may skip under CI: mark them with `hardware_skipif(condition, reason)`
or call `hardware_skip(reason)`. Under CI every other skip - including a stray `pytest.importorskip` or
`pytest.skip` - is turned into a failure by the hooks below, and the end of the run lists every skip with its
reason.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "stepaudio2" / "assets"
HARDWARE = "hardware:"  # reason prefix of the only skips allowed under CI


def strict() -> bool:
    """True under CI (`CI=true`, set by `make test`): missing dependencies fail instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing(what: str, install: str) -> None:
    message = f"{what} is missing (install: {install})"
    if strict():
        pytest.fail(f"CI=true: {message}; a missing dependency is a failure, not a skip", pytrace=False)
    pytest.skip(message, allow_module_level=True)  # module-level calls skip the module


def require_module(name: str, install: str) -> ModuleType:
    """The imported module `name`; skip (or, under CI, fail) naming it when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        _missing(f"Python package '{name}' ({exc})", install)
        raise  # unreachable: _missing raises


def require_tool(name: str, install: str, *extra_dirs: str | Path) -> str:
    """Path of executable `name` on PATH (or in one of `extra_dirs`); skip (CI: fail) naming it otherwise."""
    exe = shutil.which(name) or next(
        (p for d in extra_dirs if (p := shutil.which(name, path=str(d))) is not None), None)
    if exe is None:
        _missing(f"tool '{name}' (not on PATH)", install)
    return exe


def hardware_skip(reason: str) -> None:
    """Skip for missing hardware (GPU, TensorRT): the one kind of skip CI accepts."""
    pytest.skip(f"{HARDWARE} {reason}")


def hardware_skipif(condition: bool, reason: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(condition, reason=f"{HARDWARE} {reason}")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _forbid_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI, a skip that is not hardware-gated becomes a failure carrying the skip's reason."""
    if not (strict() and report.skipped and not hasattr(report, "wasxfail")):
        return
    reason = _skip_reason(report)
    if not reason.startswith(HARDWARE):
        report.outcome = "failed"
        report.longrepr = f"CI=true forbids this skip (only '{HARDWARE}' skips are allowed): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _forbid_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield  # a module-level importorskip skips the whole module at collection
    _forbid_skip(outcome.get_result())


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if not hasattr(r, "wasxfail")]
    reasons = Counter(_skip_reason(r) for r in skipped)
    terminalreporter.write_line(f"skipped: {len(skipped)}" + (" (by reason below)" if skipped else ""))
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"  {n} x {reason}")

SERVE_EXTRA = "pip install -e '.[serve]' (nvidia-pytriton)"
TORCH_EXTRA = "pip install -e '.[torch]'"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stepaudio2.export.tiny import make_tiny_checkpoint

    # LLM side only; token2wav tests build their own token2wav/ folder.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, preset="tiny", with_token2wav=False)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    from stepaudio2.models.step_audio2 import load_model

    return load_model(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_checkpoint_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLM + token2wav/, for speech replies end to end."""
    from stepaudio2.export.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tinyfull") / "ckpt", seed=0, preset="tiny")


@pytest.fixture(scope="session")
def tiny_full_export(tiny_checkpoint_full: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_checkpoint_full's exported model repository, made once per session (about a minute on two cores):
    `with_export` copies it into a server's runtime, and the launcher's hash check then skips the export."""
    from stepaudio2.export.repository import export_checkpoint

    folder = tmp_path_factory.mktemp("tinyfull-onnx")
    export_checkpoint(tiny_checkpoint_full, folder)
    return folder


def with_export(runtime: Path, export: Path) -> Path:
    """A server runtime folder holding a copy of an exported repository (read-only tests may share one export;
    a runtime gets its own copy because the launcher writes the stage models' configs into it)."""
    shutil.copytree(export, runtime / "model_repository", dirs_exist_ok=True)
    return runtime


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory):
    """The tiny tokenizer alone (text-protocol tests need no weights)."""
    from stepaudio2.text import StepAudio2Tokenizer, write_tokenizer_files

    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d, base_vocab_size=1024)
    return StepAudio2Tokenizer.from_dir(d)


# pids of `stepaudio2 serve` processes tests started: their shared-memory regions are this session's too.
SPAWNED_LAUNCHERS: set[int] = set()


@pytest.fixture(scope="session", autouse=True)
def dev_shm_left_as_found():
    """The suite leaves /dev/shm as it found it: after every other session fixture (servers included) is torn
    down, no Python-backend region of a server this session started is left. Only our own regions are counted
    (by the launcher pid in their name), so servers of other programs on the machine cannot fail this."""
    from stepaudio2.serving import shm

    yield
    owners = {os.getpid(), *SPAWNED_LAUNCHERS}
    left = [p.name for pid in owners for p in shm.regions(shm.process_prefix(pid))]
    assert not left, f"shared-memory regions left in /dev/shm: {left[:5]} ({len(left)} in all)"


def free_port() -> int:
    """A loopback port for a server a test starts (see stepaudio2/serving/ports.py for why not just port 0)."""
    from stepaudio2.serving.ports import unused_port

    return unused_port()


# A fixture's server has nothing in flight when it is stopped, and no test of it is about shutdown (those run
# `stepaudio2 serve` and wait the whole way): after SIGINT it gets this long before its process group is killed.
# Triton's graceful unload takes about a second per pipeline stub, one stub after the other (16 s for 16), and
# hits its 10 s exit timeout on every stop.
QUICK_STOP_S = 2.0

# The session server's vLLM engine: a small KV space (fast start, little memory) and a small capacity, so the
# UNAVAILABLE test can fill it (8 running + 4 waiting; no other test sends more than 8 at once).
SERVER_LLM_PARAMETERS = {"kv_cache_space_gib": "1", "max_num_seqs": "8", "max_queue": "4"}


@pytest.fixture(scope="session")
def server(tiny_checkpoint_full: Path, tiny_full_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real tritonserver (nvidia-pytriton binary, CPU, loopback) for every test that needs one."""
    require_module("pytriton", SERVE_EXTRA)
    from stepaudio2.serving.launcher import ServerConfig, TritonProcess

    cfg = ServerConfig(
        checkpoint=tiny_checkpoint_full, runtime=with_export(tmp_path_factory.mktemp("serve"), tiny_full_export),
        grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
        model_parameters={"llm": dict(SERVER_LLM_PARAMETERS)},
    )
    proc = TritonProcess(cfg)
    proc.start(timeout_s=300)
    yield cfg
    proc.stop(QUICK_STOP_S)


@pytest.fixture(scope="session")
def taught_checkpoint() -> Path:
    """The taught tiny checkpoint (issue 7): built on first use (about 30 s), then reused from the build cache
    ($STEPAUDIO2_CACHE/taught or .build/taught, keyed by seed, curriculum and code)."""
    from stepaudio2.export.taught import ensure_taught_checkpoint

    return ensure_taught_checkpoint()


@pytest.fixture(scope="session")
def taught_export(taught_checkpoint: Path) -> Path:
    """The taught checkpoint's exported model repository, cached beside it (exporting takes minutes): copy it
    into a server's runtime `model_repository/` and the launcher's hash check skips the export."""
    from stepaudio2.export.repository import export_checkpoint
    from stepaudio2.export.taught import _FileLock

    folder = taught_checkpoint.parent / f"{taught_checkpoint.name}-onnx"
    with _FileLock(taught_checkpoint.parent / f"{folder.name}.lock"):  # concurrent sessions export once
        export_checkpoint(taught_checkpoint, folder)  # no-op when up to date
    return folder


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
