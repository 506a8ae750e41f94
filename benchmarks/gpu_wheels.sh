#!/usr/bin/env bash
# Downloads into .whl/ the wheels the device image lacks (it has Python 3.12, PyTorch, Triton, transformers), for the
# prepared device runs (benchmarks/gpu_*.sh), which install them with gpu_env.sh (not tokenizers: the image's serves
# transformers, and the router works with older ones). FastAPI 0.165 imports annotated-doc and opentelemetry-api,
# uvicorn imports click: found 2026-11-28 by installing these wheels alone in an empty venv and importing
# tokenworks.cli, the router API, the worker and the load generator (do that again when a wheel's version moves).
# Run here, once, before `run`:
#   bash benchmarks/gpu_wheels.sh && run(command="bash benchmarks/gpu_issues.sh", carry=[".whl"], timeout_s=570)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  gguf msgspec pyzmq fastapi starlette uvicorn uvloop httptools pydantic pydantic-core annotated-types \
  typing-inspection prometheus-client httpx httpcore h11 anyio sniffio pyyaml aiohttp aiohappyeyeballs aiosignal \
  frozenlist multidict propcache yarl attrs idna annotated-doc opentelemetry-api click
du -sh .whl
