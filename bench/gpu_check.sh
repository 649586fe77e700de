#!/usr/bin/env bash
# The one-call GPU check (bench/NOTES.md, "The GPU check"): everything a session with a lent GPU runs, in
# ONE device call of at most 8 minutes, each stage cut by its own time budget and writing what it finished:
#   1. smoke (~2.5 min): environment, then compiled correctness: every method, forward and backward,
#      bf16 and fp32, both implementations (fused, composed) and both GEMM paths, against float64; the
#      M·K > 2³¹, > 65535-row-block and N = 128256 cases (tests/test_gpu_only.py);
#   2. headline (~3 min): 4096³ and M = 16 at r = 16, bf16, forward and forward+backward: F.linear, our
#      GEMM without adapter, fused, composed, dispatched, eager, torch.compile, PEFT, as ratios to F.linear;
#   3. memory (~45 s): a tiny Llama's bytes and the CUDA peak of a training step, bf16 base against a 4-bit
#      NF4 base, every method and PEFT's LoRA (python -m bench --mode memory);
#   4. svd (≤ 40 s): LoRA-XS's SVD on the GPU (svd_device="weight") against the CPU for a 4096×4096
#      bf16 weight at r = 16: seconds each, factor differences after the cast, signature check
#      (bench/svd_check.py);
#   5. suite: the rest of the test suite, as much as the time left allows (the log says what ran).
# It prints one short table last and writes at most 8 files, flat, under $OUT (the device returns no
# more): the memory and svd stages' tables go into summary.md.
#   bash bench/gpu_check.sh             on the GPU machine (run: `bash bench/gpu_check.sh`, timeout_s=540)
#   bash bench/gpu_check.sh --rehearse  the same stages in smoke mode on a CPU, in about a minute (CI runs it)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/peft-ops-gpu}
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_SECONDS:-470}  # the whole call: 8 minutes less the summary
left() { local l=$((TOTAL - SECONDS)); echo $(( $1 < l ? $1 : (l > 0 ? l : 1) )); }
declare -A STATUS

{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null \
    || echo "no nvidia-smi"
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton',
triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ $REHEARSE = 0 ]; then
  # the image's own torch and triton; offline, so no build isolation and no dependency resolution
  $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/suite.log" 2>&1 || { cat "$OUT/suite.log"; exit 1; }
  WORKERS="-n ${PYTEST_WORKERS:-12}"
  SMOKE_TESTS="tests/test_dispatch.py tests/test_gpu_only.py tests/test_fused_forward.py tests/test_fused_backward.py"
  SMOKE_SELECT="not slow"
  HEADLINE="--quick --methods loraxs tlora --label headline"
  MEMORY=""
  SUITE_ARGS="--ignore=tests/test_gpu_only.py --ignore=tests/test_dispatch.py --ignore=tests/test_fused_forward.py --ignore=tests/test_fused_backward.py"
  SVD_ARGS=""
else
  WORKERS=""
  SMOKE_TESTS="tests/test_dispatch.py"
  SMOKE_SELECT="forced_implementation_runs_alone and loraxs and 40"
  HEADLINE="--methods loraxs --providers base dispatch --modes forward_backward --label headline"
  MEMORY="--adapters loraxs"
  SUITE_ARGS="tests/test_packaging.py"
  SVD_ARGS="--shape 1024x4096"
fi

# compiling is CPU-bound: many workers, few threads each; SIGINT so pytest still prints its summary
stage_pytest() {  # name, seconds, pytest args...
  local name=$1 t; t=$(left "$2"); shift 2
  OMP_NUM_THREADS=2 timeout -s INT "$t" $PY -m pytest -q -ra -p no:cacheprovider $WORKERS "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  STATUS[$name]="rc=$rc; $(grep -E '^(=+ )?[0-9]+ (passed|failed)|no tests ran|Interrupted' "$OUT/$name.log" | tail -1)"
}

stage_pytest smoke "${SMOKE_SECONDS:-150}" $SMOKE_TESTS -k "$SMOKE_SELECT"

t=$(left "${HEADLINE_SECONDS:-190}")
timeout "$t" $PY -m bench $HEADLINE --time-budget $((t > 60 ? t - 40 : t / 2)) --out "$OUT" > "$OUT/headline.log" 2>&1
STATUS[headline]="rc=$?"

MEMORY_LOG=$(mktemp)
timeout "$(left "${MEMORY_SECONDS:-45}")" $PY -m bench --mode memory $MEMORY > "$MEMORY_LOG" 2>&1
STATUS[memory]="rc=$?"

SVD_LOG=$(mktemp)
timeout "$(left "${SVD_SECONDS:-40}")" $PY -m bench.svd_check $SVD_ARGS > "$SVD_LOG" 2>&1
STATUS[svd]="rc=$?"

stage_pytest suite "$(left 600)" $SUITE_ARGS

{
  echo "## GPU check $(head -1 "$OUT/env.txt")"
  sed -n '2,$p' "$OUT/env.txt"
  echo
  echo "| stage | result |"
  echo "|---|---|"
  for s in smoke headline memory svd suite; do echo "| $s | ${STATUS[$s]:-not run} |"; done
  echo
  grep -E '^\| (loraxs|tlora) ' "$OUT/headline.log" | head -16
  grep -E 'STOPPED EARLY|WRONG RESULT|every provider' "$OUT/headline.log"
  echo
  grep -E '^(memory:|\|)' "$MEMORY_LOG"
  echo
  tail -20 "$SVD_LOG"
  $PY - <<'EOF'
import json, os, peft_ops.dispatch as d
path = os.path.join(os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache"), "peft_ops")
files = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else []
for f in files:
    for row in json.load(open(f)):
        print("dispatch:", row["key"], "->", row["choice"], f"fused {row['fused_ms']} ms, composed {row['composed_ms']} ms")
EOF
} > "$OUT/summary.md" 2>&1
rm -f "$SVD_LOG"
ls "$OUT"
cat "$OUT/summary.md"
