#!/usr/bin/env bash
# Prepared device run for disaggregated serving on one GPU (issue 10): the CUDA transfer tests, KV transfer
# bandwidth per path against a device-to-device copy, greedy equality of 1 prefill + 1 decode worker with an
# aggregated worker (float32), and the two layouts under load at concurrency 1, 16, 64 (bf16).
# The model is a random-weight one of SmolLM2-135M's shape with a tokenizer (benchmarks/random_chat_model.py);
# the KV bandwidth also covers Llama-3.1-8B's KV shape. Carry the wheels the image lacks (gpu_env.sh):
#   run(command="bash benchmarks/gpu_disagg.sh", carry=[".whl"], timeout_s=480)
OUT="${OUT:-results/gpu-disagg}"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_transfer.py --device cuda 2>&1 | tail -n 25 | tee "$OUT/tests.log"
timeout 120 python3 benchmarks/kv_transfer.py --device cuda --shapes smollm2-135m,llama-3.1-8b --tokens 1024,4096 \
  --reps 10 --json "$OUT/kv_transfer.json" 2>&1 | tee "$OUT/kv_transfer.log"
python3 benchmarks/random_chat_model.py /tmp/rand-smollm2 > /dev/null
timeout 300 python3 benchmarks/disagg_serving.py --model /tmp/rand-smollm2 --serve-flags "--gpus 0 --kv-transport tcp" \
  --concurrency 1,16,64 --input-len 512 --output-len 128 --num-requests 8 --json "$OUT/disagg_serving.json" 2>&1 \
  | grep -v "NIXL\|it/s\]" | tee "$OUT/disagg_serving.log"
for f in /tmp/tokenworks-test-serve-*.log; do [ -f "$f" ] && tail -n 30 "$f" >> "$OUT/server.log"; done
echo done
