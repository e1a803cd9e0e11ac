#!/usr/bin/env bash
# Every GPU check and timing of saetune in one capped run, for a GPU machine that holds a copy of this
# checkout (WHEELS: a folder with the anchors' wheels). Figures land in $OUT (JSON)
# as each step ends, so a cut-off run still returns what it measured.
#   OUT=results-gpu bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-bench/results-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia_smi.txt" 2>&1
python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1
# the anchors need sae-lens and sparsify: WHEELS=dir of their wheels (PERF.md lists them)
[ -n "${WHEELS:-}" ] && python -m pip install -q --no-deps "$WHEELS"/*.whl >> "$OUT/install.txt" 2>&1
# 1. kernels against their torch twins on CUDA (compiled, not interpreted)
timeout 240 python -m pytest -q tests/gpu -p no:cacheprovider > "$OUT/tests_gpu.txt" 2>&1
# 2. SAE step beside SAELens and sparsify (configs A and B, 16k batches) and the entropy kernel
BENCH_MAX_S=200 OUT="$OUT" timeout 260 python bench/kernels_bench.py > "$OUT/kernels_bench.txt" 2>&1
# 3. one SAE-Tuning step at the Qwen2.5-1.5B shape beside the reference step (target >= 3x)
SHAPES=toy,qwen1.5b STEPS=6 OUT="$OUT/tune_step.json" timeout 240 python bench/tune_step.py > "$OUT/tune_step.txt" 2>&1
tail -n 5 "$OUT"/*.txt
