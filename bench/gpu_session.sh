#!/usr/bin/env bash
# What a GPU session runs, in as few device calls as possible (see bench/NOTES.md). Each call is at
# most 10 minutes, so the stages can be split across calls: STAGES="tests" then STAGES="bench sweep";
# PYTEST_ARGS splits the suite further (e.g. PYTEST_ARGS=tests/test_gpu_only.py, or a -k expression;
# "-m slow tests/test_gpu_only.py" runs the autotuned launches, which the default run leaves out).
#   tests: the whole suite compiled on the GPU, GPU-only checks included (tests/test_gpu_only.py);
#   bench: python -m bench --quick;  sweep: the full sweep, or the part SWEEP_ARGS names (e.g.
#   SWEEP_ARGS="--shapes 4096x4096 --ranks 16 --label sweep-4096x4096-r16"). The runner stops starting
#   cells a minute or two before the timeout and writes what it measured (so does SIGTERM).
# Writes to $OUT (at most 8 files come back): env.txt, pytest.log, bench.log and the bench's csv/md/png.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/peft-ops-gpu}
STAGES=${STAGES:-tests bench}
mkdir -p "$OUT"
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
# the image's own torch and triton; offline, so no build isolation and no dependency resolution
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
# one device call runs at most 600 s: each stage gets its own limit, cut to what is left of CALL_LIMIT
CALL_LIMIT=${CALL_LIMIT:-540}  # leaves a minute after SIGTERM for the cell under way
limit() { local left=$((CALL_LIMIT - SECONDS)); echo $(( $1 < left ? $1 : left )); }
for stage in $STAGES; do
  case $stage in
    # compiling is CPU-bound: many workers (16 cores), few threads each; SIGINT, so pytest still prints
    # its summary when cut short; pytest-timeout (in the image) ends a hung test instead of the call
    tests) t=$(limit "${TEST_TIMEOUT:-540}")
           per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 300")
           OMP_NUM_THREADS=2 timeout -s INT "$t" python3 -m pytest -q -ra -n "${PYTEST_WORKERS:-12}" \
             -p no:cacheprovider $per_test ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -40 ;;
    bench) t=$(limit "${BENCH_TIMEOUT:-300}"); timeout "$t" python3 -m bench --quick --time-budget $((t - 90)) \
             --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | tail -30 ;;
    sweep) t=$(limit "${SWEEP_TIMEOUT:-540}"); timeout "$t" python3 -m bench ${SWEEP_ARGS:-} --time-budget $((t - 120)) \
             --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | tail -60 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
rm -f "$OUT/install.log"
ls -la "$OUT"
