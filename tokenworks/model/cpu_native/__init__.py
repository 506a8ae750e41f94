"""Native CPU kernels: 4-bit matrix products and a fused step, compiled on the machine that runs them.

``kernels.c`` is built once per machine with the system's C compiler (``cc -O3 -march=native -fopenmp``, about
a second) into the cache folder, keyed by the source, the flags and the CPU, and loaded with ctypes. It needs
x86-64 with AVX2, FMA and F16C. Where there is no compiler or no AVX2, or ``TOKENWORKS_NATIVE_KERNELS=0`` is set,
``library()`` returns None and says why in ``unavailable_reason()``: the 4-bit layers then run on PyTorch's
int4 kernel and steps layer by layer in PyTorch, as before.

- ``NativeQ4``: a Q4 matrix in GGUF's block layout, ``y = x @ W.T + b`` for any number of rows, and W written
  out whole in float32 or bfloat16 (``dequantize_into``) for products of many rows on PyTorch's BLAS.
- ``NativeQ8``: the same for a Q8_0 matrix (the default model's tied embedding and output matrix).
- ``NativeStep``: every layer of a step in one call (norms, q/k/v, RoPE, KV writes, attention through the block
  tables, the MLP) for decode rows and prompt chunks alike, the 4-bit layers read once per step for all rows.
- ``tw_sample`` (``race.c``): sampling's random choice for a batch of rows, after temperature, top-k, top-p and
  min-p (``tokenworks/model/race.py``); ``tw_grammar_mask`` (``grammar_mask.c``): structured output's token masks.

Activations enter the 4-bit products as int16 per group of 32 (an integer dot product on AVX2);
the weights are the GGUF's codes, scales and minimums exactly. Products of several rows (batches, prompts) multiply
in bfloat16 instead where the CPU can: on AMX tiles from 4 rows (``amx_rows``), else on AVX512-BF16 from 3
(``bf16_rows``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch

from tokenworks.config import default_cache_dir

SOURCE = os.path.join(os.path.dirname(__file__), "kernels.c")  # it includes the other .c files here
SOURCES = (SOURCE, *(os.path.join(os.path.dirname(__file__), f)
                     for f in ("amx.c", "amx_attention.c", "race.c", "grammar_mask.c")))
# Products of this many activation rows or more run on AMX where the CPU has it (amx.c); 0 turns AMX off.
AMX_ROWS_ENV = "TOKENWORKS_AMX_ROWS"
AMX_ROWS = 4
# Where AMX is not, products of this many rows or more multiply in bfloat16 on AVX512-BF16's dot products if the
# CPU has them (kernels.c: bf16_tile; AMD Zen 4 and 5). On a Zen 5: a step of 4 rows 0.91x the time of the exact
# byte products (kernels.c: tile4_bytes), of 3 rows 1.07x (2026-11-30, since the byte products unpack a group's
# weights once for all their rows; before, 3 rows took 0.84-0.90x).
BF16_ROWS = 4
# TOKENWORKS_NATIVE_MARCH=x86-64-v3 builds for AVX2 alone: an older machine's paths, run and tested on a newer CPU.
MARCH_ENV = "TOKENWORKS_NATIVE_MARCH"
# Reassociation lets sums vectorize; never -ffast-math: gcc then links crtfastmath into the library, and loading
# it would flush subnormal floats to zero for the whole process.
FLAGS = ["-O3", f"-march={os.environ.get(MARCH_ENV) or 'native'}", "-fno-math-errno", "-fno-trapping-math",
         "-fassociative-math", "-fno-signed-zeros", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_P = ctypes.c_void_p
_I = ctypes.c_int64


class _Q4Mat(ctypes.Structure):
    _fields_ = [("n", _I), ("k", _I), ("codes", _P), ("d", _P), ("m", _P), ("bias", _P), ("panels", _P),
                ("panel_dm", _P)]


class _Q8Mat(ctypes.Structure):
    _fields_ = [("n", _I), ("k", _I), ("codes", _P), ("d", _P), ("panels", _P), ("panel_d", _P)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P), ("q_norm", _P), ("k_norm", _P),
                ("qkv", _Q4Mat), ("o", _Q4Mat), ("gate_up", _Q4Mat), ("down", _Q4Mat)]


class _Net(ctypes.Structure):
    _fields_ = [("hidden", _I), ("num_heads", _I), ("num_kv_heads", _I), ("head_dim", _I), ("inter", _I),
                ("num_layers", _I), ("block_size", _I), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("cos", _P), ("sin", _P), ("final_norm", _P), ("layers", ctypes.POINTER(_Layer)), ("kv", _P),
                ("stride_block", _I), ("stride_layer", _I), ("stride_kv", _I), ("stride_token", _I),
                ("kv_kind", _I)]


_reason = ""


def unavailable_reason() -> str:
    """Why ``library()`` returned None ("" when it did not)."""
    return _reason


@functools.lru_cache(maxsize=1)
def instruction_sets() -> str:
    """The vector extensions the kernels are built with here, for the start-up line."""
    flags = cpu_flags()
    parts = ["AVX-512" if "avx512f" in flags else "AVX2"]
    parts += [name for flag, name in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("amx_bf16", "AMX"))
              if flag in flags]
    return " ".join(parts)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None: see ``unavailable_reason()``."""
    global _reason
    if os.environ.get("TOKENWORKS_NATIVE_KERNELS", "1") == "0":
        _reason = "TOKENWORKS_NATIVE_KERNELS=0"
        return None
    lib, _reason = _load()
    return lib


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"native kernels are written for x86-64 with AVX2, this is {platform.machine()}"
    flags = cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        return None, "the CPU lacks AVX2, FMA or F16C"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) to build them with"
    source = b""
    for name in SOURCES:
        with open(name, "rb") as f:
            source += f.read()
    key = hashlib.sha256(source + " ".join([cc, *FLAGS, *sorted(flags)]).encode()).hexdigest()[:16]
    folder = os.path.join(default_cache_dir(), "native")
    path = os.path.join(folder, f"kernels-{key}.so")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, SOURCE, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120)
            if done.returncode:
                return None, f"{cc} failed: {done.stderr.strip()[-500:]}"
            os.replace(tmp, path)  # atomic: workers building at once each land a whole file
            for stale in os.listdir(folder):  # builds of other sources (a process still using one keeps its mapping)
                if stale.startswith("kernels-") and stale.endswith(".so") and stale != os.path.basename(path):
                    os.unlink(os.path.join(folder, stale))
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"building with {cc} failed: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(path)  # torch is imported first, so its OpenMP runtime (libgomp.so.1) is the one used
    lib.tw_q4_matmul.argtypes = [ctypes.POINTER(_Q4Mat), _P, _I, _P, ctypes.c_int]
    lib.tw_q4_matmul.restype = ctypes.c_int
    lib.tw_q8_matmul.argtypes = [ctypes.POINTER(_Q8Mat), _P, _I, _P, ctypes.c_int]
    lib.tw_q8_matmul.restype = ctypes.c_int
    lib.tw_step.argtypes = [ctypes.POINTER(_Net), _I, _P, _P, _P, _P, _P, _I, _P, _P, ctypes.c_int]
    lib.tw_step.restype = ctypes.c_int
    lib.tw_q4_dequantize.argtypes = [ctypes.POINTER(_Q4Mat), _P, ctypes.c_int, ctypes.c_int]
    lib.tw_q4_dequantize.restype = None
    lib.tw_amx_init.argtypes = []
    lib.tw_amx_init.restype = ctypes.c_int
    lib.tw_amx_enable.argtypes = [_I]
    lib.tw_amx_enable.restype = ctypes.c_int
    lib.tw_bf16_enable.argtypes = [_I]
    lib.tw_bf16_enable.restype = ctypes.c_int
    lib.tw_sample.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P, _P, _P, ctypes.c_int]
    lib.tw_sample.restype = ctypes.c_int
    lib.tw_grammar_mask.argtypes = [_P, _I, _I, _I, _P, _I]
    lib.tw_grammar_mask.restype = None
    return lib, ""


