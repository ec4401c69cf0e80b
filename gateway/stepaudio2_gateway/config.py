"""Gateway settings (command line, environment, or the `stepaudio2 serve` hook)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field


@dataclass
class GatewayConfig:
    triton_url: str = "127.0.0.1:8001"  # gRPC of the Triton that serves `pipeline`
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: frozenset[str] = field(default_factory=frozenset)  # empty: no key needed (loopback only)
    max_body_bytes: int = 25 * 1024 * 1024  # OpenAI's upload limit for audio files
    max_audio_seconds: float = 300.0
    timeout_s: float = 300.0  # per request; cancels the Triton stream when it runs out
    max_in_flight: int = 64  # requests the gateway forwards at once; more get 429
    voices_max: int = 64  # registered voices kept (least recently used out)
    audio_ids_max: int = 1024  # spoken replies remembered for multi-turn replay (message.audio.id)

    def check(self) -> None:
        """Keys are required as soon as the gateway listens beyond loopback."""
        if not self.api_keys and not is_loopback(self.host):
            raise ValueError(
                f"the gateway binds {self.host} (beyond loopback): set API keys (--api-key or "
                "STEPAUDIO2_GATEWAY_API_KEYS) so that it does not serve anyone who can reach it"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keys_from_env(extra: list[str] | None = None) -> frozenset[str]:
    """Keys from STEPAUDIO2_GATEWAY_API_KEYS (comma separated), STEPAUDIO2_GATEWAY_API_KEYS_FILE (one a line)
    and the command line."""
    keys = [k.strip() for k in os.environ.get("STEPAUDIO2_GATEWAY_API_KEYS", "").split(",")]
    path = os.environ.get("STEPAUDIO2_GATEWAY_API_KEYS_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            keys += [line.strip() for line in f]
    keys += list(extra or [])
    return frozenset(k for k in keys if k)
