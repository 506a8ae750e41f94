#!/usr/bin/env bash
# Prepared device run for the planner: CUDA correctness on tiny checkpoints, then `tokenworks profile`
# of random-weight models of two public shapes in bfloat16 on the GPU (no checkpoint needs to travel).
# Carry the wheels the device image lacks (see benchmarks/gpu_check.sh): gguf, msgspec, pyzmq.
#   run(command="bash benchmarks/gpu_profile.sh", carry=[".whl"], timeout_s=540)
OUT="${OUT:-results/gpu}"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
HW=$(python3 -c "import torch; n=torch.cuda.get_device_name(0); print('H200-SXM-141GB' if 'H200' in n else 'H100-SXM-80GB' if 'H100' in n else n)")
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_tiny_checkpoints.py \
  --device cuda 2>&1 | tail -n 30 | tee "$OUT/tests.log"
timeout 240 python3 -m tokenworks.cli profile --random-weights benchmarks/configs/llama-3.1-8b.json --device cuda \
  --dtype bfloat16 --kv-cache-memory-gib 48 --max-num-batched-tokens 2048 --max-num-seqs 256 --kv-transport tcp \
  --hardware "$HW" --out "$OUT/gpu-llama-3.1-8b.json" 2>&1 | tr '\r' '\n' | grep -v "NIXL\|^profile:" | tee "$OUT/llama8b.log"
timeout 90 python3 -m tokenworks.cli profile --random-weights benchmarks/configs/smollm2-135m.json --device cuda \
  --dtype bfloat16 --kv-cache-memory-gib 8 --max-num-seqs 64 --kv-transport tcp --hardware "$HW" \
  --out "$OUT/gpu-smollm2-135m.json" 2>&1 | tr '\r' '\n' | grep -v "NIXL\|^profile:" | tee "$OUT/smollm2.log"
ls -la "$OUT"