@functools.lru_cache(maxsize=1)
def amx_available() -> bool:
    """Whether products can run on AMX tiles here: the CPU has AMX (amx_bf16), the kernels built with it, and Linux
    lets this process use the tile state."""
    lib = library()
    return lib is not None and "amx_bf16" in cpu_flags() and bool(lib.tw_amx_init())


_amx_rows: int | None = None


def amx_rows() -> int:
    """Products of this many activation rows or more run on AMX tiles (``amx.c``); 0 where none do (AMX
    unavailable, or TOKENWORKS_AMX_ROWS=0). 4-bit layers made while it is 0 have no AMX panels."""
    if _amx_rows is None:
        set_amx_rows(int(os.environ.get(AMX_ROWS_ENV, AMX_ROWS)) if amx_available() else 0)
    return _amx_rows


def set_amx_rows(rows: int) -> None:
    """From now on products of ``rows`` rows or more run on AMX (0: none do), in the layers that have their
    panels (benchmarks and tests compare the two ways in one process)."""
    global _amx_rows
    if rows and not amx_available():
        raise RuntimeError("AMX products are unavailable here")
    if amx_available():
        library().tw_amx_enable(max(rows, 0))
    _amx_rows = max(rows, 0)


@functools.lru_cache(maxsize=1)
def bf16_available() -> bool:
    """Whether products can multiply in bfloat16 on AVX512-BF16's dot products here (the kernels built with it)."""
    lib = library()
    return lib is not None and bool(lib.tw_bf16_enable(0))


