#!/usr/bin/env bash
# Prepared device run for the GPU engine (issue 11): the CUDA tests of the paged decode kernel, the decode graphs and
# greedy equality with transformers, then benchmarks/engine.py on random-weight models of two public shapes, each
# against the plain-PyTorch CUDA-graph floor and the HBM roofline measured in the same run; the 135M shape also with
# --enforce-eager (what the graphs buy). The device image lacks some of our dependencies; carry their wheels:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     -d .whl gguf msgspec pyzmq fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection \
#     prometheus-client httpx httpcore h11 anyio sniffio
#   run(command="bash benchmarks/gpu_engine.sh", carry=[".whl"], timeout_s=560)
# Figures go into docs/engine.md ("The GPU decode path"); say which card gave them.
OUT="${OUT:-results/gpu-engine}"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_paged_decode.py tests/test_cuda_graphs.py \
  tests/test_attention.py tests/test_tiny_checkpoints.py --device cuda 2>&1 | tail -n 25 | tee "$OUT/tests.log"
timeout 110 python3 benchmarks/engine.py --shape smollm2-135m --device cuda --json "$OUT/smollm2.json" 2>&1 \
  | tee "$OUT/smollm2.log"
timeout 60 python3 benchmarks/engine.py --shape smollm2-135m --device cuda --enforce-eager --skip-floor \
  --long-context 0 --batches 1,64 --json "$OUT/smollm2-eager.json" 2>&1 | tee "$OUT/smollm2-eager.log"
timeout 200 python3 benchmarks/engine.py --shape llama-3.1-8b --device cuda --json "$OUT/llama8b.json" 2>&1 \
  | tee "$OUT/llama8b.log"
ls -la "$OUT"
