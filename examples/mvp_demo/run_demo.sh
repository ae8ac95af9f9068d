#!/usr/bin/env bash
# Start the MVP demo: the API server on port 8080 and four replicas (chat, embed, heavy,
# stream) on 50051-50054. Ctrl-C stops exactly the processes this script started.
# Ports can be moved with API_PORT, CHAT_PORT, EMBED_PORT, HEAVY_PORT and STREAM_PORT.
set -euo pipefail

cd "$(dirname "$0")/../.."            # the repository root, so examples.* imports
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python
API_PORT="${API_PORT:-8080}"
API="http://localhost:${API_PORT}"
OBJECTS="${ANYSERVE_OBJECT_STORE:-/tmp/anyserve-objects}"
if command -v anyserve >/dev/null 2>&1; then ANYSERVE=(anyserve); else ANYSERVE=("$PYTHON" -m anyserve); fi

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "Stopping the demo (${#pids[@]} processes)..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "Stopped."
}
trap cleanup INT TERM EXIT

wait_for() {  # wait_for DESCRIPTION SECONDS COMMAND...
  local what=$1 deadline=$((SECONDS + $2)); shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then echo "timed out waiting for $what" >&2; exit 1; fi
    sleep 0.2
  done
}

echo "Starting the API server on port ${API_PORT}..."
"$PYTHON" -m anyserve.api_server --port "$API_PORT" --object-store "$OBJECTS" &
pids+=($!)
wait_for "the API server" 20 curl -sf "$API/health"

start_replica() {  # start_replica APP PORT ID
  "${ANYSERVE[@]}" "$1" --port "$2" --api-server "$API" --object-store "$OBJECTS" \
    --replica-id "$3" &
  pids+=($!)
}
echo "Starting the replicas..."
start_replica examples.mvp_demo.chat_app:app "${CHAT_PORT:-50051}" chat-replica
start_replica examples.mvp_demo.embed_app:app "${EMBED_PORT:-50052}" embed-replica
start_replica examples.mvp_demo.heavy_app:app "${HEAVY_PORT:-50053}" heavy-replica
start_replica examples.mvp_demo.stream_app:app "${STREAM_PORT:-50054}" stream-replica

registered() { [ "$(curl -sf "$API/registry" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["total"])')" -ge 4 ]; }
wait_for "four registered replicas" 30 registered

echo
echo "Registry:"
curl -s "$API/registry" | "$PYTHON" -m json.tool
cat <<MSG

The demo is running. Try, from another terminal:

  curl http://localhost:${API_PORT}/registry | python -m json.tool

  curl -X POST http://localhost:${API_PORT}/infer/json \\
    -H 'Content-Type: application/json' \\
    -H 'X-Capability-Type: chat' \\
    -d '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": ["Hello World"]}}]}'

  curl -N -X POST http://localhost:${API_PORT}/infer/stream \\
    -H 'Content-Type: application/json' \\
    -H 'X-Capability-Type: chat' \\
    -d '{"model_name": "chat", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": ["Hello"]}}]}'

  python examples/mvp_demo/test_client.py
  python examples/mvp_demo/test_stream_client.py

Press Ctrl-C to stop.
MSG
wait
