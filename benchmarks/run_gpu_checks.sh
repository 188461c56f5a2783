#!/usr/bin/env bash
# The GPU verification of this repository, as run on a lent H100/H200 (see the closing notes of each issue):
# GPU pytest (bf16 parity on CUDA), the notebooks' `#| cuda` cells, then the model benchmark.
# Wheels the GPU image lacks (nbdev and its deps, quicktok-v1) travel in .whl/; results go to $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
rc=0
python3 -m pytest tests -q -rs 2>&1 | tee "$OUT/pytest.log" | tail -15 || rc=1
for d in nbs kernels_nbs; do nbdev_test --path $d --flags "cuda triton" --do_print 2>&1 | tee "$OUT/nbdev_test_$d.log" | tail -5 || rc=1; done
python3 benchmarks/bench_model.py --out "$OUT/model.md" "$@" 2>&1 | tee "$OUT/bench.log" | tail -25 || rc=1
exit $rc
