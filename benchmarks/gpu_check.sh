#!/usr/bin/env bash
# The GPU checks in one command, from the repository root, on a machine with CUDA and torch but without network:
# the wheels in .whl/ (diffusers, hydra-core, omegaconf, antlr4, and what they need that such a machine may lack)
# go into /tmp/site, then benchmarks/gpu.py and the tests marked gpu run; logs and gpu.json go to $OUT.
# About 7 minutes at most: each step has a timeout (100 + 150 + 30 + 110 s, and the install), and gpu.py's parts
# start nothing new once their budgets (50 and 90 s) are spent. .whl/ (git-ignored) is filled on a machine with the registry:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
#     -d .whl diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 requests urllib3 certifi charset-normalizer idna \
#     pillow pytest pluggy iniconfig pygments
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # published as a source archive only
set -u
OUT=${OUT:-outputs/bench}
mkdir -p "$OUT"
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; } >"$OUT/machine.txt" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled
# SDXL- and Flux-sized networks at 1024 px in bf16, in a process of their own (their memory freed after)
timeout 100 python3 benchmarks/gpu.py --parts large --large-budget-s 50 --out "$OUT/gpu-large.json" 2>&1 |
    tee "$OUT/gpu-large.log"
large=${PIPESTATUS[0]}
timeout 150 python3 benchmarks/gpu.py --parts unet --budget-s 90 --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
bench=${PIPESTATUS[0]}
# caches on a tiny random DiT on the GPU (speed-up and ref_rmse against the uncached run); informative only
timeout 30 python3 benchmarks/cache.py --smoke --device cuda --out "$OUT/cache.json" 2>&1 | tee "$OUT/cache.log"
timeout 110 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=0 tests/test_gpu.py 2>&1 |
    tee "$OUT/pytest-gpu.log"
tests=${PIPESTATUS[0]}
echo "benchmark exits: large $large, unet $bench; gpu tests exit $tests"
[ "$large" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$tests" -eq 0 ]
