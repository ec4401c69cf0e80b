"""The gateway as a child process of `stepaudio2 serve`: start it next to Triton, wait until it answers, stop it.

Kept out of the launcher so that `serve` needs only a few lines for it (`--gateway-port`, `--no-gateway`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from stepaudio2.errors import StepAudio2Error
from stepaudio2.serving.process_group import own_group_kwargs


class GatewayProcess:
    def __init__(self, triton_grpc: str, host: str, port: int, log_path: Path, api_keys: list[str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "stepaudio2_gateway", "--triton", triton_grpc, "--host", host,
                    "--port", str(port), *[f"--api-key={k}" for k in api_keys or []], *(extra_args or [])]
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the process's lifetime)
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, **own_group_kwargs())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StepAudio2Error(f"the gateway exited with {self.proc.returncode}; log: {self.log_path}\n"
                                      + self.log_path.read_text(errors="replace")[-2000:])
            try:  # /metrics answers as soon as uvicorn listens (/health also needs Triton)
                with urllib.request.urlopen(self.url + "/metrics", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)  # start-up only
        self.stop()
        raise StepAudio2Error(f"the gateway did not answer within {timeout_s:.0f} s; log: {self.log_path}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


def start_gateway(cfg, port: int) -> GatewayProcess:
    """The `serve` hook: the gateway on `cfg.host`:`port` in front of this Triton's gRPC port; prints its URL.
    Keys come from STEPAUDIO2_GATEWAY_API_KEYS (required when `cfg.host` is beyond loopback)."""
    gateway = GatewayProcess(f"127.0.0.1:{cfg.grpc_port}", cfg.host, port, cfg.runtime / "gateway.log")
    gateway.start()
    print(f"gateway: {gateway.url}/v1 (OpenAI-compatible; voice chat page {gateway.url}/)", flush=True)
    return gateway
