"""The native CPU kernels (tokenworks/model/cpu_native): the 4-bit product against exact float64 arithmetic on
GGUF blocks, the fused step (decode rows, prompt chunks) against the layer-by-layer PyTorch path on small random 4-bit models, and
the fallback when they are switched off."""

import numpy as np
import pytest
import torch

from tokenworks.config import ModelConfig
from tokenworks.model import cpu_native
from tokenworks.model.quantized_linear import GROUP, Int4Linear, Int8Linear, Q4Weight, Q8Weight

pytestmark = pytest.mark.skipif(cpu_native.library() is None,
                                reason=f"native kernels unavailable here: {cpu_native.unavailable_reason()}")
needs_amx = pytest.mark.skipif(not cpu_native.amx_available(), reason="this CPU (or its kernel build) has no AMX")


needs_bf16 = pytest.mark.skipif(not cpu_native.bf16_available(), reason="this CPU (or its kernel build) has no AVX512-BF16")


@pytest.fixture(autouse=True)
def amx_rows():
    """Each test starts with the AMX and AVX512-BF16 products off (the tiles' arithmetic, at any row count) and may
    turn them on (``amx_rows(n)``, before making its layers: only layers made then get their panels;
    ``cpu_native.set_bf16_rows(n)``); put back after."""
    before = cpu_native.amx_rows(), cpu_native.bf16_rows()
    cpu_native.set_amx_rows(0)
    cpu_native.set_bf16_rows(0)
    yield cpu_native.set_amx_rows
    cpu_native.set_amx_rows(before[0])
    cpu_native.set_bf16_rows(before[1])


# How products of many rows multiply: the int16 tiles, AMX tiles, or AVX512-BF16 dot products (both bfloat16).
WAYS = [pytest.param("tiles"), pytest.param("amx", marks=needs_amx), pytest.param("bf16", marks=needs_bf16)]


def use_way(amx_rows, way: str, rows: int = 4) -> None:
    """Products of ``rows`` rows or more the ``way`` way from now on (before making the layers, for AMX)."""
    amx_rows(rows if way == "amx" else 0)
    cpu_native.set_bf16_rows(rows if way == "bf16" else 0)


