#!/usr/bin/env bash
# The main job on the embedded default: taught tiny checkpoint -> reference pipeline -> local Triton -> gRPC client
# (transcripts, a translation, streamed speech replies and a web_search tool-call round trip).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CKPT=.build/demo-taught
OUT=out
A=stepaudio2/assets
mkdir -p "$OUT"

echo "== 1. taught tiny checkpoint (real layout; fitted to a small curriculum from the bundled clips, cached)"
$BIN/stepaudio2 tiny --out "$CKPT" --taught

echo "== 2. reference pipeline (in-process): ASR, then a spoken voice-chat reply streamed to a wav"
$BIN/stepaudio2 generate --checkpoint "$CKPT" --task asr --audio $A/hello_en.wav
$BIN/stepaudio2 generate --checkpoint "$CKPT" --task voice-chat --audio $A/hello_en.wav \
  --out-wav "$OUT/reference_reply.wav" --stream

echo "== 3. Triton server (exports ONNX on first run) + OpenAI-compatible gateway + gRPC client"
PORT_GRPC=${PORT_GRPC:-18101}; PORT_HTTP=${PORT_HTTP:-18100}; PORT_METRICS=${PORT_METRICS:-18102}
PORT_GATEWAY=${PORT_GATEWAY:-18180}
$BIN/stepaudio2 serve --checkpoint "$CKPT" --runtime .build/serve --gateway-port "$PORT_GATEWAY" \
  --grpc-port "$PORT_GRPC" --http-port "$PORT_HTTP" --metrics-port "$PORT_METRICS" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do grep -q "^ready" "$OUT/serve.log" && break; kill -0 $SERVER || { cat "$OUT/serve.log"; exit 1; }; sleep 1; done
grep "^ready" "$OUT/serve.log"
C="$BIN/stepaudio2-client --url 127.0.0.1:$PORT_GRPC"
echo "-- asr (Mandarin clip)"; $C --task asr --audio $A/nihao_zh.wav --stream
echo "-- translate to English"; $C --task translate --target-language en --audio $A/nihao_zh.wav --stream
echo "-- chat"; $C --task chat --text "What can you do?" --max-new-tokens 24 --stream
echo "-- voice-chat: speech streamed back as it is synthesised"
$C --task voice-chat --audio $A/hello_en.wav --stream --out-wav "$OUT/voice_chat_reply.wav"
echo "-- voice-chat with web_search: the model calls the tool, the client runs it, the answer is spoken"
echo '[{"title": "Paris weather", "snippet": "sunny, 22 degrees, light wind.", "url": "https://weather.example/paris"}]' \
  > "$OUT/search_results.json"
$C --task voice-chat --today 2025-08-28 --audio $A/weather_en.wav --tools web_search --search-results "$OUT/search_results.json" \
  --stream --out-wav "$OUT/tool_answer_reply.wav"
echo "== 4. the same server through the OpenAI-compatible gateway (curl; the openai SDK works the same way)"
GW="http://127.0.0.1:$PORT_GATEWAY/v1"
echo "-- POST /v1/audio/transcriptions"
curl -sS "$GW/audio/transcriptions" -F model=step-audio-2-mini -F file=@$A/hello_en.wav; echo
echo "-- POST /v1/audio/translations"
curl -sS "$GW/audio/translations" -F model=step-audio-2-mini -F file=@$A/nihao_zh.wav; echo
echo "-- POST /v1/chat/completions (input_audio, spoken reply): the transcript of the reply"
printf '{"model": "step-audio-2-mini", "modalities": ["text", "audio"], "audio": {"voice": "default", "format": "wav"},
 "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"format": "wav", "data": "%s"}}]}]}' \
  "$(base64 -w0 $A/hello_en.wav)" > "$OUT/chat_request.json"
curl -sS "$GW/chat/completions" -H 'Content-Type: application/json' -d @"$OUT/chat_request.json" \
  | $BIN/python -c 'import sys, json; m = json.load(sys.stdin)["choices"][0]["message"]; print(m["audio"]["transcript"])'
echo "-- voice-chat page: http://127.0.0.1:$PORT_GATEWAY/ (while the server runs)"
echo "== metrics (excerpt)"
curl -s "http://127.0.0.1:$PORT_METRICS/metrics" | grep -E "^stepaudio2_(time_to_first_token_seconds_count|generated_tokens_total|time_to_first_audio_seconds_count|audio_generated_seconds_total|token2wav_batch_streams_count|tool_calls_total)" || true
echo "== done: replies in $OUT/*.wav (the tiny token2wav is random, so the audio is noise with the right timing)"
