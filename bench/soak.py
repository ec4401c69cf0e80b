"""Soak: mixed traffic against a supervised `stepaudio2 serve` for a long time, with a stub killed every few
minutes. Reports requests served, errors by kind (only the injected ones are expected), p50/p95 latency per
window, the serve process tree's RSS per window (growth after warm-up), and every recovery time.

    .venv/bin/python bench/soak.py --minutes 30 --kill-every 300 --concurrency 4          # the full soak
    .venv/bin/python bench/soak.py --minutes 6 --window 120 --kill-every 120 --concurrency 2   # shortened

Traffic (round robin per worker): asr (streamed), chat, voice-chat (streamed speech), a cancel (client leaves
after the first event), and a bad input (expected INVALID_ARGUMENT). Kills rotate over pipeline, llm, token2wav.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stepaudio2.serving.ports import unused_port  # noqa: E402
from stepaudio2.serving.supervisor import stub_pids, tree_rss_mb  # noqa: E402
from stepaudio2_client import ClientError, StepAudio2Client  # noqa: E402

HELLO = (ROOT / "stepaudio2" / "assets" / "hello_en.wav").read_bytes()
KINDS = ["asr", "chat", "voice-chat", "cancel", "bad"]




def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def one(client: StepAudio2Client, kind: str) -> str:
    """Run one request of a kind; returns 'ok' or raises ClientError."""
    if kind == "asr":
        client.generate({"task": "asr", "sampling": {"max_new_tokens": 16}}, HELLO, timeout=120)
    elif kind == "chat":
        client.generate({"task": "chat", "text": "Tell me a joke.", "sampling": {"max_new_tokens": 24}}, timeout=120)
    elif kind == "voice-chat":
        client.generate({"task": "voice-chat", "sampling": {"max_new_tokens": 60}}, HELLO, timeout=120)
    elif kind == "cancel":
        for _ in client.stream({"task": "chat", "text": "Count slowly.", "sampling": {"max_new_tokens": 200}},
                               timeout=120):
            break  # leaving the stream cancels the request on the server
    elif kind == "bad":
        try:
            client.generate({"task": "chat", "text": "hi", "sampling": {"temperature": -1}}, timeout=120)
        except ClientError as exc:
            if exc.status == "INVALID_ARGUMENT":
                return "ok"
            raise
        raise ClientError("UNEXPECTED_OK", "bad input was accepted")
    return "ok"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="default: a fresh tiny checkpoint with token2wav")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--window", type=float, default=300, help="report window, seconds")
    ap.add_argument("--kill-every", type=float, default=300, help="seconds between stub kills (0: none)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", default="out/soak.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = str(work / "ckpt")
        subprocess.run([sys.executable, "-m", "stepaudio2.cli", "tiny", "--out", ckpt], check=True,
                       stdout=subprocess.DEVNULL)
    grpc_port, health_port = unused_port(), unused_port()
    log = open(work / "serve.out", "wb")  # noqa: SIM115 (open for the server's lifetime)
    serve = subprocess.Popen(
        [sys.executable, "-m", "stepaudio2.cli", "serve", "--checkpoint", ckpt, "--runtime", str(work / "rt"),
         "--grpc-port", str(grpc_port), "--http-port", str(unused_port()), "--metrics-port", str(unused_port()),
         "--health-port", str(health_port), "--max-restarts", "100"], stdout=log, stderr=subprocess.STDOUT)
    try:
        while health(health_port) != 200:
            if serve.poll() is not None:
                raise SystemExit(f"serve exited; see {work / 'serve.out'}")
            time.sleep(1)
        print(f"ready; soaking {args.minutes} min at concurrency {args.concurrency} (log {work / 'serve.out'})",
              flush=True)
        records: list[tuple[float, str, str, float]] = []  # (t, kind, outcome, seconds)
        start = time.monotonic()
        end = start + args.minutes * 60
        lock = threading.Lock()

        def worker(offset: int) -> None:
            kinds = itertools.islice(itertools.cycle(KINDS), offset, None)
            with StepAudio2Client(f"127.0.0.1:{grpc_port}") as client:
                for kind in kinds:
                    if time.monotonic() >= end:
                        return
                    t0 = time.monotonic()
                    try:
                        outcome = one(client, kind)
                    except ClientError as exc:
                        outcome = exc.status
                        time.sleep(0.5)
                    with lock:
                        records.append((t0 - start, kind, outcome, time.monotonic() - t0))

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
        for t in threads:
            t.start()
        rss: list[tuple[float, float]] = []
        recoveries: list[dict] = []
        victims = itertools.cycle(["pipeline", "llm", "token2wav"])
        next_kill = start + args.kill_every if args.kill_every else float("inf")
        while time.monotonic() < end:
            time.sleep(5)
            rss.append((time.monotonic() - start, tree_rss_mb(serve.pid)))
            if time.monotonic() >= next_kill:
                victim = next(victims)
                triton = next((int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                               and _ppid(p) == serve.pid and _comm(p) == "tritonserver"), None)
                pid = next((p for p, n in stub_pids(triton).items() if n.startswith(victim)), None) if triton else None
                if pid:
                    t0 = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    while health(health_port) == 200 and time.monotonic() - t0 < 30:
                        time.sleep(0.2)
                    while health(health_port) != 200 and time.monotonic() - t0 < 600:
                        time.sleep(0.5)
                    recoveries.append({"t": round(t0 - start, 1), "victim": victim,
                                       "recovered_s": round(time.monotonic() - t0, 1)})
                    print(f"killed {victim}: healthy again after {recoveries[-1]['recovered_s']} s", flush=True)
                next_kill = time.monotonic() + args.kill_every
        for t in threads:
            t.join(180)
        report = summarise(records, rss, recoveries, args.window)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        return 0
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)


def _ppid(proc: Path) -> int:
    try:
        stat = (proc / "stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[1])
    except (OSError, ValueError):
        return -1


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return ""


def summarise(records, rss, recoveries, window: float) -> dict:
    windows = []
    n_windows = int(max([t for t, *_ in records] + [0]) // window) + 1
    for w in range(n_windows):
        lo, hi = w * window, (w + 1) * window
        lat = sorted(s for t, _, o, s in records if lo <= t < hi and o == "ok")
        mem = [m for t, m in rss if lo <= t < hi]
        windows.append({
            "window": f"{lo:.0f}-{hi:.0f} s", "served": len(lat),
            "errors": dict(Counter(o for t, _, o, _ in records if lo <= t < hi and o != "ok")),
            "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
            "rss_mb": round(statistics.median(mem), 1) if mem else None,
        })
    mems = [w["rss_mb"] for w in windows if w["rss_mb"]]
    return {
        "requests": len(records), "served": sum(1 for r in records if r[2] == "ok"),
        "errors_by_kind": {k: dict(Counter(o for _, kk, o, _ in records if kk == k and o != "ok")) for k in KINDS},
        "windows": windows, "recoveries": recoveries,
        "rss_growth_after_warmup_pct": round(100 * (mems[-1] / mems[1] - 1), 1) if len(mems) > 2 else None,
    }


if __name__ == "__main__":
    sys.exit(main())
