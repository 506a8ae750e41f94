"""Decode attention in groups of similar length: the grouping rule, and the same logits whatever the grouping."""

import pytest
import torch

from tokenworks.model.attention import decode_groups
from tokenworks.sampling_params import SamplingParams


def test_decode_groups_split_only_where_padding_costs_more_than_a_group():
    assert decode_groups([256] + [2] * 31, 16) == [(0, 1), (1, 32)]  # one long request among short ones
    assert decode_groups([10, 10, 9, 9, 8], 16) == [(0, 5)]  # similar lengths: one group
    assert decode_groups([64, 60, 33, 32, 30, 4, 3, 2, 2, 1], 16) == [(0, 2), (2, 5), (5, 10)]
    assert decode_groups([9, 5, 5, 5, 1], 0) == [(0, 1), (1, 4), (4, 5)]  # equal widths stay together
    assert decode_groups([], 16) == []
    for widths in ([300, 200, 100, 50, 3, 2, 1], [40] * 8 + [1] * 8):
        groups = decode_groups(widths, 16)
        assert groups[0][0] == 0 and groups[-1][1] == len(widths)
        assert all(a < b and b == c for (a, b), (c, _) in zip(groups, groups[1:]))  # contiguous, covering
        padded = sum((b - a) * widths[a] for a, b in groups) + 16 * len(groups)
        assert padded <= len(widths) * widths[0] + 16  # never worse than one padded group


def test_grouped_decode_attention_gives_the_logits_of_one_padded_batch(device):
    from tests.test_worker_parts import tiny_engine

    loaded = tiny_engine(device)
    engine, runner = loaded.engine, loaded.runner
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i, n in enumerate([180, 3, 5, 7, 40, 41, 2]):  # contexts far apart: several groups with overhead 0
        engine.add_request(f"r{i}", [(7 * i + j) % 96 + 1 for j in range(n)], params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.requests.values()):
        engine.step()
    sched = engine.scheduler.schedule()
    assert len(sched.scheduled) == 7 and all(s.num_tokens == 1 for s in sched.scheduled)
    runner.use_paged, runner.graphs = False, None  # the grouped path, also on CUDA
    runner.group_overhead = 0
    _, _, _, meta, _ = runner.prepare(sched.scheduled)
    assert [(g.start, g.end) for g in meta.decodes] == [(0, 1), (1, 3), (3, 7)]  # 12, 3 and 1 blocks
    grouped = runner.final_logits(sched)
    runner.group_overhead = 10**9
    _, _, _, meta, _ = runner.prepare(sched.scheduled)
    assert len(meta.decodes) == 1
    padded = runner.final_logits(sched)
    torch.testing.assert_close(grouped, padded, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("narrow", ["float16", "int8"])
def test_a_narrow_pool_gives_the_float32_pools_logits_within_its_rounding(device, narrow):
    """The PyTorch path (float weights): K/V rounded into a float16 pool (or quantized into an int8 one) as they
    are written, widened as decode groups and later prefill chunks gather them. A 180-token prompt is prefilled
    in two chunks (the second attends to the first through the pool) and a prompt sharing its first 64 tokens
    starts from prefix-cache hits."""
    from tests.test_worker_parts import tiny_engine
    from tokenworks.model.kv_cache import widen

    if device != "cpu":
        pytest.skip("a KV pool narrower than the model runs on the CPU only")
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    first = [(5 * j) % 96 + 1 for j in range(180)]
    prompts = [first, first[:64] + [3, 1, 4, 1, 5], [9, 8, 7]]
    results = {}
    for dtype in ("float32", narrow):
        loaded = tiny_engine(device, kv_cache_dtype=dtype)
        engine, runner = loaded.engine, loaded.runner
        assert runner.kv.tensor.dtype == getattr(torch, dtype)
        engine.add_request("r0", prompts[0], params)
        while engine.scheduler.requests["r0"].num_computed_tokens < len(prompts[0]):
            engine.step()
        for i, ids in enumerate(prompts[1:], 1):
            engine.add_request(f"r{i}", ids, params)
        while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.requests.values()):
            engine.step()
        assert engine.scheduler.requests["r1"].num_cached_tokens == 64
        for _ in range(3):
            engine.step()
        sched = engine.scheduler.schedule()
        assert len(sched.scheduled) == 3
        results[dtype] = (runner.final_logits(sched), widen(runner.kv.tensor, torch.float32).clone())
    (logits32, pool32), (logits_n, pool_n) = results["float32"], results[narrow]
    assert pool_n.abs().max() > 0
    if narrow == "float16":
        torch.testing.assert_close(pool_n, pool32, rtol=2e-3, atol=2e-3)  # the same tokens' K/V, rounded
    else:  # each value within a step of 1/127 of its head row's largest (a float32 difference upstream can add one)
        step = pool32.abs().amax(-1, keepdim=True) / 127
        assert ((pool_n - pool32).abs() <= 1.01 * step + 1e-3).all()
    torch.testing.assert_close(logits_n, logits32, rtol=1e-2, atol=1e-2)  # int8 measured 4.5e-4 of 0.65
    assert not torch.equal(logits_n, logits32)  # the pool really was narrower
