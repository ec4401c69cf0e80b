"""The suite's own rule for missing dependencies (tests/conftest.py): under CI=true a missing tool or package
fails naming what is missing; without CI it skips with the reason; only hardware skips pass under CI; the run
ends with the skip count. Checked by running small parts of the suite in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def _path_without(tool: str) -> str:
    """PATH minus every folder holding `tool` (the interpreter is called by absolute path)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and shutil.which(tool, path=d) is None]
    path = os.pathsep.join(dirs)
    assert shutil.which(tool, path=path) is None
    return path


def _pytest(args: list[str], ci: bool, path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


PROMTOOL_TESTS = ["tests/test_k8s.py", "-k", "promtool"]
N_PROMTOOL = (REPO / "tests" / "test_k8s.py").read_text().count("\ndef test_promtool")


def test_missing_promtool_fails_under_ci_naming_it() -> None:
    proc = _pytest(PROMTOOL_TESTS, ci=True, path=_path_without("promtool"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert N_PROMTOOL >= 2 and f"{N_PROMTOOL} failed, " in out and " passed" not in out, out
    assert "tool 'promtool' (not on PATH)" in out and "make promtool" in out, out
    assert "skipped: 0" in out, out


def test_missing_promtool_skips_with_its_reason_off_ci() -> None:
    proc = _pytest(PROMTOOL_TESTS, ci=False, path=_path_without("promtool"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"{N_PROMTOOL} skipped, " in out and f"skipped: {N_PROMTOOL}" in out, out
    assert f"{N_PROMTOOL} x tool 'promtool' (not on PATH) is missing" in out, out


def test_under_ci_only_hardware_skips_pass(tmp_path: Path) -> None:
    case = tmp_path / "test_cases.py"
    case.write_text(
        "import pytest\n"
        "from tests.conftest import hardware_skip, require_module\n\n"
        "def test_stray_importorskip():\n    pytest.importorskip('no_such_module_for_ci_check')\n\n"
        "def test_require_module():\n    require_module('no_such_module_for_ci_check', 'pip install it')\n\n"
        "def test_plain_skip():\n    pytest.skip('not today')\n\n"
        "def test_gpu():\n    hardware_skip('needs a CUDA GPU')\n"
    )
    args = ["-p", "tests.conftest", "-rA", str(case)]
    proc = _pytest(args, ci=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "3 failed, 1 skipped" in out, out
    assert "no_such_module_for_ci_check" in out and "not today" in out, out
    assert "skipped: 1" in out and "1 x hardware: needs a CUDA GPU" in out, out
    off = _pytest(args, ci=False)
    assert off.returncode == 0 and "4 skipped" in off.stdout and "skipped: 4" in off.stdout, off.stdout
    # A module-level importorskip skips the whole module at collection: under CI that is a collection error.
    module = tmp_path / "test_module_level.py"
    module.write_text("import pytest\n\npytest.importorskip('no_such_module_at_import')\n\n"
                      "def test_never_runs():\n    pass\n")
    proc = _pytest(["-p", "tests.conftest", str(module)], ci=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "1 error" in out and "no_such_module_at_import" in out, out
    off = _pytest(["-p", "tests.conftest", str(module)], ci=False)
    assert off.returncode == 5 and "1 skipped" in off.stdout, off.stdout  # 5: no test ran
