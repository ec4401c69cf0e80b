"""Split vs single server on loopback (real tritonservers, gRPC): time to first audio at 1 and 8 voice-chat
streams when the pipeline reaches its stages over gRPC on other servers (front: pipeline + audio_encoder;
pools: llm, token2wav, voice_prompt) vs all in one server over BLS; and the latency of a session's second turn
with the embedded store vs Redis (a real redis-server on a free port).

    .venv/bin/python bench/split_vs_single.py [--preset small] [--tokens 160] [--levels 1 8] [--runs 3] [--turns 10]
        [--pools llm,token2wav,voice_prompt] [--set MODEL.KEY=VALUE ...]

`--pools`: one server per argument, serving the comma-separated stages the front reaches there over gRPC (the
rest stay on the front, over BLS). Default: one pool with all three; `--pools llm token2wav,voice_prompt` is the
split chart's layout (an LLM pool and a token2wav pool); `--pools token2wav` measures that hop alone. `--set`
(as `stepaudio2 serve --set`) applies to every server of both layouts, so a setting is compared under the same
configuration in each.

All servers run at once and each run measures both layouts, in alternating order (see `_alternated`).
TTFA as in bench/speech_streams.py (client side: first audio chunk received - request sent). Turn-2 latency:
wall time of one follow-up request (`session_id` + `text`, 4 new tokens, text reply) after a first turn.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint  # noqa: E402
from speech_streams import _cell, run_level  # noqa: E402

from stepaudio2.serving.ports import unused_port  # noqa: E402

POOL_STAGES = ("llm", "token2wav", "voice_prompt")  # the stages a front can reach on a pool
_EXPORTS: dict[Path, Path] = {}


def _exported(ckpt: Path) -> Path:
    """The checkpoint's model repository, exported once for every server of this run (minutes per export)."""
    if ckpt not in _EXPORTS:
        from stepaudio2.export.repository import export_checkpoint

        _EXPORTS[ckpt] = Path(tempfile.mkdtemp(prefix="stepaudio2-bench-split-export-"))
        export_checkpoint(ckpt, _EXPORTS[ckpt])
    return _EXPORTS[ckpt]


def _server(ckpt: Path, models: list[str] | None, remotes: dict[str, str], store: str | None,
            settings: dict[str, dict[str, str]]):
    from stepaudio2.serving.launcher import ServerConfig, TritonProcess
    from stepaudio2.serving.topology import topology

    params, args = topology(models, remotes, store)
    for model, values in settings.items():
        if models is None or model in models:  # only the models this server loads
            params[model] = {**params.get(model, {}), **values}
    runtime = Path(tempfile.mkdtemp(prefix="stepaudio2-bench-split-"))
    shutil.copytree(_exported(ckpt), runtime / "model_repository")  # the launcher's export is then a no-op
    cfg = ServerConfig(checkpoint=ckpt, runtime=runtime,
                       grpc_port=unused_port(), http_port=unused_port(), metrics_port=unused_port(), model_parameters=params,
                       extra_args=args)
    return cfg, TritonProcess(cfg)


def _redis() -> tuple[subprocess.Popen, str]:
    port = unused_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    import redis

    db = redis.Redis(port=port)
    for _ in range(100):
        try:
            db.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)  # start-up only
    return proc, f"redis://127.0.0.1:{port}/0"


def _turn_two(url: str, turns: int) -> list[float]:
    from stepaudio2_client import StepAudio2Client

    out = []
    with StepAudio2Client(url) as c:
        for _ in range(turns + 1):  # the first pair warms up
            sid = c.generate({"task": "chat", "text": "hi", "session_id": "new",
                              "sampling": {"max_new_tokens": 4}})["session_id"]
            t0 = time.perf_counter()
            c.generate({"session_id": sid, "text": "and then?", "sampling": {"max_new_tokens": 4}})
            out.append(time.perf_counter() - t0)
    return out[1:]


