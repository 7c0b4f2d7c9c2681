#!/usr/bin/env bash
# Throughput of `mmllm serve` with N concurrent openai clients, next to the same jobs through
# `mmllm batch` (one image + prompt each, greedy, exactly MAX_TOKENS generated).
#   bash scripts/bench_serve.sh [MODEL] [IMAGE] [CLIENTS] [REQUESTS] [MAX_TOKENS]
# MMLLM=path/to/mmllm (default target/release/mmllm), DEVICE=cpu|cuda (default auto).
# Needs the venv of scripts/test_venv.sh. Prints two JSON lines: serve, then batch.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-tests/fixtures/qwen2-vl-tiny}
IMAGE=${2:-tests/data/qwen_china_517x333.jpg}
CLIENTS=${3:-8}
REQUESTS=${4:-64}
MAX_TOKENS=${5:-64}
BIN=${MMLLM:-target/release/mmllm}
DEVICE=${DEVICE:-auto}
PY=target/test-venv/bin/python
[ -x "$PY" ] || { echo "bench_serve: run bash scripts/test_venv.sh first" >&2; exit 2; }
work=$(mktemp -d)
trap 'kill -TERM "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

"$BIN" serve --model "$MODEL" --port 0 --device "$DEVICE" --max-seqs "$CLIENTS" 2>"$work/serve.log" &
pid=$!
for _ in $(seq 600); do
  addr=$(grep -o 'http://[0-9.:]*' "$work/serve.log" | head -1 || true)
  [ -n "$addr" ] && break
  sleep 0.2
done
[ -n "$addr" ] || { cat "$work/serve.log" >&2; exit 1; }
# One warm-up request, then the timed run.
"$PY" scripts/serve_load.py bench --base-url "$addr/v1" --model "$MODEL" --image "$IMAGE" \
  --clients 1 --requests 1 --max-tokens 4 >/dev/null
serve=$("$PY" scripts/serve_load.py bench --base-url "$addr/v1" --model "$MODEL" --image "$IMAGE" \
  --clients "$CLIENTS" --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" --ignore-eos)
echo "{\"mode\": \"serve\", \"model\": \"$MODEL\", \"device\": \"$DEVICE\", ${serve#\{}"
kill -TERM "$pid"; wait "$pid" || true; pid=

{
  echo "defaults: {model: $(realpath "$MODEL"), max_tokens: $MAX_TOKENS, ignore_eos: true, prompt: Describe the image.}"
  echo "jobs:"
  for i in $(seq "$REQUESTS"); do echo "  - {id: j$i, images: [$(realpath "$IMAGE")]}"; done
} >"$work/jobs.yaml"
start=$(date +%s.%N)
"$BIN" batch "$work/jobs.yaml" --device "$DEVICE" --max-seqs "$CLIENTS" -o "$work/out.jsonl" 2>"$work/batch.log"
end=$(date +%s.%N)
python3 - "$work/out.jsonl" "$start" "$end" "$REQUESTS" "$CLIENTS" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
secs = float(sys.argv[3]) - float(sys.argv[2])
tokens = sum(len(l.get("token_ids", [])) for l in lines)
print(json.dumps({"mode": "batch", "max_seqs": int(sys.argv[5]), "requests": len(lines),
                  "seconds": round(secs, 3), "requests_per_s": round(len(lines) / secs, 2),
                  "output_tokens_per_s": round(tokens / secs, 1), "includes_model_load": True}))
PY
