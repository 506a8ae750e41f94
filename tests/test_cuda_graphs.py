"""Decode steps through captured graphs: buckets, static buffers and padding rows.

On the CPU the capture is stubbed at the device boundary (``EagerCapture``: a
replay calls the captured function again), so everything but the CUDA graph
itself runs here; with ``--device cuda`` the same tests capture real CUDA
graphs.
"""

import pytest
import torch

from tokenworks.model.cuda_graphs import EagerCapture, capture_sizes
from tokenworks.sampling_params import SamplingParams
from tests.test_worker_parts import tiny_engine


def _capture(device):
    return None if device.startswith("cuda") else EagerCapture()


def test_capture_sizes_are_the_buckets_and_end_at_max_num_seqs():
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]


def _eager(device):
    loaded = tiny_engine(device)
    loaded.runner.graphs = None
    return loaded


def _decoding(loaded, lens):
    engine = loaded.engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, n in enumerate(lens):
        engine.add_request(f"r{i}", [(5 * i + 3 * j) % 96 + 1 for j in range(n)], params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.requests.values()):
        engine.step()
    sched = engine.scheduler.schedule()
    assert all(s.num_tokens == 1 for s in sched.scheduled)
    return sched


@pytest.mark.parametrize("lens", [[9], [40, 3, 17], [100, 2, 2, 2, 2, 60]])  # buckets 1, 4 (1 pad row), 8 (2 pad rows)
def test_replayed_step_gives_the_eager_steps_logits(device, lens):
    loaded = _eager(device)
    sched = _decoding(loaded, lens)
    runner = loaded.runner
    want = runner.final_logits(sched)  # eager, grouped or paged as the device has it
    graphs = runner.capture_graphs(8, 256 // 16, _capture(device))
    assert graphs.bucket(len(lens)) >= len(lens)
    got = runner.final_logits(sched)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(graphs.inputs[4, len(lens):graphs.bucket(len(lens))].cpu(),  # padding rows: context 1
                       torch.ones(graphs.bucket(len(lens)) - len(lens), dtype=torch.long))


def test_generation_with_graphs_equals_generation_without(device):
    """Greedy tokens identical while the batch shrinks through several buckets (requests end at different steps)
    and grows past the largest one (9 requests, buckets up to 8: those steps run eagerly)."""
    def run(loaded):
        engine = loaded.engine
        for i in range(9):
            params = SamplingParams(temperature=0, max_tokens=3 + 4 * i, ignore_eos=True)
            engine.add_request(f"g{i}", [(11 * i + 7 * j) % 96 + 1 for j in range(5 + 13 * i)], params)
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] = list(out.token_ids)
        return tokens

    eager = run(_eager(device))
    loaded = _eager(device)
    graphs = loaded.runner.capture_graphs(8, 256 // 16, _capture(device))
    replays = []
    for size, replay in list(graphs.replays.items()):
        graphs.replays[size] = (lambda s, r: lambda: (replays.append(s), r())[1])(size, replay)
    assert run(loaded) == eager
    assert set(replays) >= {8, 4, 2, 1}  # 9 → 8 → ... → 1 rows decoding
    assert len(eager) == 9 and all(len(t) == 3 + 4 * i for i, t in enumerate(eager[f"g{i}"] for i in range(9)))


def test_paged_decode_on_the_cpu_gives_the_grouped_logits(device):
    loaded = _eager(device)
    sched = _decoding(loaded, [150, 3, 33, 7])
    runner = loaded.runner
    runner.use_paged = False
    grouped = runner.final_logits(sched)
    runner.use_paged = True
    _, _, _, meta, _ = runner.prepare(sched.scheduled)
    assert meta.paged is not None and meta.decodes == [] and meta.paged.block_table.shape == (4, 10)
    torch.testing.assert_close(runner.final_logits(sched), grouped, rtol=1e-4, atol=1e-4)


def test_a_step_wider_than_the_captured_tables_runs_eagerly(device):
    loaded = _eager(device)
    sched = _decoding(loaded, [100, 5])
    runner = loaded.runner
    want = runner.final_logits(sched)
    runner.capture_graphs(4, 3, _capture(device))  # 3 blocks = 48 tokens: the 100-token request does not fit
    called = []
    runner.graphs.run = lambda *a, **k: called.append(1)
    torch.testing.assert_close(runner.final_logits(sched), want, rtol=0, atol=0)
    assert called == []
