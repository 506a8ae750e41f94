"""Compiles every Triton kernel the engine launches, for an NVIDIA GPU, on a machine without one.

    python tests/compile_kernels.py                 # sm_90 (H100, H200)
    python tests/compile_kernels.py --arch 80       # A100

The engine's CUDA path runs here on the CPU (random weights of SmolLM2-135M's
shape and of Llama-3.1-8B's layer shape, bfloat16 and float32; prefills, and
decode steps at a batch for each split count the decode graphs give, and the load-time
checks of ``fused.py`` and ``paged_decode.py``) with each Triton kernel
replaced by a recorder: the wrappers in ``triton_fused.py`` and
``triton_paged_decode.py`` run as they do on a GPU, and each distinct launch
(argument types and compile-time constants) is then compiled by Triton for the
target, through PTX to a cubin with the ptxas that ships with Triton. Prints
each kernel's registers, shared memory and local memory (register spills), and
exits 1 when a compile fails or a kernel needs more shared memory than the
target has: what the interpreter tests (``TRITON_INTERPRET=1``) cannot see, and
what would otherwise first show on a GPU, as a kernel the engine's load-time
check turns off.

Not modelled: Triton's specialisation of integer arguments equal to 1 or
divisible by 16 (a variant of the same code; it changes vector widths, not
whether it compiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default until 3.9, said so (no warning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler import compile as triton_compile  # noqa: E402

from tokenworks.model import fused, paged_decode, runner, triton_fused, triton_paged_decode  # noqa: E402
from tokenworks.model.cuda_graphs import capture_sizes  # noqa: E402
from tokenworks.model.linear import Linear  # noqa: E402

# Shared memory a block may use (bytes), by compute capability: the CUDA programming guide's table.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "configs")
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
         torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **constants)`` records the launch's
    signature and launches nothing."""

    def __init__(self, kernel, launches: dict) -> None:
        self.kernel = kernel
        self.launches = launches

    def __getitem__(self, grid):
        return self._record

    def _record(self, *args, **kwargs) -> None:
        names = self.kernel.arg_names
        values = dict(zip(names, args)) | kwargs
        constexpr = {p.name for p in self.kernel.params if p.is_constexpr}
        signature, constants = {}, {}
        for name in names:
            value = values[name]
            if name in constexpr:
                signature[name] = "constexpr"
                constants[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{self.kernel.__name__}: argument {name} of type {type(value).__name__}")
        key = (self.kernel.__name__, json.dumps(signature), json.dumps(constants, default=str))
        self.launches.setdefault(key, (self.kernel, signature, constants))


def gpu_layout(init):
    def plain(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        init(self, weight, bias)
        self.split, self.weight = False, weight.contiguous()

    return plain


def record_launches(arch_note: str) -> dict:
    """Runs the engine's CUDA path on the CPU with recorders for the kernels; the distinct launches seen."""
    launches: dict = {}
    for module in (triton_fused, triton_paged_decode):
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.JITFunction):
                setattr(module, name, Recorder(value, launches))
    # The dispatch as on CUDA: the kernels chosen, their load-time checks passed.
    paged_decode.triton_available = runner.triton_available = lambda device: True
    runner.kernel_check = lambda device, dtype: ""
    fused.kernels_problem = lambda device, dtype: ""
    # The matrix products are cuBLAS's on a GPU, not Triton kernels: zeros of their shape keep the CPU's work small.
    # The CUDA layout (no CPU split of W into column halves): the MLP then takes its SiLU-and-mul kernel.
    Linear.__call__ = lambda self, x: x.new_zeros(x.shape[0], self.out_features)
    Linear.__init__ = gpu_layout(Linear.__init__)

    from tokenworks.config import EngineArgs
    from tokenworks.llm import build_random_engine
    from tokenworks.model.weights import read_hf_config
    from tokenworks.sampling_params import SamplingParams

    def run(config, dtype: str, prompt_len: int) -> None:
        args = EngineArgs(device="cpu", dtype=dtype, num_blocks=512, max_num_seqs=64, max_model_len=1024,
                          enable_prefix_caching=False, overlap_schedule="off")
        engine = build_random_engine(args, config, "compile-check").engine
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)  # decode steps of the whole batch
        # One batch for each split count the decode graphs' batch sizes give (a compile-time constant each).
        batches = {triton_paged_decode.num_splits_for(b, config.num_kv_heads): b for b in capture_sizes(64)}
        for batch in sorted(batches.values()):
            for i in range(batch):
                engine.add_request(f"{batch}-{i}", [(7 * i + j) % 200 + 3 for j in range(prompt_len + i % 3)],
                                   params)
            while engine.has_unfinished():
                engine.step()
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        fused.kernel_check.__wrapped__("cpu", torch_dtype)  # the small cases checked at load on the GPU
        paged_decode.kernel_check.__wrapped__("cpu", torch_dtype)

    small = read_hf_config(os.path.join(CONFIGS, "smollm2-135m.json"))
    large = read_hf_config(os.path.join(CONFIGS, "llama-3.1-8b.json"))
    # The layers' shapes are what the kernels see; few layers and a small vocabulary keep the CPU's work small
    # (context lengths are not compile-time constants, so short prompts compile the same kernels as long ones).
    small = dataclasses.replace(small, num_layers=2, vocab_size=512)
    large = dataclasses.replace(large, num_layers=1, vocab_size=512)
    print(f"recording the launches of the CUDA path ({arch_note}) ...", flush=True)
    run(small, "bfloat16", 20)
    run(small, "float32", 20)  # the tiny fp32 checkpoints' dtype (the CUDA correctness tests)
    run(large, "bfloat16", 2)
    return launches


