"""The fused Triton kernels (model/triton_fused.py) against their PyTorch reference (model/fused.py).

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
here before the kernel module is first imported); with ``--device cuda`` they
run compiled. Inputs are the strided views the model passes (q/k/v slices of
one projection, one layer's slice of the KV pool).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU runs the kernels in the interpreter
pytest.importorskip("triton")  # a test dependency (pyproject [test]); present in CI

from tokenworks.model import fused  # noqa: E402
from tokenworks.model.fused import Rotary, add_rms_norm, rope_write_kv, silu_mul  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _dtypes(device):
    return [torch.float32, torch.bfloat16] if device.startswith("cuda") else [torch.float32]


@pytest.mark.parametrize("rows,n", [(1, 576), (5, 64), (3, 100)])
def test_add_rms_norm_equals_add_then_norm(device, rows, n):
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(rows * n)
        h = torch.randn(rows, n, generator=g).to(device=device, dtype=dtype)
        wide = torch.randn(rows, n + 40, generator=g).to(device=device, dtype=dtype)
        delta = wide[:, 7 : 7 + n]  # a strided view, as an output slice would be
        w = (torch.rand(n, generator=g) + 0.5).to(device=device, dtype=dtype)
        got_h, got_x = add_rms_norm(h, delta, w, 1e-5, kernel=True)
        want_h, want_x = add_rms_norm(h, delta, w, 1e-5, kernel=False)
        torch.testing.assert_close(got_h, want_h, **TOL[dtype])
        torch.testing.assert_close(got_x, want_x, **TOL[dtype])


@pytest.mark.parametrize("rows,inter", [(3, 1536), (1, 40), (4, 2048)])  # 1536, 2048: more than one program a row
def test_silu_mul_equals_silu_of_gate_times_up(device, rows, inter):
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(inter)
        x = (3 * torch.randn(rows, 2 * inter, generator=g)).to(device=device, dtype=dtype)
        torch.testing.assert_close(silu_mul(x, kernel=True), silu_mul(x, kernel=False), **TOL[dtype])


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 2, 8), (8, 8, 128)])
def test_rope_write_kv_rotates_q_and_k_and_writes_only_the_tokens_slots(device, heads, kv_heads, dim):
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(heads * dim)
        tokens, layers, num_blocks, block_size, max_pos = 6, 3, 10, 4, 64
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(device=device, dtype=dtype)
        qk_flat, v_flat = qkv.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
        qk = qk_flat.view(tokens, heads + kv_heads, dim)
        v = v_flat.view(tokens, kv_heads, dim)
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), torch.rand(dim // 2, generator=g))
        rot = Rotary(torch.tensor([0, 5, 63, 17, 18, 2], device=device),
                     freqs.cos().to(device=device, dtype=dtype), freqs.sin().to(device=device, dtype=dtype))
        blocks = torch.tensor([1, 4, 4, 9, 2, 7], device=device)
        offsets = torch.tensor([0, 3, 2, 1, 3, 0], device=device)
        pools = []
        for kernel in (True, False):
            pool = torch.randn(num_blocks, layers, 2, block_size, kv_heads, dim, generator=torch.Generator().manual_seed(1))
            pool = pool.to(device=device, dtype=dtype)
            out = rope_write_kv(qk, v, rot, pool[:, 1, 0], pool[:, 1, 1], blocks, offsets, heads, kernel=kernel)
            pools.append((out, pool))
        (got, got_pool), (want, want_pool) = pools
        torch.testing.assert_close(got, want, **TOL[dtype])
        torch.testing.assert_close(got_pool, want_pool, **TOL[dtype])  # other layers and slots untouched too
        # the written slots hold the rotated key and the value
        torch.testing.assert_close(got_pool[1, 1, 0, 0], want[0, heads:], **TOL[dtype])
        torch.testing.assert_close(got_pool[9, 1, 1, 1], v[3], **TOL[dtype])


def test_the_model_with_every_kernel_generates_the_same_tokens(device, monkeypatch):
    """The tiny model end to end (prefill chunks, decodes, graph path stubbed on the CPU) with the kernels on and
    off: the same greedy tokens."""
    from tests.test_overlap import _engine, _mix, _run

    greedy = [r for r in _mix() if r[2].greedy][:3]
    want = _run(_engine(device, False, graphs=True), greedy)
    monkeypatch.setattr(fused, "kernels_problem", lambda dev, dtype: "")
    got = _run(_engine(device, False, graphs=True), greedy)
    assert {r: o.token_ids for r, o in got.items()} == {r: o.token_ids for r, o in want.items()}


def test_the_load_time_check_passes_working_kernels_and_names_a_broken_one(device, monkeypatch):
    from tokenworks.model import triton_fused

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    fused.kernel_check.cache_clear()
    assert fused.kernel_check(device, dtype) == ""

    def broken(*args, **kwargs):
        raise RuntimeError("no such instruction")

    monkeypatch.setattr(triton_fused, "silu_mul", broken)
    fused.kernel_check.cache_clear()
    assert fused.kernel_check(device, dtype) == "silu_mul: RuntimeError: no such instruction"
    monkeypatch.undo()
    monkeypatch.setattr(triton_fused, "add_rms_norm", lambda h, d, w, eps: (h + d, h))  # a wrong result
    fused.kernel_check.cache_clear()
    assert fused.kernel_check(device, dtype).startswith("add_rms_norm differs from the reference by")
    fused.kernel_check.cache_clear()