def _alternated(urls: dict[str, str], levels: list[int], runs: int, tokens: int
                ) -> dict[str, dict[int, dict[str, list[float]]]]:
    """Each run measures every layout once, in an order that alternates between runs, with all servers up: the
    ratio then compares layouts under the same load of this shared machine, not under whatever drifted between
    two sequential blocks (the host's own load moves more than the hop costs)."""
    for url in urls.values():
        run_level(url, 1, 1, tokens)  # warm-up
    out: dict[str, dict[int, dict[str, list[float]]]] = {name: {} for name in urls}
    for level in levels:
        for r in range(runs):
            for name in (list(urls) if r % 2 == 0 else list(reversed(urls))):
                stats = run_level(urls[name], level, 1, tokens)
                for key, values in stats.items():
                    out[name].setdefault(level, {}).setdefault(key, []).extend(values)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--pools", nargs="+", default=[",".join(POOL_STAGES)], metavar="STAGE[,STAGE...]")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="MODEL.KEY=VALUE",
                    help="a model parameter on every server of both layouts (e.g. llm.stream_interval=4)")
    args = ap.parse_args()
    from stepaudio2.serving.model_config import parse_settings

    settings = parse_settings(args.settings)
    pools = [[s.strip() for s in group.split(",") if s.strip()] for group in args.pools]
    named = [s for stages in pools for s in stages]
    if not named or set(named) - set(POOL_STAGES) or len(named) != len(set(named)):
        ap.error(f"--pools: each of {', '.join(POOL_STAGES)} at most once, comma-separated per pool")
    ckpt = checkpoint(args.preset)
    turn2: dict[str, list[float]] = {}

    redis_proc, redis_url = _redis()
    servers = []
    try:
        cfg, single = _server(ckpt, None, {}, None, settings)
        servers.append(single)
        single.start()
        remotes: dict[str, str] = {}
        for stages in pools:
            pool_cfg, pool = _server(ckpt, stages, {}, None, settings)
            servers.append(pool)
            pool.start()
            remotes.update({stage: f"127.0.0.1:{pool_cfg.grpc_port}" for stage in stages})
        local = [m for m in POOL_STAGES if m not in remotes]
        front_cfg, front = _server(ckpt, ["pipeline", "audio_encoder", *local], remotes, redis_url, settings)
        servers.append(front)
        front.start()
        urls = {"single": f"127.0.0.1:{cfg.grpc_port}", "split": f"127.0.0.1:{front_cfg.grpc_port}"}
        ttfa = _alternated(urls, args.levels, args.runs, args.tokens)
        turn2["embedded"] = _turn_two(urls["single"], args.turns)
        turn2["redis (split)"] = _turn_two(urls["split"], args.turns)
        for server in servers:
            server.stop()
        servers.clear()
        cfg, single = _server(ckpt, None, {}, redis_url, settings)
        servers.append(single)
        single.start()
        turn2["redis"] = _turn_two(f"127.0.0.1:{cfg.grpc_port}", args.turns)
    finally:
        for server in servers:
            server.stop()
        redis_proc.terminate()
        redis_proc.wait(10)

    print(f"preset={args.preset} max_new_tokens={args.tokens} runs={args.runs} pools={' + '.join(args.pools)} "
          f"set={','.join(args.settings) or '-'}; "
          "medians [min .. max] over runs")
    print("| layout | streams | TTFA p50 s | TTFA p95 s | server TTFA p95 s | RTF |")
    print("|---|---|---|---|---|---|")
    for layout, by_level in ttfa.items():
        for level, st in by_level.items():
            print(f"| {layout} | {level} | {_cell(st['p50'])} | {_cell(st['p95'])} | {_cell(st['server_p95'])} | "
                  f"{_cell(st['rtf'])} |")
    for level in args.levels:
        ratio = statistics.median(ttfa["split"][level]["p95"]) / statistics.median(ttfa["single"][level]["p95"])
        print(f"TTFA p95 split / single at {level} stream(s): x{ratio:.3f}")
    print(f"| store | session turn 2 s (n={args.turns}) |")
    print("|---|---|")
    for store, values in turn2.items():
        print(f"| {store} | {_cell(values)} |")


if __name__ == "__main__":
    main()