def resources(cubin: bytes) -> dict[str, int]:
    """REG, SHARED, LOCAL (bytes of local memory: register spills and stack) of the cubin's kernel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    fields = {}
    for line in out.stdout.splitlines():
        for part in line.split():
            key, _, value = part.partition(":")
            if key in ("REG", "SHARED", "LOCAL") and value.isdigit():
                fields[key] = int(value)
    return fields


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT), help="compute capability x 10")
    ap.add_argument("--json", default=None, help="also write each launch's figures to this file")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    t0 = time.perf_counter()
    launches = record_launches(f"sm_{args.arch}")
    print(f"recorded in {time.perf_counter() - t0:.0f} s", flush=True)
    expected = {v.kernel.__name__ for m in (triton_fused, triton_paged_decode) for v in vars(m).values()
                if isinstance(v, Recorder)}
    seen = {kernel.__name__ for kernel, _, _ in launches.values()}
    failures = [f"never launched: {name}" for name in sorted(expected - seen)]
    rows = []
    for kernel, signature, constants in launches.values():
        row = {"kernel": kernel.__name__, "constants": constants,
               "args": ",".join(t for t in signature.values() if t != "constexpr")}
        t0 = time.perf_counter()
        try:
            compiled = triton_compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=target)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit status says so
            row["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
            failures.append(f"{kernel.__name__} {constants}: {row['error']}")
        else:
            row |= resources(compiled.asm["cubin"])
            row["shared"] = compiled.metadata.shared
            if row["shared"] > SHARED_LIMIT[args.arch]:
                failures.append(f"{kernel.__name__} {constants}: {row['shared']} bytes of shared memory, "
                                f"sm_{args.arch} has {SHARED_LIMIT[args.arch]}")
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        figures = "failed" if "error" in row else \
            f"{row.get('REG', '?'):>3} registers, {row['shared']:>6} B shared, {row.get('LOCAL', '?')} B local, {row['compile_s']:.1f} s"
        print(f"{kernel.__name__:<24} {figures}   ({row['args']}; {constants})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "launches": rows}, f, indent=1)
    print(f"{len(rows)} launches of {len(seen)} kernels compiled for sm_{args.arch} with Triton {triton.__version__}; "
          f"{len(failures)} problems")
    for line in failures:
        print("PROBLEM:", line)
    return 1 if failures else 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)  # not sys.exit: Triton's bindings print hundreds of "leaked" lines at interpreter exit
