#!/usr/bin/env bash
# The main job on the embedded default: tiny checkpoint -> reference pipeline -> local Triton -> gRPC client.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CKPT=.build/tiny
OUT=out
mkdir -p "$OUT"

echo "== 1. tiny checkpoint (real layout, random weights, seed 0)"
[ -f "$CKPT/config.json" ] || $BIN/stepaudio2 tiny --out "$CKPT" --seed 0

echo "== 2. reference pipeline (in-process): ASR on a bundled clip, then a spoken voice-chat reply"
$BIN/stepaudio2 generate --checkpoint "$CKPT" --task asr --audio stepaudio2/assets/hello_en.wav --max-new-tokens 24
$BIN/stepaudio2 generate --checkpoint "$CKPT" --task voice-chat --audio stepaudio2/assets/weather_en.wav \
  --temperature 0 --max-new-tokens 120 --out-wav "$OUT/reference_reply.wav" --stream

echo "== 3. Triton server (exports ONNX on first run) + gRPC client"
PORT_GRPC=${PORT_GRPC:-18101}; PORT_HTTP=${PORT_HTTP:-18100}; PORT_METRICS=${PORT_METRICS:-18102}
$BIN/stepaudio2 serve --checkpoint "$CKPT" --runtime .build/serve \
  --grpc-port "$PORT_GRPC" --http-port "$PORT_HTTP" --metrics-port "$PORT_METRICS" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do grep -q "^ready" "$OUT/serve.log" && break; kill -0 $SERVER || { cat "$OUT/serve.log"; exit 1; }; sleep 1; done
grep "^ready" "$OUT/serve.log"
$BIN/stepaudio2-client --url "127.0.0.1:$PORT_GRPC" --task asr --audio stepaudio2/assets/nihao_zh.wav --max-new-tokens 24 --stream
$BIN/stepaudio2-client --url "127.0.0.1:$PORT_GRPC" --task translate --audio stepaudio2/assets/weather_en.wav --max-new-tokens 24 --stream
$BIN/stepaudio2-client --url "127.0.0.1:$PORT_GRPC" --task chat --text "What can you do?" --max-new-tokens 24 --stream
$BIN/stepaudio2-client --url "127.0.0.1:$PORT_GRPC" --task chat --text "What can you do?" --max-new-tokens 24 --json
echo "== metrics (excerpt)"
curl -s "http://127.0.0.1:$PORT_METRICS/metrics" | grep -E "^stepaudio2_(time_to_first_token_seconds_count|generated_tokens_total|llm_requests_finished_total)" || true
echo "== done (random tiny weights: the text is noise; the taught checkpoint will make it meaningful)"
