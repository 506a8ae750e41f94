#!/usr/bin/env bash
# One prepared device run for the open GPU issues, inside one call's 600 s (the device lends 15 minutes a session,
# its start included), most wanted first, each step under its own timeout so that a slow step costs only itself:
#   1. the CUDA tests: paged decode kernel, decode graphs, attention, greedy equality with transformers,
#      overlapped steps (same tokens; no launch waits for the device: sync debug mode "error"), the fused
#      kernels against their PyTorch reference, speculative decoding's drafts on the eager path           (issue 11)
#   2. benchmarks/engine.py, SmolLM2-135M's shape: decode batches vs the CUDA-graph floor and the HBM roofline,
#      each also not overlapped (what overlapping buys), the long-context mix (one 4k request and 31 short) (issue 11)
#   3. benchmarks/fused_ops.py: each fused kernel against the PyTorch operations it replaces, in CUDA graphs (issue 11)
#   4. benchmarks/engine.py, Llama-3.1-8B's shape: batch-1 vs HBM roofline, 4k prefill vs matmul rate   (issue 11)
#   5. benchmarks/serving_path.py: served vs offline at 1, 16 and 64 streams, router CPU per token (the load
#      generator in 4 processes on a 16-core host: one client core parses fewer events than the GPU streams), and
#      benchmarks/router_path.py: the router's CPU per token with no engine, against a bare uvicorn stream, at 20 ms
#      steps and at 2.5 ms (64 streams at a GPU's step: does this host's router keep up?)                 (issue 12)
# Every step writes into $OUT as it goes, so a call cut short still brings back what finished.
#   bash benchmarks/gpu_wheels.sh
#   run(command="bash benchmarks/gpu_issues.sh", carry=[".whl"], timeout_s=590)
# Figures go into docs/engine.md ("The GPU decode path") and docs/serving.md; say which card gave them.
OUT="${OUT:-results/gpu-issues}"
source benchmarks/gpu_env.sh
start=$SECONDS
step() { echo "== $1 (at ${SECONDS}s)" | tee -a "$OUT/steps.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, tokenizers; print('torch', torch.__version__, 'triton', triton.__version__,
'tokenizers', tokenizers.__version__)" | tee -a "$OUT/gpu.txt"
step "1 CUDA tests"
# Not -x: a first run on a GPU should show every failure (whole log in tests.log, the summary printed).
timeout 120 python3 -m pytest -q --maxfail=10 --tb=short -rfE -p no:cacheprovider tests/test_triton_paged_decode.py \
  tests/test_cuda_graphs.py tests/test_attention.py tests/test_tiny_checkpoints.py tests/test_overlap.py \
  tests/test_triton_fused.py tests/test_speculative.py -k "not default_model" --device cuda > "$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 30
step "2 engine, SmolLM2-135M shape"
timeout 110 python3 benchmarks/engine.py --shape smollm2-135m --device cuda --json "$OUT/smollm2.json" 2>&1 \
  | tee "$OUT/smollm2.log"
step "3 fused kernels"
timeout 45 python3 benchmarks/fused_ops.py --shape smollm2-135m --tokens 1,64 2>&1 | tee "$OUT/fused_ops.log"
step "4 engine, Llama-3.1-8B shape"
timeout 100 python3 benchmarks/engine.py --shape llama-3.1-8b --device cuda --batches 1,32 --steps 12 \
  --skip-floor --long-context 0 --json "$OUT/llama8b.json" 2>&1 | tee "$OUT/llama8b.log"
step "5 serving path"
left=$(( 560 - (SECONDS - start) ))
python3 benchmarks/random_chat_model.py /tmp/rand-smollm2 > /dev/null
timeout $(( left > 90 ? left - 75 : 20 )) python3 benchmarks/serving_path.py --model /tmp/rand-smollm2 --device cuda \
  --concurrency 1,16,64 --output-len 128 --rounds 1 --min-requests 4 --json "$OUT/serving_path.json" 2>&1 \
  | grep -v "NIXL\|it/s\]\|req/s\]" | tee "$OUT/serving_path.log"
for s in 0.02 0.0025; do
  timeout 35 python3 benchmarks/router_path.py --model /tmp/rand-smollm2 --concurrency 64 --output-len 128 --rounds 1 \
    --step $s --waves 1 2>&1 | tail -n 3 | tee -a "$OUT/router_path.log"
done
step "done"
ls -la "$OUT"
