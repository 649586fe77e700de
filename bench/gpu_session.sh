#!/usr/bin/env bash
# What a GPU session runs, in as few device calls as possible (see bench/NOTES.md). Each call is at
# most 10 minutes, so the stages can be split across calls: STAGES="tests" then STAGES="bench sweep";
# PYTEST_ARGS splits the suite further (e.g. PYTEST_ARGS=tests/test_gpu_only.py, or a -k expression).
#   tests: the whole suite compiled on the GPU, GPU-only checks included (tests/test_gpu_only.py);
#   bench: python -m bench --quick;  sweep: the full sweep.
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
for stage in $STAGES; do
  case $stage in
    tests) timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -q -ra -n 4 -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
             | tee "$OUT/pytest.log" | tail -40 ;;
    bench) timeout "${BENCH_TIMEOUT:-300}" python3 -m bench --quick --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | tail -30 ;;
    sweep) timeout "${SWEEP_TIMEOUT:-540}" python3 -m bench --out "$OUT" 2>&1 | tee -a "$OUT/bench.log" | tail -60 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
rm -f "$OUT/install.log"
ls -la "$OUT"