_bf16_rows: int | None = None


def bf16_rows() -> int:
    """Products of this many activation rows or more that AMX does not take multiply in bfloat16 on AVX512-BF16
    (``kernels.c: bf16_tile``); 0 where none do: no AVX512-BF16, or AMX here (its tiles take them)."""
    if _bf16_rows is None:
        set_bf16_rows(BF16_ROWS if bf16_available() and not amx_rows() else 0)
    return _bf16_rows


def set_bf16_rows(rows: int) -> None:
    """From now on products of ``rows`` rows or more that AMX does not take run on AVX512-BF16 (0: none do);
    benchmarks and tests compare the ways in one process."""
    global _bf16_rows
    if rows and not bf16_available():
        raise RuntimeError("AVX512-BF16 products are unavailable here")
    if bf16_available():
        library().tw_bf16_enable(max(rows, 0))
    _bf16_rows = max(rows, 0)


def _panel_rows(t: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (panels of 16 rows, 16, ...), a last partial panel padded with zeros."""
    padded = torch.zeros((-(-t.shape[0] // 16) * 16, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    return padded.view(-1, 16, *t.shape[1:])


def amx_panels(codes: torch.Tensor, *scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF matrix's codes and scales in AMX's panel layout (amx.c). Q4 (codes (n, k / 2) bytes, d and m
    (n, k / 32)): (panels, groups, 256) bytes, panel byte (i, c, p) of a group being GGUF's byte 2i + p of the
    panel's weight row c (its two nibbles: inputs 2i + p and 2i + p + 16), and (panels, groups, 32) float16, the
    16 rows' d then m. Q8_0 (codes (n, k) int8, d (n, k / 32)): (panels, groups, 512), byte (i, c, p) being input
    2i + p of row c, and (panels, groups, 16) float16."""
    n, groups = scales[0].shape
    per_group = codes.shape[1] // groups  # 16 (Q4) or 32 (Q8_0) bytes
    laid = _panel_rows(codes.view(n, groups, per_group // 2, 2)).permute(0, 2, 3, 1, 4)
    dm = torch.stack([_panel_rows(v.half()) for v in scales], 2)  # (panels, 16, d/m, groups)
    return (laid.reshape(-1, groups, 16 * per_group).contiguous(),
            dm.permute(0, 3, 2, 1).reshape(-1, groups, 16 * len(scales)).contiguous())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def tile_interleaved(v: torch.Tensor) -> torch.Tensor:
    """(n, groups) float16 scales -> (ceil(n / 4), groups, 4): the kernels' tiles of four weight rows read their
    four scales of a group side by side (a last partial tile padded with zeros)."""
    n, groups = v.shape
    padded = torch.zeros(-(-n // 4) * 4, groups, dtype=torch.float16)
    padded[:n] = v
    return padded.view(-1, 4, groups).transpose(1, 2).contiguous()


def _product(fn, mat, x: torch.Tensor, out_features: int) -> torch.Tensor:
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], out_features)
    if fn(ctypes.byref(mat), x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads()):
        raise MemoryError("a native product could not allocate its buffers")
    return y


class NativeQ4:
    """``y = x @ W.T + b`` for a 4-bit W in GGUF's Q4 layout, on the native kernel."""

    def __init__(self, lib: ctypes.CDLL, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        self.lib = lib
        # d and m are GGUF's float16 values (exact: w = d q + m was computed from them in float32)
        self.codes, self.d, self.m = codes.contiguous(), tile_interleaved(d.half()), tile_interleaved(m.half())
        self.bias = None if bias is None else bias.float().contiguous()
        self.out_features, self.in_features = self.codes.shape[0], self.codes.shape[1] * 2
        self.panels, self.panel_dm = amx_panels(self.codes, d, m) if amx_rows() else (None, None)
        bf16_rows()  # the products' way for many rows, set once
        self.mat = _Q4Mat(self.out_features, self.in_features, _ptr(self.codes), _ptr(self.d), _ptr(self.m),
                          _ptr(self.bias), _ptr(self.panels), _ptr(self.panel_dm))

    @property
    def nbytes(self) -> int:
        """Bytes a product of few rows reads (the AMX panels, a second copy of the codes, are read instead by
        products of many)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.d, self.m, self.bias) if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _product(self.lib.tw_q4_matmul, self.mat, x, self.out_features)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """W (out_features, in_features) written into ``out`` (float32 or bfloat16, contiguous): the numbers the
        products use, d q + m, the bfloat16 ones rounded to nearest."""
        assert out.shape == (self.out_features, self.in_features) and out.is_contiguous()
        assert out.dtype in (torch.float32, torch.bfloat16)
        self.lib.tw_q4_dequantize(ctypes.byref(self.mat), out.data_ptr(), int(out.dtype == torch.bfloat16),
                                  torch.get_num_threads())
        return out


class NativeQ8:
    """``y = x @ W.T`` for an 8-bit W in GGUF's Q8_0 layout (int8 values, a scale per 32), on the native kernel."""

    def __init__(self, lib: ctypes.CDLL, codes: torch.Tensor, d: torch.Tensor) -> None:
        self.lib = lib
        self.codes, self.d = codes.contiguous(), tile_interleaved(d.half())  # GGUF's float16 scales, exactly
        self.out_features, self.in_features = self.codes.shape
        self.panels, self.panel_d = amx_panels(self.codes, d) if amx_rows() else (None, None)
        bf16_rows()
        self.mat = _Q8Mat(self.out_features, self.in_features, _ptr(self.codes), _ptr(self.d), _ptr(self.panels),
                          _ptr(self.panel_d))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.d))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _product(self.lib.tw_q8_matmul, self.mat, x, self.out_features)


# The KV pools the native step reads and writes (float16: converted to and from float32 as it goes).
KV_DTYPES = (torch.float32, torch.float16, torch.int8)  # kernels.c: KV_F32, KV_F16, KV_I8


class NativeStep:
    """Every layer of a step in one native call, for a LlamaModel whose layers are all 4-bit."""

    def __init__(self, lib: ctypes.CDLL, model, kv) -> None:
        c = model.config
        self.lib = lib
        t = kv.tensor  # (block, layer, k/v, token, head, dim)
        if t.dtype not in KV_DTYPES or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("the native step needs a contiguous float32, float16 or int8 KV pool on the CPU")
        self.layers = (_Layer * c.num_layers)()
        keep, amx = [], True
        for i, layer in enumerate(model.layers):
            mats = [layer[n].native for n in ("qkv", "o", "gate_up", "down")]
            amx = amx and all(m.panels is not None for m in mats)
            norms = [layer["input_norm"], layer["post_norm"], layer["q_norm"], layer["k_norm"]]
            norms = [None if n is None else n.float().contiguous() for n in norms]
            keep += norms
            self.layers[i] = _Layer(*[_ptr(n) for n in norms], *[m.mat for m in mats])
        self.cos, self.sin = model.cos.float().contiguous(), model.sin.float().contiguous()
        self.final_norm = model.norm.float().contiguous()
        self._keep = keep
        self.amx = amx  # every layer has its AMX panels: products of many rows run on them
        # products of many rows in bfloat16 here (on AMX, or AVX512-BF16): prompt chunks of any size run faster in
        # the step than layer by layer on PyTorch's BLAS (docs/engine.md)
        self.bfloat16_rows = amx or bool(bf16_rows())
        self.net = _Net(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.num_layers,
                        kv.block_size, c.rms_norm_eps, model.scale, _ptr(self.cos), _ptr(self.sin),
                        _ptr(self.final_norm), self.layers, t.data_ptr(), t.stride(0), t.stride(1), t.stride(2),
                        t.stride(3), KV_DTYPES.index(t.dtype))

    def step(self, hidden: torch.Tensor, positions: list[int], slot_blocks: list[int], slot_offsets: list[int],
             tables: list[list[int]], context_lens: list[int], row_tables: list[int] | None = None) -> torch.Tensor:
        """``hidden``: (rows, hidden) float32 embeddings, overwritten with the final normed hidden states. Row r
        attends to ``context_lens[r]`` tokens (its position + 1) through ``tables[row_tables[r]]`` (default: one
        table per row)."""
        width = max(len(t) for t in tables)
        pos, blocks, offsets, table, lens = (torch.tensor(v, dtype=torch.int32) for v in (
            positions, slot_blocks, slot_offsets, [t + [0] * (width - len(t)) for t in tables], context_lens))
        which = torch.arange(len(positions), dtype=torch.int32) if row_tables is None else \
            torch.tensor(row_tables, dtype=torch.int32)
        if self.lib.tw_step(ctypes.byref(self.net), hidden.shape[0], hidden.data_ptr(), pos.data_ptr(),
                            blocks.data_ptr(), offsets.data_ptr(), table.data_ptr(), width, which.data_ptr(),
                            lens.data_ptr(), torch.get_num_threads()):
            raise MemoryError("the native step could not allocate its buffers")
        return hidden
