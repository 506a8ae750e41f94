#!/usr/bin/env bash
# Prepared device run: simulator fidelity on a GPU host, where the router and load generator do not
# share the worker's cores. One aggregated worker on the GPU serves a random-weight model of
# SmolLM2-135M's shape (its checkpoint cannot travel); the simulator uses the profile measured on an
# H200 for that shape (docs/profiles/h200-smollm2-135m.json).
# Carry the wheels the device image lacks (gguf msgspec pyzmq fastapi starlette pydantic pydantic_core
# annotated-types typing-inspection typing_extensions uvicorn opentelemetry-api):
#   run(command="bash benchmarks/gpu_fidelity.sh", carry=[".whl"], timeout_s=420)
OUT="${OUT:-results/gpu-fidelity}"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/random_chat_model.py /tmp/rand-smollm2
timeout 330 python3 benchmarks/sim_fidelity.py --model /tmp/rand-smollm2 --serve-flags "--gpus 0 --kv-transport tcp" \
  --layouts aggregated --profile-1core docs/profiles/h200-smollm2-135m.json \
  --profile-all docs/profiles/h200-smollm2-135m.json --rates 4,8,16 --num-requests 60 --warmup 40 \
  --slo-ttft-ms 1000 --slo-tpot-ms 30 --out "$OUT" 2>&1 | grep -v "NIXL" | tee "$OUT/log.txt"
ls /tmp/tokenworks-test-serve-*.log >/dev/null 2>&1 && tail -n 40 /tmp/tokenworks-test-serve-*.log > "$OUT/server.log"
