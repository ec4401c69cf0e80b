"""Exposure: which Triton protocols a client may use without the operator's key.

Clients need inference, health, metadata and model config. Registering shared-memory regions, loading or
unloading models (model-repository), changing trace or log settings are operator actions: Triton's restricted
protocols make them require a header with a secret this launcher generates per start and writes next to the
runtime (mode 0600). Why: any client could otherwise register shared memory or unload the LLM.
On HTTP, this Triton version has no such flag: that port is for the operator and must not be exposed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

ADMIN_HEADER = "stepaudio2-admin-key"
# What a gRPC client sends: Triton prefixes the configured key with "triton-grpc-protocol-".
ADMIN_HEADER_GRPC = "triton-grpc-protocol-" + ADMIN_HEADER
RESTRICTED = ("shared-memory", "model-repository", "trace", "logging")

_key: str | None = None


def admin_key() -> str:
    """This launcher process's operator key (one per process, so restarts keep it)."""
    global _key
    if _key is None:
        _key = secrets.token_hex(16)
    return _key


def write_admin_key(runtime: Path) -> Path:
    """Store the key for the operator (gRPC header `triton-grpc-protocol-stepaudio2-admin-key`)."""
    path = runtime / "admin.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(admin_key() + "\n")
    return path


def protection_args() -> list[str]:
    """tritonserver arguments that restrict the operator protocols on gRPC. Triton 2.51 (the nvidia-pytriton
    binary) has no HTTP counterpart, so the HTTP port stays internal: loopback by default, and the chart does
    not expose it (clients use gRPC; probes use the launcher's health port)."""
    spec = ",".join(RESTRICTED) + f":{ADMIN_HEADER}={admin_key()}"
    return [f"--grpc-restricted-protocol={spec}"]
