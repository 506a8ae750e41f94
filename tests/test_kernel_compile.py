"""Every Triton kernel the engine's CUDA path launches compiles for an H100/H200 (sm_90), here, without a GPU.

The interpreter tests (``TRITON_INTERPRET=1``) check what the kernels compute; they never run Triton's compiler,
so a kernel that does not compile for a GPU, or asks for more shared memory than it has, would first show on a
device, as a kernel the engine's load-time check turns off. ``tests/compile_kernels.py`` records the launches of
the CUDA path run on the CPU and compiles each to a cubin with the ptxas that ships with Triton.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# Not imported here: triton reads TRITON_INTERPRET when first imported, and the interpreter tests set it later in
# this process (the compiling runs in a process of its own).
if importlib.util.find_spec("triton") is None:  # a test dependency (pyproject [test]); present in CI
    pytest.skip("triton is not installed", allow_module_level=True)

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_kernels.py")


def test_every_kernel_compiles_for_sm90(tmp_path):
    out = tmp_path / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, SCRIPT, "--arch", "90", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())
    launches = report["launches"]
    assert not [row for row in launches if "error" in row]
    kernels = {row["kernel"] for row in launches}
    assert kernels == {"_split_kernel", "_combine_kernel", "_add_rms_norm_kernel", "_silu_mul_kernel",
                       "_rope_write_kv_kernel"}
    split = [row for row in launches if row["kernel"] == "_split_kernel"]
    # Both shapes' head sizes, both dtypes, and every split count the decode graphs' batch sizes give.
    assert {row["constants"]["HEAD_DIM"] for row in split} == {64, 128}
    assert {row["args"].split(",")[0] for row in split} == {"*bf16", "*fp32"}
    assert {row["constants"]["NUM_SPLITS"] for row in split if row["constants"]["HEAD_DIM"] == 128} \
        == {1, 2, 4, 8, 16}
    for row in launches:
        assert row["REG"] <= 255 and row["shared"] <= 227 * 1024, row
