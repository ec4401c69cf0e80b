"""`stepaudio2-gateway`: run the OpenAI-compatible gateway (uvicorn) in front of a Triton `pipeline`."""

from __future__ import annotations

import argparse
import sys

from stepaudio2_gateway.config import GatewayConfig, keys_from_env


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    p = argparse.ArgumentParser(prog="stepaudio2-gateway", description=__doc__)
    p.add_argument("--triton", default="127.0.0.1:8001", help="Triton gRPC address (host:port)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", action="append", default=[],
                   help="accepted Bearer key, repeatable (also STEPAUDIO2_GATEWAY_API_KEYS[_FILE]); required "
                        "when --host is beyond loopback")
    p.add_argument("--max-body-mb", type=float, default=25.0)
    p.add_argument("--max-audio-seconds", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request limit in seconds")
    p.add_argument("--max-in-flight", type=int, default=64)
    a = p.parse_args(argv)
    return GatewayConfig(
        triton_url=a.triton, host=a.host, port=a.port, api_keys=keys_from_env(a.api_key),
        max_body_bytes=int(a.max_body_mb * 1024 * 1024), max_audio_seconds=a.max_audio_seconds,
        timeout_s=a.timeout, max_in_flight=a.max_in_flight,
    )


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from stepaudio2_gateway.app import create_app

    cfg = parse_args(argv)
    try:
        app = create_app(cfg)
    except ValueError as exc:
        print(f"stepaudio2-gateway: {exc}", file=sys.stderr)
        return 2
    print(f"gateway: http://{cfg.host}:{cfg.port}/v1 (page http://{cfg.host}:{cfg.port}/) -> Triton {cfg.triton_url}",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
