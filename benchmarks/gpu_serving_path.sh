#!/usr/bin/env bash
# Prepared device run for the serving path (issue 12): offline engine vs one served aggregated worker on the GPU at
# concurrency 1, 16, 64 (served/offline target >= 0.9), one stream's token gap vs the engine step (<= 1.15x), and the
# router's CPU per delivered token. Random-weight model of SmolLM2-135M's shape with a tokenizer.
#   run(command="bash benchmarks/gpu_serving_path.sh", carry=[".whl"], timeout_s=300)
# .whl must also hold uvloop and httptools (cp312 manylinux wheels) beside the ones gpu_env.sh lists.
OUT="${OUT:-results/gpu-serving-path}"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/random_chat_model.py /tmp/rand-smollm2 > /dev/null
timeout 240 python3 benchmarks/serving_path.py --model /tmp/rand-smollm2 --device cuda --concurrency 1,16,64 \
  --output-len 128 --json "$OUT/serving_path.json" 2>&1 | grep -v "NIXL\|it/s\]\|req/s\]" | tee "$OUT/serving_path.log"