def random_q4(rows: int, cols: int, gen: torch.Generator, spread: float = 0.05) -> Q4Weight:
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8, generator=gen)
    d = (torch.rand(rows, cols // GROUP, generator=gen) * spread).half().float()  # GGUF keeps d and m in float16
    m = ((torch.rand(rows, cols // GROUP, generator=gen) - 0.5) * 16 * spread).half().float()
    return Q4Weight(codes, d, m + 8 * d)


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 33])
def test_q4_product_equals_exact_arithmetic_on_the_gguf_values(rows):
    gen = torch.Generator().manual_seed(rows)
    n, k = 202, 96  # n not a multiple of the kernel's 4-row tiles: the tail rows run too
    w = random_q4(n, k, gen)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(rows, k, generator=gen) * torch.linspace(0.01, 30, k)  # groups of very different scales
    lin = Int4Linear(w, bias)
    assert lin.native is not None
    exact = x.double() @ exact_weight(w).t() + bias.double()
    got = lin.native(x)  # the tiles, at any number of rows (the layer sends many rows to the wide product)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # int16 activations: each group's rounding is below 1/65534 of its largest value
    assert (got.double() - exact).abs().max() < 2e-4 * exact.abs().max()
    halves = lin.halves(x)
    torch.testing.assert_close(torch.cat([halves[0], halves[1]], 1), lin(x))


def exact_weight(w: Q4Weight) -> torch.Tensor:
    """w = d q + m in float64, from the GGUF's values."""
    scale, zero = w.scale.double().repeat_interleave(GROUP, 1), w.zero.double().repeat_interleave(GROUP, 1)
    return (w.codes.double() - 8) * scale + zero


def test_dequantized_weights_are_the_gguf_values():
    gen = torch.Generator().manual_seed(3)
    w = random_q4(202, 96, gen)  # 202: a last tile of two rows
    lin = Int4Linear(w)
    f32 = lin.native.dequantize_into(torch.empty(202, 96))
    exact = exact_weight(w)
    # one rounding of d q + m (a fused multiply-add) from float16 d and m
    assert ((f32.double() - exact).abs() <= exact.abs() * 2**-24 + 1e-30).all()
    bf16 = lin.native.dequantize_into(torch.empty(202, 96, dtype=torch.bfloat16))
    assert torch.equal(bf16, f32.bfloat16())  # rounded to nearest, ties to even, as PyTorch rounds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_take_the_wide_product_in_either_dtype(monkeypatch, dtype):
    """From the threshold's row count on, a product dequantizes W whole and multiplies on PyTorch's BLAS (float32:
    as exact as the tiles; bfloat16 where the CPU has AVX512-BF16: bfloat16's rounding), below it the tiles run."""
    from tokenworks.model import quantized_linear

    monkeypatch.setattr(quantized_linear, "wide_products", lambda: (dtype, 8))
    gen = torch.Generator().manual_seed(4)
    w, bias = random_q4(202, 96, gen), torch.randn(202, generator=gen)
    lin = Int4Linear(w, bias)
    for rows in (7, 8, 40):
        x = torch.randn(rows, 96, generator=gen) * torch.linspace(0.01, 30, 96)
        exact = x.double() @ exact_weight(w).t() + bias.double()
        got = lin(x)
        assert got.shape == (rows, 202) and got.dtype == torch.float32
        error = (got.double() - exact).abs().max() / exact.abs().max()
        if rows < 8:
            assert torch.equal(got, lin.native(x))
        elif dtype == torch.float32:
            assert error < 1e-5
        else:
            want = torch.nn.functional.linear(x.bfloat16(), exact_weight(w).bfloat16()).float() + bias
            assert torch.equal(got, want) and error < 2e-2
    # the scratch matrix is reused: a smaller layer's product after a larger one's is still right
    small_w = random_q4(36, 64, gen)
    x = torch.randn(8, 64, generator=gen)
    exact = x.double() @ exact_weight(small_w).t()
    error = (Int4Linear(small_w)(x).double() - exact).abs().max() / exact.abs().max()
    assert error < (2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("rows", [1, 3, 4, 7])  # fewer than 4: codes widened as loaded; 4 and more: per tile
def test_q8_product_equals_exact_arithmetic_on_the_gguf_values(rows):
    gen = torch.Generator().manual_seed(100 + rows)
    n, k = 202, 96
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    w = Q8Weight(codes, (torch.rand(n, k // GROUP, generator=gen) * 0.01).half().float())
    x = torch.randn(rows, k, generator=gen) * torch.linspace(0.01, 30, k)
    lin = Int8Linear(w)
    exact = x.double() @ w.dequantize().double().t()
    got = lin(x)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert (got.double() - exact).abs().max() < 2e-4 * exact.abs().max()


@pytest.mark.parametrize("way", [pytest.param("amx", marks=needs_amx), pytest.param("bf16", marks=needs_bf16)])
def test_bfloat16_products_are_bfloat16_arithmetic_on_the_gguf_values(amx_rows, way):
    """From the threshold's row count on, 4-bit and 8-bit products run on AMX tiles, or without AMX on AVX512-BF16
    (kernels.c: bf16_tile): weights d q + m (d q for Q8_0) rounded to bfloat16, activations rounded to bfloat16,
    sums in float32. Shapes with a partial last panel or tile (202 weight rows: 12 panels of 16 and one of 10; 50
    tiles of 4 and one of 2), inputs of 3 and of 48 groups, a bias; row counts that fill none, some and several of
    the 4-row (AVX512-BF16) and 32-row (AMX) blocks (a 4-bit layer without AMX takes PyTorch's BLAS from
    wide_products' 32 rows). Below the threshold: the tiles' own bits."""
    use_way(amx_rows, way)
    gen = torch.Generator().manual_seed(6)
    for n, k in ((202, 96), (64, 1536)):
        q4, bias = random_q4(n, k, gen), torch.randn(n, generator=gen)
        codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        q8 = Q8Weight(codes, (torch.rand(n, k // GROUP, generator=gen) * 0.01).half().float())
        lin4, lin8 = Int4Linear(q4, bias), Int8Linear(q8)
        assert (lin4.native.panels is not None) == (lin8.native.panels is not None) == (way == "amx")
        for rows in (3, 4, 5, 17, 31, 32, 70):
            x = torch.randn(rows, k, generator=gen) * torch.linspace(0.01, 30, k)
            for lin, w, b in ((lin4, exact_weight(q4), bias.double()), (lin8, q8.dequantize().double(), 0)):
                if way == "bf16" and lin is lin4 and rows >= 32:
                    continue
                got = lin(x)
                assert got.shape == (rows, n) and got.dtype == torch.float32
                if rows < 4:
                    use_way(amx_rows, "tiles")
                    assert torch.equal(got, lin(x))  # the tiles
                    use_way(amx_rows, way)
                    continue
                want = x.bfloat16().double() @ w.bfloat16().double().t() + b
                assert (got.double() - want).abs().max() < 1e-6 * want.abs().max(), (n, k, rows)


@pytest.mark.parametrize("way", WAYS)
def test_products_are_the_same_bits_on_any_number_of_threads(monkeypatch, amx_rows, way):
    """Threads take their share of weight rows in chunks and then take the chunks left in others' shares (a thread
    that loses its core is not waited for): every output row is still computed whole by one thread, in the same
    tiles, so the result cannot depend on which thread did it. Eight threads on this machine's cores are
    descheduled all the time, so rows are taken from others' shares here."""
    use_way(amx_rows, way)
    gen = torch.Generator().manual_seed(5)
    q4 = Int4Linear(random_q4(1030, 96, gen), torch.randn(1030, generator=gen))
    codes = torch.randint(-128, 128, (1030, 96), dtype=torch.int8, generator=gen)
    q8 = Int8Linear(Q8Weight(codes, (torch.rand(1030, 3, generator=gen) * 0.01).half().float()))
    x = torch.randn(9, 96, generator=gen)
    outputs = {}
    for threads in (1, 2, 3, 8):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        outputs[threads] = [lin(x) for lin in (q4, q8) for _ in range(3)]
    for threads, out in outputs.items():
        for got, want in zip(out, outputs[1]):
            assert torch.equal(got, want), threads


@pytest.mark.parametrize("way", WAYS)
def test_the_decode_step_is_the_same_bits_on_any_number_of_threads(monkeypatch, amx_rows, way):
    use_way(amx_rows, way)
    model, kv, runner = tiny_4bit_engine(False)
    gen = torch.Generator().manual_seed(2)
    rows = 6
    tables = [[1 + 6 * r + b for b in range(6)] for r in range(rows)]
    kv.tensor.copy_(torch.randn(kv.tensor.shape, generator=gen))
    embed = torch.randn(rows, 64, generator=gen)
    args = dict(positions=[3 + 3 * r for r in range(rows)], slot_blocks=[tables[r][(3 + 3 * r) // 4] for r in range(rows)],
                slot_offsets=[(3 + 3 * r) % 4 for r in range(rows)], tables=tables,
                context_lens=[4 + 3 * r for r in range(rows)])
    start, outputs = kv.tensor.clone(), {}
    for threads in (1, 2, 3, 8):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        kv.tensor.copy_(start)
        outputs[threads] = (runner.native.step(embed.clone(), **args), kv.tensor.clone())
    for threads, (hidden, pool) in outputs.items():
        assert torch.equal(hidden, outputs[1][0]) and torch.equal(pool, outputs[1][1]), threads


def test_a_long_rows_attention_does_not_depend_on_the_threads_or_the_other_rows(monkeypatch):
    """A context of 1,501 tokens is attended in six parts merged by their log-sum-exp; the parts are cut by the
    context's length only, so the row's output is the same bits alone or beside other rows, on 1 to 8 threads."""
    model, kv, runner = tiny_4bit_engine(False, block_size=16, num_blocks=130)
    gen = torch.Generator().manual_seed(9)
    kv.tensor.copy_(torch.randn(kv.tensor.shape, generator=gen))
    long_table = [1 + b for b in range(94)]  # 1,500 + 1 tokens
    others = [[100 + b for b in range(3)], [105 + b for b in range(17)]]  # 40 and 260 tokens
    embed = torch.randn(3, 64, generator=gen)
    start, outputs = kv.tensor.clone(), {}
    for threads in (1, 2, 3, 8):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        for rows in (1, 3):
            kv.tensor.copy_(start)
            tables = [long_table, *others][:rows]
            lens = [1501, 41, 261][:rows]
            out = runner.native.step(embed[:rows].clone(), positions=[n - 1 for n in lens],
                                     slot_blocks=[t[(n - 1) // 16] for t, n in zip(tables, lens)],
                                     slot_offsets=[(n - 1) % 16 for n in lens], tables=tables, context_lens=lens)
            outputs[(threads, rows)] = out[0]
    first = outputs[(1, 1)]
    assert first.abs().sum() > 0
    for key, out in outputs.items():
        assert torch.equal(out, first), key


def test_nibbles_are_ggufs_block_layout():
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).view(1, 64)
    w = Q4Weight(codes, torch.ones(1, 2), torch.zeros(1, 2))
    packed = w.nibbles()
    assert packed.shape == (1, 32)
    assert packed[0, 0].item() == codes[0, 0] | (codes[0, 16] << 4)
    assert packed[0, 16].item() == codes[0, 32] | (codes[0, 48] << 4)


def tiny_4bit_engine(qk_norm: bool, block_size: int = 4, head_dim: int = 32, num_blocks: int = 40,
                     kv_dtype: torch.dtype = torch.float32, heads: tuple[int, int] = (4, 2)):
    """A LlamaModel of small shape whose layer matrices are random Q4 blocks, with its KV pool and runner."""
    from tokenworks.model.kv_cache import KVCache
    from tokenworks.model.llama import LlamaModel
    from tokenworks.model.runner import ModelRunner
    from tokenworks.model.weights import random_weights

    config = ModelConfig(architecture="llama", vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=3,
                         num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position=2048, tie_word_embeddings=True, qk_norm=qk_norm)
    weights = random_weights(config, torch.float32, "cpu", seed=3)
    gen = torch.Generator().manual_seed(5)
    for name, t in list(weights.items()):
        if name.startswith("model.layers.") and t.dim() == 2:
            weights[name] = random_q4(t.shape[0], t.shape[1], gen, spread=0.02)
    model = LlamaModel(config, weights, torch.float32, "cpu")
    kv = KVCache(config, block_size, num_blocks, kv_dtype, "cpu")
    return model, kv, ModelRunner(model, kv)


# 4 rows: attention per row, every head at once; 1 row: per query head, and SwiGLU split by columns.
# Blocks of 16 tokens: scores 8 tokens at a time (4 without AVX-512), and the single-token tail (29 + 3 steps);
# of 4: the tail alone. Heads of 64: the values weighed 64 (32) dimensions at a time; of 32: 8 at a time (32).
# Contexts of 512 tokens and more: attended in parts of about 256 (whole blocks), merged by their log-sum-exp;
# beside a short row, and alone.
@pytest.mark.parametrize("lens", [[1, 5, 29, 9], [13], [1100, 7], [1030], [600]],
                         ids=["4-rows", "1-row", "long+short", "long", "two-or-three-parts"])
@pytest.mark.parametrize("block_size,head_dim", [(4, 32), (16, 64)])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3-qk-norm"])
@pytest.mark.parametrize("way", WAYS)
def test_fused_decode_step_equals_the_layer_by_layer_path(amx_rows, way, qk_norm, block_size, head_dim, lens):
    """With AMX or AVX512-BF16 on, both paths multiply in bfloat16 from two rows (so the one-row cases stay on the
    tiles); the activations they round may differ in their last float32 bit, which bfloat16's rounding can turn
    into 2^-8."""
    use_way(amx_rows, way, 2)
    check_fused_decode_steps(qk_norm, block_size, head_dim, lens, 1e-2 if way != "tiles" and len(lens) >= 2 else 1e-4,
                             torch.float32)


# A float16 pool: both paths round the new K/V to float16 (to nearest even) and widen what they read; a K value
# whose float32 differs in its last bit between the paths may round to the neighbouring float16 (2^-11). An int8
# pool: both quantize each head row the same way (kv_cache.store_rows), where such a value may round to the
# neighbouring step of 1/127 of its row's largest.
NARROW_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.int8: 1e-2}


@pytest.mark.parametrize("lens", [[1, 5, 29, 9], [13], [1100, 7]], ids=["4-rows", "1-row", "long+short"])
@pytest.mark.parametrize("block_size,head_dim", [(4, 32), (16, 64)])
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8], ids=["float16", "int8"])
def test_fused_decode_step_on_a_narrow_pool_equals_the_layer_by_layer_path(amx_rows, block_size, head_dim, lens,
                                                                           kv_dtype):
    amx_rows(0)
    check_fused_decode_steps(False, block_size, head_dim, lens, NARROW_TOLERANCE[kv_dtype], kv_dtype)


# Query heads per KV head: 3 (the default model's 9 and 3) are scored and weighed together; 4 as 3 and 1; 1 alone.
@pytest.mark.parametrize("heads", [(9, 3), (8, 2), (4, 4)], ids=["9q-3kv", "8q-2kv", "4q-4kv"])
@pytest.mark.parametrize("lens", [[1, 5, 29, 9], [13], [1100, 7]], ids=["4-rows", "1-row", "long+short"])
@pytest.mark.parametrize("block_size,head_dim", [(4, 32), (16, 64)])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8], ids=["float32", "float16", "int8"])
def test_fused_decode_step_with_other_groupings_of_query_heads(amx_rows, heads, lens, block_size, head_dim, kv_dtype):
    amx_rows(0)
    check_fused_decode_steps(False, block_size, head_dim, lens, NARROW_TOLERANCE[kv_dtype], kv_dtype, heads)


def check_fused_decode_steps(qk_norm: bool, block_size: int, head_dim: int, lens: list[int], tolerance: float,
                             kv_dtype: torch.dtype, heads: tuple[int, int] = (4, 2)) -> None:
    from tokenworks.engine.scheduler_output import ScheduledRequest
    from tokenworks.sampling_params import SamplingParams

    num_blocks = max(40, sum(-(-(n + 3) // block_size) for n in lens) + 8)
    model, kv, runner = tiny_4bit_engine(qk_norm, block_size, head_dim, num_blocks, kv_dtype, heads)
    assert kv.tensor.dtype == kv_dtype
    assert runner.native is not None
    gen = torch.Generator().manual_seed(11)
    bs = kv.block_size
    params = SamplingParams(temperature=0)
    # lens: the prompts; their blocks scattered over the pool
    free = list(torch.randperm(num_blocks - 1, generator=gen) + 1)
    seqs = []
    for i, n in enumerate(lens):
        ids = torch.randint(0, 300, (n + 3,), generator=gen).tolist()
        blocks = [int(free.pop()) for _ in range(-(-(n + 3) // bs))]
        seqs.append((f"r{i}", ids, blocks))
    # prefill each prompt (native step: the same as layer by layer, test_native_step_runs_prompt_chunks...)
    runner.forward([ScheduledRequest(r, ids[:n], 0, blocks, True, params, ids[:n], []) for (r, ids, blocks), n in zip(seqs, lens)])
    for step in range(3):  # three decode steps of all four rows: fused vs layer by layer from the same KV
        sched = [ScheduledRequest(r, [ids[n + step]], n + step, blocks, True, params, ids[: n + step + 1], [])
                 for (r, ids, blocks), n in zip(seqs, lens)]
        eager, eager_kv, fused = both_paths(runner, sched, runner.forward)  # decode-only: the fused native step
        assert (fused - eager).abs().max() < tolerance * eager.abs().max()
        written, want = pool_values(kv.tensor), pool_values(eager_kv)
        assert (written - want).abs().max() < tolerance * want.abs().max()  # the same K/V written


def pool_values(pool: torch.Tensor) -> torch.Tensor:
    """A KV pool's values as float32 (an int8 pool's bytes times their rows' scales)."""
    from tokenworks.model.kv_cache import widen

    return widen(pool, torch.float32)


def both_paths(runner, sched, native_forward):
    """One step from the same KV both ways: the layer-by-layer path's final hidden states and the KV pool it
    leaves, then ``native_forward``'s hidden states (its pool is then ``runner.kv.tensor``), after checking that
    both order the rows the same and sample the same rows."""
    kv = runner.kv
    before = kv.tensor.clone()
    order, ids_t, pos, meta, sample_rows = runner.prepare(sched)
    eager = runner.model.forward(ids_t, pos, kv, meta)
    eager_kv = kv.tensor.clone()
    kv.tensor.copy_(before)
    order2, native, sample_rows2 = native_forward(sched)
    assert [s.request_id for s in order2] == [s.request_id for s in order] and sample_rows2 == sample_rows
    return eager, eager_kv, native


def test_loading_the_kernels_leaves_the_process_floating_point_mode_alone():
    import numpy as np

    assert cpu_native.library() is not None
    tiny = np.array([1e-40], dtype=np.float32)  # a subnormal: flush-to-zero or denormals-are-zero would make it 0
    assert (tiny * np.float32(1.0))[0] != 0 and (torch.from_numpy(tiny) * 1.0).item() != 0


def test_switched_off_the_4bit_layers_run_on_pytorchs_kernel(monkeypatch):
    monkeypatch.setenv("TOKENWORKS_NATIVE_KERNELS", "0")
    assert cpu_native.library() is None and "TOKENWORKS_NATIVE_KERNELS" in cpu_native.unavailable_reason()
    gen = torch.Generator().manual_seed(0)
    lin = Int4Linear(random_q4(16, 64, gen))
    assert lin.native is None and lin.packed is not None
    _, _, runner = tiny_4bit_engine(False)
    assert runner.native is None


# Prompt rows in the native step: each token attends to the tokens before it, written in the same step. Chunks
# that start at 0 or after cached tokens, beside decode rows; 8 rows or more attend by tiles (a prompt of 6 rows
# and the decode rows row by row, contexts from 512 tokens in parts).
PROMPT_CASES = {
    "prompt": [(0, 13)],  # a fresh prompt
    "chunk": [(20, 9)],  # a chunk after 20 cached tokens
    "mixed": [(7, 1), (30, 1), (0, 6), (11, 17)],  # two decode rows, a prompt, a chunk
    "long": [(500, 24), (3, 1)],  # rows of contexts 501-524 (from 512: parts), beside a decode row
}
# More prompt rows than the layer-by-layer path multiplies on the native tiles without AMX (from 32 it goes to
# PyTorch's BLAS in bfloat16: other arithmetic), so with AMX only.
AMX_PROMPT_CASES = {
    "40-rows": [(0, 40)],
    "100-rows": [(600, 100)],  # tiles of more rows than 8; contexts of 601-700 keys: two runs of the running softmax
    "300-rows": [(0, 300)],  # a fresh prompt long enough to attend on AMX tiles (kernels.c AMX_ATTENTION_FROM)
}
# Chunks that attend on AMX tiles (contexts of 256 tokens or more): many tiles, two runs, a 9-row chunk (27 query
# heads of 3 per KV head: an A tile and a part)
AMX_ATTENTION_CASES = {k: AMX_PROMPT_CASES[k] for k in ("100-rows", "300-rows")} | {"9-rows": [(250, 9)]}


def prompt_params(kv_dtypes: list[torch.dtype]) -> list:
    """(amx, case, kv_dtype) for the prompt test. On an int8 pool only chunks after cached tokens: the layer-by-layer
    path attends a fresh prompt to its K/V before the pool's quantization, and on these random models a step of
    1/127 of a row's largest can move a row's output by 9 % (both paths reading the same int8 pool agree)."""
    ways = [("tiles", k, c) for k, c in PROMPT_CASES.items()] + [("bf16", k, c) for k, c in PROMPT_CASES.items()] \
        + [("amx", k, c) for k, c in {**PROMPT_CASES, **AMX_PROMPT_CASES}.items()]
    marks = {"tiles": [], "amx": [needs_amx], "bf16": [needs_bf16]}
    return [pytest.param(way, c, dt, id=f"{way}-{k}-{str(dt).removeprefix('torch.')}", marks=marks[way])
            for way, k, c in ways for dt in kv_dtypes if dt != torch.int8 or all(cached for cached, _ in c)]


@pytest.mark.parametrize("way,case,kv_dtype", prompt_params([torch.float32, torch.float16, torch.int8]))
@pytest.mark.parametrize("block_size,head_dim", [(4, 32), (16, 64), (8, 24)])  # 24: a tail of 8 (AVX-512: of 16)
def test_native_step_runs_prompt_chunks_as_the_layer_by_layer_path(amx_rows, monkeypatch, way, case, kv_dtype,
                                                                    block_size, head_dim):
    """``case``: (cached tokens, new tokens) per sequence. The layer-by-layer path attends a fresh prompt to its
    keys and values before the pool's rounding, the native step reads them back from the pool: on a float16 pool
    the two differ by that rounding. With AMX both paths multiply in bfloat16 from 4 rows (see the decode test),
    and the native step's tiles attend on AMX in split bfloat16 (amx_attention.c) from 256 tokens of context:
    float32's numbers, measured within 3e-4 on a row and 1.4e-3 on the K/V written three layers on (a single
    bfloat16 product per operand pair missed by up to 9 %). Without AMX the layer-by-layer path's many-row
    products would go to PyTorch's BLAS (wide_products): they stay on the native kernel here (in float32 on the
    tiles; on AVX512-BF16 in bfloat16 from 4 rows, as the native step's), so that the step's own arithmetic is
    what is compared."""
    use_way(amx_rows, way)
    if way != "amx":
        from tokenworks.model import quantized_linear

        monkeypatch.setattr(quantized_linear, "wide_products", lambda: (torch.float32, 1 << 30))
    check_prompt_case(case, kv_dtype, block_size, head_dim, (4, 2), way != "tiles")


@needs_amx
@pytest.mark.parametrize("case,kv_dtype", [pytest.param(c, dt, id=f"{k}-{str(dt).removeprefix('torch.')}")
                                           for k, c in AMX_ATTENTION_CASES.items() for dt in (torch.float32, torch.int8)
                                           if dt != torch.int8 or all(cached for cached, _ in c)])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 2)], ids=["groups-of-3", "groups-of-1", "groups-of-4"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_amx_prompt_tiles_fill_whole_tiles_for_any_group_of_query_heads(amx_rows, case, kv_dtype, heads, head_dim):
    """A tile's query heads go 16 to an AMX tile: 3 per KV head (the default model's) gives tiles of 16 or 32 rows
    (48 or 96 query heads), 1 per KV head tiles of 16 or 32, 4 tiles of 8-32; heads of 64 and 128 dimensions (2
    and 4 slices of a score, 1 and 2 passes of the values). A float32 pool (on a float16 one a fresh prompt's K/V
    rounding alone moves the 3-per-KV-head case by 7 %, with the float32 tiles as much), and an int8 pool, whose
    values the tiles take exactly (2 + 2 products and the scales; chunks after cached tokens: prompt_params)."""
    amx_rows(4)
    check_prompt_case(case, kv_dtype, 16, head_dim, heads, True)


def check_prompt_case(case, kv_dtype, block_size, head_dim, heads, amx):
    from tokenworks.engine.scheduler_output import ScheduledRequest
    from tokenworks.sampling_params import SamplingParams

    num_blocks = sum(-(-(a + n) // block_size) for a, n in case) + 4
    model, kv, runner = tiny_4bit_engine(False, block_size, head_dim, num_blocks, kv_dtype, heads)
    gen = torch.Generator().manual_seed(4)
    params = SamplingParams(temperature=0)
    free = list(torch.randperm(num_blocks - 1, generator=gen) + 1)
    seqs = []
    for i, (cached, new) in enumerate(case):
        ids = torch.randint(0, 300, (cached + new,), generator=gen).tolist()
        blocks = [int(free.pop()) for _ in range(-(-(cached + new) // block_size))]
        seqs.append((f"r{i}", ids, blocks, cached))
    prefix = [ScheduledRequest(r, ids[:c], 0, blocks, False, params, ids[:c], []) for r, ids, blocks, c in seqs if c]
    order, ids_t, pos, meta, _ = runner.prepare(prefix)
    model.forward(ids_t, pos, kv, meta)  # the cached tokens' K/V, layer by layer
    sched = [ScheduledRequest(r, ids[c:], c, blocks, True, params, ids, []) for r, ids, blocks, c in seqs]
    eager, eager_kv, native = both_paths(runner, sched, runner.forward_native)
    if kv_dtype == torch.float16:  # the pool's rounding of a fresh prompt's K/V, which the native step reads back
        tolerance = 2e-2 if amx else 3e-3
    elif kv_dtype == torch.int8:  # both read the same int8 values (prompt_params); float16's tolerance
        tolerance = 2e-2 if amx else 3e-3
    else:
        tolerance = 2e-3 if amx else 1e-4
    assert native.shape == eager.shape
    assert ((native - eager).abs().amax(1) < tolerance * eager.abs().amax(1)).all()  # every row
    written, want = pool_values(kv.tensor), pool_values(eager_kv)
    if kv_dtype == torch.int8:  # a value whose float32 differs between the paths may land on the next step
        tolerance = max(tolerance, NARROW_TOLERANCE[torch.int8])
    assert (written - want).abs().max() < tolerance * want.abs().max()


def test_without_amx_only_steps_of_few_prompt_rows_are_native(amx_rows):
    """Without AMX or AVX512-BF16 the layer-by-layer path multiplies many rows on PyTorch's BLAS, faster than the
    native int16 tiles."""
    from tokenworks.engine.scheduler_output import ScheduledRequest
    from tokenworks.model.quantized_linear import wide_products
    from tokenworks.model.runner import native_suits
    from tokenworks.sampling_params import SamplingParams

    p = SamplingParams()

    def req(cached: int, new: int) -> ScheduledRequest:
        return ScheduledRequest("r", [1] * new, cached, list(range(100)), True, p, [1] * (cached + new), [])

    assert native_suits([req(600, 1), req(5000, 1)]) and native_suits([req(4096, 512)])  # with AMX: every step
    assert native_suits([req(0, 31), req(9, 1)], max_prompt_rows=31)
    assert native_suits([req(600, 1)] * 64, max_prompt_rows=31)  # decode rows do not count
    assert not native_suits([req(0, 32)], max_prompt_rows=31)
    _, _, runner = tiny_4bit_engine(False)  # made with the AMX and AVX512-BF16 products off
    assert not runner.native.amx and runner.native_prompt_rows == wide_products()[1] - 1
    if cpu_native.bf16_available():  # bfloat16 products in the step: prompt chunks of any size run there
        cpu_native.set_bf16_rows(4)
        assert tiny_4bit_engine(False)[2].native_prompt_rows is None


def test_a_prompt_step_is_the_same_bits_on_any_number_of_threads(monkeypatch):
    """The threads change how many rows a tile takes (kernels.c tile_rows_of: 8 to 32 here) and who takes which;
    each query's scores, running softmax and weighed values are computed the same way in any tile."""
    from tokenworks.engine.scheduler_output import ScheduledRequest
    from tokenworks.sampling_params import SamplingParams

    model, kv, runner = tiny_4bit_engine(False, 16, 64, 60)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 300, (700,), generator=gen).tolist()
    blocks = list(range(1, 45))
    params = SamplingParams(temperature=0)
    runner.forward_native([ScheduledRequest("r", ids[:600], 0, blocks, False, params, ids[:600], [])])
    sched = [ScheduledRequest("r", ids[600:], 600, blocks, True, params, ids, [])]
    start, outputs = kv.tensor.clone(), {}
    for threads in (1, 2, 3, 8):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        kv.tensor.copy_(start)
        outputs[threads] = (runner.forward_native(sched)[1], kv.tensor.clone())
    assert outputs[1][0].abs().sum() > 0
    for threads, (hidden, pool) in outputs.items():
        assert torch.equal(hidden, outputs[1][0]) and torch.equal(pool, outputs[1][1]), threads


def test_the_start_up_line_says_how_the_products_run(amx_rows):
    from tokenworks.llm import _capture_graphs

    _, _, runner = tiny_4bit_engine(False)
    line = _capture_graphs(None, runner, 4, 4)
    assert f"native CPU kernels ({cpu_native.instruction_sets()})" in line and "AVX512-BF16" not in line
    from tokenworks.model.quantized_linear import wide_products

    dtype, rows = wide_products()
    assert f"steps of up to {rows - 1} prompt tokens" in line
    assert f"products of {rows}+ rows (prefill) on {str(dtype).removeprefix('torch.')} matmuls" in line
    if cpu_native.bf16_available():
        cpu_native.set_bf16_rows(3)
        assert "products of 3+ rows (batches, prefill) on AVX512-BF16 in bfloat16" in _capture_graphs(None, runner, 4, 4)


def test_prefill_products_multiply_in_bfloat16_wherever_the_cpu_does(monkeypatch):
    """AVX512-BF16 (every AMX CPU has it; so do AMD's Zen 4 and 5): bfloat16 from 32 rows; else float32 from 64."""
    from tokenworks.model.quantized_linear import wide_products

    for flags, want in (({"avx2", "avx512f", "avx512_bf16"}, (torch.bfloat16, 32)),
                        ({"avx2", "avx512_bf16", "amx_bf16"}, (torch.bfloat16, 32)),
                        ({"avx2", "avx512f", "avx512_vnni"}, (torch.float32, 64))):
        monkeypatch.setattr(cpu_native, "cpu_flags", lambda flags=flags: flags)
        assert wide_products() == want, flags
