"""A built wheel serves without the source tree.

The wheel is built from a copy of the sources and installed (no dependencies) into a fresh virtual environment
outside the repository, which reuses this environment's installed dependencies through a .pth line (installing
torch again would take minutes; a .pth line adds a folder to sys.path without running the .pth files inside it,
so this environment's editable install of the project is not seen). From a temporary folder, with PYTHONPATH
holding only an audit hook, the fresh environment's `stepaudio2 tiny`, `stepaudio2 serve` and
`stepaudio2-client` run an asr request, which must equal the in-process reference pipeline. The audit hook, in
every Python process involved (CLI, client, each Triton Python-backend stub), records any file or folder of
the repository that is opened or listed, apart from the dependencies in .venv/: there must be none.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO, SERVE_EXTRA, free_port, processes_mentioning, require_module

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ALLOWED = REPO / ".venv"  # the dependencies this environment installed (not part of the source tree)
SOURCES = ("pyproject.toml", "README.md", "stepaudio2", "export", "client", "gateway", "model_repository",
           "ensemble")

AUDIT_HOOK = '''
import os, sys

_repo, _allowed, _log = (os.environ["SA2_AUDIT_" + k] for k in ("REPO", "ALLOWED", "LOG"))


def _audit(event, args):
    if event not in ("open", "os.listdir", "os.scandir") or not args or not isinstance(args[0], (str, bytes)):
        return
    path = os.path.abspath(os.fsdecode(args[0]))
    if (path == _repo or path.startswith(_repo + os.sep)) and not (path + os.sep).startswith(_allowed + os.sep):
        argv = getattr(sys, "argv", None) or [""]  # embedded interpreters (the stubs) may have no argv
        with open(_log, "a") as f:
            f.write(f"{os.getpid()} {event} {path} ({os.path.basename(argv[0])})\\n")


sys.addaudithook(_audit)
'''


def _run(cmd: list[str], env: dict, cwd: Path, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> dict:
    require_module("pytriton", SERVE_EXTRA)
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.onnx", "*.npy", "*.plan", "export.json")
    for name in SOURCES:
        path = REPO / name
        (shutil.copytree(path, src / name, ignore=ignore) if path.is_dir() else shutil.copy2(path, src / name))
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
         dict(os.environ), root)
    (wheel,) = (root / "dist").glob("step_audio2_triton-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], dict(os.environ), root)
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         dict(os.environ), root)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     {"PATH": "/usr/bin:/bin"}, root).strip())
    (site / "_step_audio2_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    work = root / "work"
    work.mkdir()
    log = root / "audit.log"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(root), "PYTHONPATH": str(hook),
           "SA2_AUDIT_REPO": str(REPO), "SA2_AUDIT_ALLOWED": str(ALLOWED), "SA2_AUDIT_LOG": str(log)}
    return {"root": root, "venv": venv, "python": python, "site": site, "env": env, "work": work, "log": log}


def test_the_audit_hook_sees_a_read_of_the_source_tree(fresh: dict) -> None:
    """Control: the hook that must stay silent below does report a source file being read."""
    log = fresh["root"] / "control.log"
    code = f"import os; open({str(REPO / 'README.md')!r}).read(); os.listdir({str(ALLOWED)!r})"
    _run([str(fresh["python"]), "-c", code], {**fresh["env"], "SA2_AUDIT_LOG": str(log)}, fresh["work"])
    lines = log.read_text().splitlines()  # the README once; the allowed .venv listing not at all
    assert len(lines) == 1 and lines[0].endswith(f" open {REPO / 'README.md'} (-c)"), lines


def test_the_fresh_environment_imports_the_wheel(fresh: dict) -> None:
    code = ("import json, stepaudio2, stepaudio2_client, stepaudio2.export.tiny as t, stepaudio2.serving.launcher as l;"
            "print(json.dumps([stepaudio2.__file__, stepaudio2_client.__file__, t.__file__, str(l.MODEL_REPOSITORY),"
            " str(l.ENSEMBLE_REPOSITORY), str(l.PACKAGE_ROOT), sorted(l.model_configs())]))")
    *paths, models = json.loads(_run([str(fresh["python"]), "-c", code], fresh["env"], fresh["work"]))
    for path in paths:
        assert Path(path).is_relative_to(fresh["site"]), path
    assert models == sorted(p.parent.name for p in [*REPO.glob("model_repository/*/config.pbtxt"),
                                                     *REPO.glob("ensemble/*/config.pbtxt")])
    assert not fresh["log"].exists(), fresh["log"].read_text()


def _stubs(runtime: Path) -> list[int]:
    """Triton Python-backend stub processes serving from `runtime`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not (proc.name.isdigit() and len(cmd) > 1 and cmd[0].endswith(b"triton_python_backend_stub")):
            continue
        model = Path(cmd[1].decode(errors="replace"))  # relative to the server's folder when --runtime is
        if (Path(os.readlink(proc / "cwd")) / model).resolve().is_relative_to(runtime):
            pids.append(int(proc.name))
    return pids


