#!/usr/bin/env bash
# The GPU checks in one command, from the repository root, on a machine with CUDA and torch but without network:
# the wheels in .whl/ (diffusers, hydra-core, omegaconf, antlr4, and what they need that such a machine may lack)
# go into /tmp/site, then benchmarks/gpu.py and the tests marked gpu run; logs and gpu.json go to $OUT.
# About 7 minutes at most: each step has a timeout.
set -u
OUT=${OUT:-outputs/bench}
mkdir -p "$OUT"
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } >"$OUT/machine.txt" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled
timeout 300 python3 benchmarks/gpu.py --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
bench=${PIPESTATUS[0]}
timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.log"
tests=${PIPESTATUS[0]}
echo "benchmark exit $bench, gpu tests exit $tests"
[ "$bench" -eq 0 ] && [ "$tests" -eq 0 ]
