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