def test_the_wheel_makes_a_tiny_checkpoint(fresh: dict) -> None:
    out = _run([str(fresh["venv"] / "bin" / "stepaudio2"), "tiny", "--out", "tiny"], fresh["env"], fresh["work"])
    assert "wrote tiny checkpoint" in out and (fresh["work"] / "tiny" / "config.json").is_file()
    assert (fresh["work"] / "tiny" / "token2wav").is_dir()
    assert not fresh["log"].exists(), fresh["log"].read_text()


def test_the_wheel_serves_asr_equal_to_the_reference(fresh: dict, taught_checkpoint: Path, taught_export: Path) -> None:
    """Served from the fresh environment: the taught checkpoint and its exported graphs are copied out of the
    repository's build cache first (exporting again takes minutes), so `serve` reads neither from the repo."""
    from stepaudio2.engines.sampling import SamplingParams
    from stepaudio2.pipeline import GenerationRequest, ReferencePipeline, load_audio_input

    env, work, bin_ = fresh["env"], fresh["work"], fresh["venv"] / "bin"
    shutil.copytree(taught_checkpoint, work / "ckpt")
    runtime, ports = work / "runtime", {"grpc": free_port(), "http": free_port(), "metrics": free_port(),
                                        "health": free_port(), "gateway": free_port()}
    shutil.copytree(taught_export, runtime / "model_repository")  # the launcher's hash check finds it up to date
    log = (work / "serve.log").open("w")
    serve = subprocess.Popen(
        [str(bin_ / "stepaudio2"), "serve", "--checkpoint", "ckpt", "--runtime", "runtime",
         *(f"--{k}-port={v}" for k, v in ports.items()), "--set", "pipeline.max_sessions=2",
         "--no-gateway"],  # Triton's gRPC is what this test serves from the wheel
        env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while "ready:" not in (work / "serve.log").read_text():
            assert serve.poll() is None and time.monotonic() < deadline, _logs(work)
            time.sleep(1)  # start-up only: `serve` prints one line when Triton is ready
        clip = fresh["site"] / "stepaudio2" / "assets" / "hello_en.wav"  # the wheel's copy of the clip
        out = _run([str(bin_ / "stepaudio2-client"), "--url", f"127.0.0.1:{ports['grpc']}", "--task", "asr",
                    "--audio", str(clip), "--temperature", "0", "--max-new-tokens", "16", "--json"], env, work)
        stubs = _stubs(runtime.resolve())
        stub_paths = {p for pid in stubs for p in _environ(pid).get("PYTHONPATH", "").split(os.pathsep) if p}
    finally:
        serve.send_signal(signal.SIGINT)
        code = serve.wait(60)
        log.close()
    # SIGINT stops `serve` cleanly: exit 0, "stopped" last, tritonserver and every stub gone, ports closed, no
    # crash in the server's log (SIGTERM: the end of tests/test_reliability_serving.py).
    printed = (work / "serve.log").read_text(errors="replace")
    assert code == 0 and printed.strip().splitlines()[-1] == "stopped", printed[-3000:]
    assert processes_mentioning(str(runtime.resolve())) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/v2/health/live", timeout=2)
    triton_log = (runtime / "tritonserver.log").read_text(errors="replace")
    assert "Segmentation fault" not in triton_log and "core dumped" not in triton_log, triton_log[-2000:]
    served = json.loads(out.strip().splitlines()[-1])
    reference = ReferencePipeline(work / "ckpt").generate(GenerationRequest(
        task="asr", audio=load_audio_input(clip), sampling=SamplingParams.from_dict({"temperature": 0,
                                                                                      "max_new_tokens": 16})))
    assert served["token_ids"] == reference.token_ids and served["text"] == reference.text
    assert served["text"].strip(), served  # the taught checkpoint transcribes the clip
    # The stubs imported the model code's packages from the fresh environment (plus the shared dependencies).
    assert len(stubs) >= 5 and str(fresh["site"]) in stub_paths, stub_paths
    assert not [p for p in stub_paths if Path(p).is_relative_to(REPO) and not Path(p).is_relative_to(ALLOWED)]
    for config in runtime.rglob("config.pbtxt"):  # served model folders come from the wheel's package data
        wheel_copy = fresh["site"] / "stepaudio2" / config.parent.parent.name / config.parent.name / "1" / "model.py"
        if (config.parent / "1" / "model.py").exists():
            assert (config.parent / "1" / "model.py").read_bytes() == wheel_copy.read_bytes()
    assert not fresh["log"].exists(), "source tree read:\n" + fresh["log"].read_text()


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _logs(work: Path) -> str:
    server = work / "runtime" / "tritonserver.log"
    tail = server.read_text(errors="replace").splitlines()[-30:] if server.is_file() else []
    return (work / "serve.log").read_text(errors="replace")[-4000:] + "\n".join(tail)
