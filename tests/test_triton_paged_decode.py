"""The Triton paged decode kernel against the plain PyTorch reference, on small shapes.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set
here before the kernel module is first imported); with ``--device cuda`` it
runs compiled.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU runs the kernels in the interpreter
triton = pytest.importorskip("triton")  # a test dependency (pyproject [test]); present in CI

from tokenworks.model.paged_decode import paged_decode_torch  # noqa: E402
from tokenworks.model.triton_paged_decode import num_splits_for, paged_decode  # noqa: E402


def _case(device, dtype, heads, kv_heads, dim, lens, block_size=16, num_blocks=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device=device, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(len(lens), heads, dim, generator=g).to(device=device, dtype=dtype)
    width = max(1, max(-(-n // block_size) for n in lens))
    perm = torch.randperm(num_blocks - 1, generator=g) + 1  # scattered blocks, never block 0
    rows, used = [], 0
    for n in lens:
        need = -(-n // block_size)
        rows.append(perm[used: used + need].tolist() + [0] * (width - need))
        used += need
    table = torch.tensor(rows, dtype=torch.int32, device=device)
    ctx = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table, ctx


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 1, 32), (6, 6, 48)])
@pytest.mark.parametrize("splits", [1, 4])
def test_kernel_equals_reference_float32(device, heads, kv_heads, dim, splits):
    # GQA 3:1 (SmolLM2), 4:1, plain multi-head; a head size that is not a power of two; contexts from one token to
    # several splits' worth, not multiples of the block size or of the kernel's tile.
    lens = [1, 17, 130, 5, 64, 200]
    q, kc, vc, table, ctx = _case(device, torch.float32, heads, kv_heads, dim, lens, num_blocks=48)
    got = paged_decode(q, kc, vc, table, ctx, 0.125, num_splits=splits)
    want = paged_decode_torch(q, kc, vc, table, ctx, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_reads_only_each_rows_own_context(device):
    """A long request among short ones: the short rows see nothing of the long row's blocks; changing what lies
    beyond a row's context (in its padding and in other requests' blocks) changes nothing."""
    lens = [300, 3, 2, 9]
    q, kc, vc, table, ctx = _case(device, torch.float32, 9, 3, 64, lens, num_blocks=40)
    before = paged_decode(q, kc, vc, table, ctx, 0.125)
    kc[0].fill_(1e4)  # block 0: the padding target
    vc[0].fill_(float("nan"))
    last = table[0, (300 - 1) // 16].item()
    kc[last, 300 % 16:] = -1e4  # past the end of the long row's context, inside its last block
    after = paged_decode(q, kc, vc, table, ctx, 0.125)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_rows_of_context_zero_give_zeros_and_splits_cover_every_token(device):
    q, kc, vc, table, ctx = _case(device, torch.float32, 4, 2, 32, [0, 40, 1], num_blocks=8)
    out = paged_decode(q, kc, vc, table, ctx, 0.2, num_splits=8)  # more splits than the 40-token row has tiles
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1:], paged_decode_torch(q, kc, vc, table, ctx, 0.2)[1:], rtol=1e-5, atol=1e-5)


def test_kernel_bfloat16_close_to_float32_reference(device):
    q, kc, vc, table, ctx = _case(device, torch.bfloat16, 8, 2, 64, [33, 150, 7])
    got = paged_decode(q, kc, vc, table, ctx, 0.125).float()
    want = paged_decode_torch(q.float(), kc.float(), vc.float(), table, ctx, 0.125)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_split_count_fills_the_device_and_stays_bounded():
    assert num_splits_for(1, 8) == 16  # one request: its context spread over 16 programs per KV head
    assert num_splits_for(64, 8) == 1  # a full batch fills the GPU without splitting
    assert num_splits_for(4, 3) == 16 and num_splits_for(16, 3) == 8
    assert all(num_splits_for(b, h) & (num_splits_for(b, h) - 1) == 0 for b in range(1, 130) for h in (1, 3, 8))


def test_the_load_time_check_passes_the_kernel_and_catches_a_broken_one(device, monkeypatch):
    """The runner uses the kernel only if it matched the reference on this device when the engine loaded."""
    from tokenworks.model import paged_decode as dispatch
    from tokenworks.model import triton_paged_decode

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dispatch.kernel_check.cache_clear()
    assert dispatch.kernel_check(device, dtype) == ""
    monkeypatch.setattr(triton_paged_decode, "paged_decode", lambda q, *a, **k: q * 0)  # a wrong result
    dispatch.kernel_check.cache_clear()
    assert dispatch.kernel_check(device, dtype).startswith("paged_decode differs from the reference by")
    dispatch.kernel_check.cache_clear()
