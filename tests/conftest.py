"""Shared fixtures: one tiny checkpoint per test session (made from a seed in seconds)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "stepaudio2" / "assets"


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tiny_checkpoint_full: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real tritonserver (nvidia-pytriton binary, CPU, loopback) for every test that needs one."""
    pytest.importorskip("pytriton", reason="serving tests need the 'serve' extra (nvidia-pytriton)")
    from stepaudio2.serving.launcher import ServerConfig, TritonProcess

    cfg = ServerConfig(
        checkpoint=tiny_checkpoint_full, runtime=tmp_path_factory.mktemp("serve"),
        grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
    )
    proc = TritonProcess(cfg)
    proc.start(timeout_s=300)
    yield cfg
    proc.stop()


@pytest.fixture(scope="session")
def taught_checkpoint() -> Path:
    """The taught tiny checkpoint (issue 7): built on first use (about 30 s), then reused from the build cache
    ($STEPAUDIO2_CACHE/taught or .build/taught, keyed by seed, curriculum and code)."""
    from stepaudio2.export.taught import ensure_taught_checkpoint

    return ensure_taught_checkpoint()
