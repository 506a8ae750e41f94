# Sourced by the prepared device runs (gpu_check.sh, gpu_profile.sh, gpu_fidelity.sh) after they set OUT:
# makes $OUT, and puts the wheels the device image lacks (carried in .whl/, see each script) on PYTHONPATH.
set -uo pipefail
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="/tmp/site:$PWD"
