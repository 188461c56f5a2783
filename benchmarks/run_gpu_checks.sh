#!/usr/bin/env bash
# The GPU verification of this repository, as run on a lent H100/H200 (see the closing notes of each issue).
#   bash benchmarks/run_gpu_checks.sh tests          # GPU pytest + the notebooks' `#| cuda` / `#| triton` cells
#   bash benchmarks/run_gpu_checks.sh bench-kernels  # benchmarks/bench_kernels.py (Liger-Kernel rows if importable)
#   bash benchmarks/run_gpu_checks.sh bench-model    # benchmarks/bench_model.py
#   bash benchmarks/run_gpu_checks.sh bench-moe      # benchmarks/bench_moe.py
#   bash benchmarks/run_gpu_checks.sh bench-generate # benchmarks/bench_generate.py (extra args pass through: --shapes 0.6B)
#   bash benchmarks/run_gpu_checks.sh all
# On a 2-GPU host, `tests` also runs tests/test_pretrain.py's NCCL test (DDP, FSDP2, resume on 1 GPU); it skips on one GPU.
# Wheels the GPU image lacks (fastcore, nbdev and its deps, quicktok-v1, liger-kernel) travel in .whl/; results go to $OUT.
set -uo pipefail
MODE=${1:-all}; shift || true
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
rc=0
if [ "$MODE" = tests ] || [ "$MODE" = all ]; then
  # four pytest processes at once (Triton compilation and autotuning are CPU-bound; the GPU is shared), then the notebooks
  K="tests/test_kernel_flash_attn.py"; P="tests/test_pretrain.py tests/test_checkpoint.py"
  O=$(ls tests/test_kernel_*.py | grep -v flash_attn | tr '\n' ' ')" tests/test_kernels_model.py"
  R=$(for f in tests/test_*.py; do case " $K $P $O " in *" $f "*) ;; *) echo -n "$f ";; esac; done)
  i=0; pids=()
  for group in "$K" "$P" "$O" "$R"; do
    i=$((i + 1)); python3 -m pytest $group -q -rs -p no:cacheprovider > "$OUT/pytest_$i.log" 2>&1 & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  for i in 1 2 3 4; do echo "pytest group $i: $(tail -1 "$OUT/pytest_$i.log")"; done
  for d in nbs kernels_nbs; do nbdev_test --path $d --flags "cuda triton" 2>&1 | tee "$OUT/nbdev_test_$d.log" | tail -8 || rc=1; done
fi
if [ "$MODE" = bench-kernels ] || [ "$MODE" = all ]; then
  python3 benchmarks/bench_kernels.py --out "$OUT/kernels.md" "$@" 2>&1 | tee "$OUT/bench_kernels.log" | tail -40 || rc=1
fi
if [ "$MODE" = bench-model ] || [ "$MODE" = all ]; then
  python3 benchmarks/bench_model.py --out "$OUT/model.md" "$@" 2>&1 | tee "$OUT/bench_model.log" | tail -25 || rc=1
fi
if [ "$MODE" = bench-moe ] || [ "$MODE" = all ]; then
  python3 benchmarks/bench_moe.py --out "$OUT/moe.md" "$@" 2>&1 | tee "$OUT/bench_moe.log" | tail -25 || rc=1
fi
if [ "$MODE" = bench-generate ] || [ "$MODE" = all ]; then
  python3 benchmarks/bench_generate.py --out "$OUT/generate.md" "$@" 2>&1 | tee "$OUT/bench_generate.log" | tail -40 || rc=1
fi
exit $rc
