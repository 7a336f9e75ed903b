#!/usr/bin/env bash
# GPU evidence in one prepared script (issue #20): five steps, each under its own time limit,
# each writing its figures as JSON into one output folder; the whole run fits in 5 minutes.
#
#   bash benchmarks/gpu/run.sh [--dry] [--wheels DIR] [OUT]
#
#   OUT       output folder (default: $OUT, else runs/gpu_bench): one <step>.json per step,
#             summary.json (every step's status and seconds) and logs.txt (every step's
#             output): 8 files, the most the device tool brings back
#   --wheels  the folder benchmarks/gpu/pack_wheels.sh made (default build/gpu-wheels if it
#             exists); its missing packages are installed in step 2
#   --dry     (or GPU_BENCH_DRY=1) every step on CPU with a tiny config; pip only resolves
#
# Steps (limit): 1_env (35 s) environment report; 2_install (40 s) wheels; 3_train_throughput
# (110 s) bf16 tokens/s, TFLOP/s, MFU, step split, local (+ TE) spec; 3_attention (20 s)
# segments vs masked attention; 4_fp8 (55 s) FP8 vs bf16 loss curves or "absent";
# 5_rollout (40 s) colocated vLLM rollout + weight sync or "absent". A step that fails or runs
# out of time still leaves <step>.json saying so (status, exit code, the log's tail), and the
# later steps run. Limits scale with GPU_BENCH_TIME_SCALE (e.g. 2 for a slow machine).
# How to run it on a lent GPU machine: docs/benchmarks.md, "GPU evidence script".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 1
DRY=${GPU_BENCH_DRY:-0}
WHEELS=""
OUT_DIR=""
while (($#)); do
  case "$1" in
    --dry) DRY=1 ;;
    --wheels) WHEELS=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) OUT_DIR=$1 ;;
  esac
  shift
done
OUT_DIR=${OUT_DIR:-${OUT:-runs/gpu_bench}}
[[ -z "$WHEELS" && -d build/gpu-wheels ]] && WHEELS=build/gpu-wheels
mkdir -p "$OUT_DIR"
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
export GPU_BENCH_DRY=$DRY
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ "$DRY" != "0" ]]; then
  export CUDA_VISIBLE_DEVICES=""  # CPU even where a GPU exists
  # One intra-op thread: CPU machines running it (CI, shared dev boxes) are busy with other
  # work, where OpenMP teams of 2+ threads wait for each other at every op.
  export AUTOTHINK_THREADS=${AUTOTHINK_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
fi
PY=${PYTHON:-python3}
# The 5-minute budget is the GPU run's; a dry run on a shared CPU gets 3x the limits.
SCALE=${GPU_BENCH_TIME_SCALE:-1}
[[ "$DRY" != "0" ]] && SCALE=${GPU_BENCH_TIME_SCALE:-3}
export GPU_BENCH_TIME_SCALE=$SCALE
T_START=$(date +%s)
STATUS=()

# step NAME LIMIT_S JSON_NAME CMD...: run CMD under `timeout`; if it left no JSON, write one.
step() {
  local name=$1 limit=$2 json=$3
  shift 3
  limit=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { printf "%d", l * s }')
  local t0 rc
  t0=$(date +%s.%N)
  echo "== $name (limit ${limit} s)"
  timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local secs
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  tail -n 3 "$LOGS/$name.log" | sed 's/^/   /'
  if [[ $rc -ne 0 ]]; then
    local why="failed (exit $rc)"
    [[ $rc -eq 124 || $rc -eq 137 ]] && why="timed out after ${limit} s"
    "$PY" - "$OUT_DIR" "$json" "$why" "$rc" "$LOGS/$name.log" <<'PYEOF'
import json, sys, time
from pathlib import Path
out, name, why, rc, log = sys.argv[1:]
path = Path(out) / f"{name}.json"
old = json.loads(path.read_text()) if path.is_file() else {}
tail = Path(log).read_text(errors="replace").splitlines()[-25:] if Path(log).is_file() else []
old.update(step=name, status=why, rc=int(rc), log_tail=tail,
           time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
path.write_text(json.dumps(old, indent=1) + "\n")
PYEOF
    echo "   -> $why"
  fi
  STATUS+=("$name|$rc|$secs|$limit")
}

step 1_env 35 1_env "$PY" -m benchmarks.gpu.env_report --out "$OUT_DIR"
step 2_install 40 2_install "$PY" -m benchmarks.gpu.install --out "$OUT_DIR" --wheels "$WHEELS"
step 3_train_throughput 110 3_train_throughput \
  "$PY" -m benchmarks.gpu.train_bench throughput --out "$OUT_DIR"
step 3_attention 20 3_attention "$PY" -m benchmarks.gpu.train_bench attention --out "$OUT_DIR"
FP8_STEPS=50
[[ "$DRY" != "0" ]] && FP8_STEPS=${GPU_BENCH_DRY_FP8_STEPS:-20}
step 4_fp8 55 4_fp8 "$PY" -m benchmarks.gpu.train_bench fp8 --steps "$FP8_STEPS" --out "$OUT_DIR"
step 5_rollout 40 5_rollout "$PY" -m benchmarks.gpu.rollout_bench --out "$OUT_DIR"

for name in "${STATUS[@]%%|*}"; do
  echo "===== $name"; cat "$LOGS/$name.log"
done >"$OUT_DIR/logs.txt"
"$PY" - "$OUT_DIR" "$(($(date +%s) - T_START))" "${STATUS[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
out, total, rows = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
steps = {}
for row in rows:
    name, rc, secs, limit = row.split("|")
    f = out / f"{name}.json"
    status = json.loads(f.read_text()).get("status", "?") if f.is_file() else "no json"
    steps[name] = {"rc": int(rc), "seconds": float(secs), "limit_s": int(limit), "status": status}
summary = {"total_s": total, "steps": steps}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
for name, s in steps.items():
    print(f"{name:22s} {s['seconds']:6.1f} s / {s['limit_s']:3d} s  {s['status']}")
print(f"total {total} s -> {out}")
PYEOF
