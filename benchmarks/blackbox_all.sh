#!/usr/bin/env bash
# Issue #19's evidence in one command, on this 2-core CPU machine: make the teacher (if it is not made yet),
# serve it with the real vLLM server, sweep each row's learning rate on the validation split, run the table
# (3 seeds, held-out split) and the exposure-bias meter for the untrained student, the SFT one and the best
# on-policy one (highest held-out greedy accuracy in the table; seed 0's model). Every step resumes: the
# teacher is kept, the cells are JSON, an exposure already measured is kept.
#
#   bash benchmarks/blackbox_all.sh            # OUT=runs/blackbox; the table in OUT/table.md
#
# Env: OUT, PY (python with opd_sdk), VLLM_PYTHON (default .venv-vllm/bin/python), PORT (default 8012).
# Arguments go to every blackbox.py call (the defaults there are the scale README reports).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/blackbox}"
PY="${PY:-python}"
PORT="${PORT:-8012}"
TEACHER="${TEACHER:-$HOME/.cache/opd-sdk/teachers/running_total-smollm2}"
URL="http://127.0.0.1:$PORT/v1"
ON_POLICY="reverse_kl gkd_jsd spin sft_then_reverse_kl gad"  # rows that train on the student's own samples
SAVED="sft $ON_POLICY"
mkdir -p "$OUT"

if [ ! -f "$TEACHER/teacher.json" ]; then
  "$PY" benchmarks/make_teacher.py --out "$TEACHER"  # exits 1 (and this script) below the 30-point bar
fi
VLLM_MODEL_DIR="$TEACHER" VLLM_SERVED_NAME=teacher VLLM_PORT="$PORT" VLLM_PID_FILE="$OUT/vllm.pid" \
  PYTHON="$PY" .ci/start_vllm.sh > /dev/null
trap '[ -f "$OUT/vllm.pid" ] && kill "$(cat "$OUT/vllm.pid")" 2>/dev/null; rm -f "$OUT/vllm.pid"' EXIT

"$PY" benchmarks/blackbox.py --mode sweep "$@" --teacher-url "$URL" --out "$OUT"
"$PY" benchmarks/blackbox.py --mode table --seeds 0 1 2 "$@" --teacher-url "$URL" --out "$OUT" \
  --save-models $SAVED

# The exposure-bias meter: the untrained student, off-policy SFT, the best on-policy row (seed 0 of the table)
best=$("$PY" -c "import json; rows=json.load(open('$OUT/table.json'))['rows']
print(max((r for r in rows if r['row'] in '$ON_POLICY'.split()), key=lambda r: r['greedy'][0])['row'])")
echo "blackbox_all: best on-policy row: $best"
for model in base sft "$best"; do
  [ -f "$OUT/exposure/$model/exposure.json" ] && continue
  flag=(); [ "$model" != base ] && flag=(--model "$OUT/models/$model")
  "$PY" -m opd_sdk.app.cli eval examples/configs/token_opd_running_total.yaml "${flag[@]}" --exposure --samples 2 \
    --set "teacher.base_url=$URL" --set data.eval_size=32 --set eval.max_new_tokens=40 \
    --set "output_dir=$OUT/exposure-run"
  src=$(ls -td "$OUT"/exposure-run/exposure/*/ | head -n 1)
  rm -rf "$OUT/exposure/$model"; mkdir -p "$OUT/exposure"; mv "$src" "$OUT/exposure/$model"
done
cat "$OUT/table.md"
