"""Overlapped scheduling: step n+1 scheduled and launched before step n's tokens are taken back.

Every test runs the same requests through an engine that overlaps and one
that does not, and asserts the same tokens, logprobs and finish reasons; then
what overlapping may and may not cost: at most one wasted token for a request
that stops on a sampled token, none for a length limit or a prefill-only
request, no preemption of a request whose token is in flight, no KV leaked.
On the CPU the "device" runs each step before ``launch`` returns, so these
test the bookkeeping (pending tokens read on the device, the take-back order),
not the speed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tokenworks.config import EngineArgs, ModelConfig
from tokenworks.engine.scheduler_output import PLACEHOLDER
from tokenworks.model.cuda_graphs import EagerCapture
from tokenworks.sampling_params import SamplingParams

CFG = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position=256, tie_word_embeddings=True)
ARGS = EngineArgs(dtype="float32", num_blocks=64, max_num_batched_tokens=96, max_num_seqs=8)


def _engine(device: str, overlap: bool, graphs: bool = False, **args):
    from tokenworks.llm import build_random_engine

    loaded = build_random_engine(replace(ARGS, device=device, overlap_schedule="on" if overlap else "off", **args),
                                 CFG, "tiny")
    if not graphs:
        loaded.runner.graphs = None
    elif loaded.runner.graphs is None:  # the CPU: capture stubbed at the device boundary
        loaded.runner.capture_graphs(8, 256 // 16, EagerCapture())
    assert loaded.engine.overlap is overlap
    return loaded


def _prompt(i: int, n: int) -> list[int]:
    return [(11 * i + 7 * j) % 96 + 1 for j in range(n)]


class _Watch:
    """Wraps the runner: records each launched step's rows (request id, token ids) and counts placeholders."""

    def __init__(self, loaded) -> None:
        self.runner = loaded.runner
        self.steps: list[list[tuple[str, list[int], int]]] = []
        self.placeholders = 0
        loaded.engine.runner = self

    def _record(self, sched) -> None:
        self.steps.append([(s.request_id, list(s.token_ids), s.start_position) for s in sched.scheduled])
        self.placeholders += sum(s.token_ids == [PLACEHOLDER] for s in sched.scheduled)

    def execute(self, sched):
        self._record(sched)
        return self.runner.execute(sched)

    def launch(self, sched):
        self._record(sched)
        return self.runner.launch(sched)

    def rows(self, rid: str, start: int = 0) -> int:
        """Rows computed for ``rid`` from position ``start`` on."""
        return sum(r == rid and p >= start for step in self.steps for r, _, p in step)


def _run(loaded, requests, abort_at: dict[int, str] | None = None):
    engine = loaded.engine
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    outs, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            prev = outs.get(out.request_id)
            assert prev is None or not prev.finished, f"{out.request_id}: an output after it finished"
            outs[out.request_id] = out
        steps += 1
        if abort_at and steps in abort_at:
            engine.abort(abort_at[steps])
        assert steps < 2000
    assert loaded.pool.num_used_blocks == 0, "KV blocks leaked"
    assert not engine.scheduler.requests and not engine._tracks
    return outs


def _same(a, b) -> None:
    assert set(a) == set(b)
    for rid in a:
        x, y = a[rid], b[rid]
        assert (x.token_ids, x.finish_reason) == (y.token_ids, y.finish_reason), rid
        if x.logprobs is not None:
            assert [(lp.token_id, [t for t, _, _ in lp.top]) for lp in x.logprobs] == \
                   [(lp.token_id, [t for t, _, _ in lp.top]) for lp in y.logprobs], rid
            assert [lp.logprob for lp in x.logprobs] == pytest.approx([lp.logprob for lp in y.logprobs], abs=1e-5)


def _mix():
    """Greedy and seeded random requests, logprobs, stop tokens, min_tokens, a prompt longer than a step's budget."""
    reqs = []
    for i in range(10):
        kind = i % 4
        if kind == 0:
            params = SamplingParams(temperature=0, max_tokens=5 + 3 * i, ignore_eos=True)
        elif kind == 1:
            params = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=100 + i, max_tokens=30,
                                    stop_token_ids=list(range(3 * i + 1, 97, 11)), logprobs=2)
        elif kind == 2:
            params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=list(range(i, 97, 9)), min_tokens=2)
        else:
            params = SamplingParams(temperature=1.0, seed=7 * i, max_tokens=25, stop_token_ids=[i, i + 40], min_p=0.05)
        reqs.append((f"r{i}", _prompt(i, 4 + 17 * i), params))  # up to 157 tokens: chunked over two steps
    return reqs


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_overlapped_steps_give_the_same_tokens_logprobs_and_finish_reasons(device, graphs):
    want = _run(_engine(device, False, graphs), _mix())
    loaded = _engine(device, True, graphs)
    watch = _Watch(loaded)
    got = _run(loaded, _mix())
    _same(got, want)
    reasons = [o.finish_reason for o in want.values()]
    assert reasons.count("stop") >= 2 and reasons.count("length") >= 2  # both kinds of end are exercised
    assert watch.placeholders > 50  # decodes did take their input from the step in flight


def test_a_length_limit_costs_no_step_and_a_sampled_stop_at_most_one(device):
    loaded = _engine(device, True)
    watch = _Watch(loaded)
    reqs = _mix()
    outs = _run(loaded, reqs)
    wasted = 0
    for rid, prompt, params in reqs:
        out = outs[rid]
        decodes = watch.rows(rid, start=len(prompt))  # the prefill sampled the first token; each decode one more
        if out.finish_reason == "length":
            assert decodes == len(out.token_ids) - 1, rid
        else:
            assert len(out.token_ids) - 1 <= decodes <= len(out.token_ids), rid
            wasted += decodes - (len(out.token_ids) - 1)
    assert wasted > 0  # a request that stopped on a token did have a step in flight


def test_penalties_see_the_token_in_flight(device):
    reqs = [(f"p{i}", _prompt(i, 6 + 5 * i), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                           repetition_penalty=1.5 if i % 2 else 1.0,
                                                           frequency_penalty=0.8 if i % 3 == 0 else 0.0))
            for i in range(6)]
    _same(_run(_engine(device, True), reqs), _run(_engine(device, False), reqs))


def test_a_full_pool_preempts_only_requests_with_no_token_in_flight(device):
    """12 blocks of 16 for 6 requests that grow to 70 tokens each: preemptions in both modes, same tokens."""
    reqs = [(f"q{i}", _prompt(i, 30 + i), SamplingParams(temperature=0.8, seed=i, max_tokens=40, ignore_eos=True))
            for i in range(6)]
    sync = _engine(device, False, num_blocks=12, max_model_len=120)
    want = _run(sync, reqs)
    loaded = _engine(device, True, num_blocks=12, max_model_len=120)
    stalls = []
    schedule = loaded.engine.scheduler.schedule

    def watched():
        for r in loaded.engine.scheduler.running:
            assert r.num_pending <= 1
        out = schedule()
        stalls.append(out.stalled)
        return out

    loaded.engine.scheduler.schedule = watched
    got = _run(loaded, reqs)
    _same(got, want)
    assert sync.engine.scheduler.num_preemptions > 0 and loaded.engine.scheduler.num_preemptions > 0
    assert any(stalls)  # the pool ran short while tokens were in flight, and the engine took them back first


def test_an_abort_while_its_step_is_in_flight_leaks_nothing_and_leaves_the_rest_as_they_were(device):
    reqs = [(f"a{i}", _prompt(i, 10 + 9 * i), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
            for i in range(5)]
    want = _run(_engine(device, False), reqs)
    got = _run(_engine(device, True), reqs, abort_at={6: "a2", 9: "a4"})
    assert not got["a2"].finished and len(got["a2"].token_ids) < 24
    for rid in ("a0", "a1", "a3"):
        assert got[rid].token_ids == want[rid].token_ids


def test_prefill_only_requests_are_held_after_their_first_token_with_no_decode_step(device):
    from tokenworks.engine.request import RequestStatus

    outs = {}
    for overlap in (False, True):
        loaded = _engine(device, overlap)
        watch = _Watch(loaded)
        engine = loaded.engine
        for i in range(4):
            engine.add_request(f"h{i}", _prompt(i, 16 * (i + 1)), SamplingParams(temperature=0), prefill_only=True)
        engine.add_request("d", _prompt(9, 20), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        while engine.has_unfinished():
            for out in engine.step():
                outs.setdefault(overlap, {})[out.request_id] = out
        held = engine.scheduler.held
        assert sorted(held) == [f"h{i}" for i in range(4)]
        for i in range(4):
            assert held[f"h{i}"].status == RequestStatus.PREFILLED and held[f"h{i}"].output_token_ids
            # exactly the prompt's blocks: no block taken for a decode that never runs
            assert len(engine.scheduler.kv.block_ids(f"h{i}")) == i + 1
            assert watch.rows(f"h{i}") == 1
    for rid in outs[False]:
        assert outs[True][rid].token_ids == outs[False][rid].token_ids
        assert outs[True][rid].prefilled == outs[False][rid].prefilled


def test_launching_a_step_never_waits_for_the_device(device):
    """CUDA: every launch (prefills, decodes with pending inputs, greedy, seeded, logprobs, graphs) runs under
    torch's sync debug mode set to error, so any copy or read that waits for the device fails here."""
    if not device.startswith("cuda"):
        pytest.skip("CUDA only: on the CPU a step runs inside launch")
    import torch

    loaded = _engine(device, True, graphs=True)
    launch = loaded.runner.launch

    def strict(sched):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(sched)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    watch = _Watch(loaded)
    watch.runner = type("Strict", (), {"launch": staticmethod(strict), "execute": loaded.runner.execute})()
    outs = _run(loaded, _mix()[:6])
    assert len(outs) == 6 and watch.placeholders > 20


def test_the_default_model_overlapped_gives_the_same_text_and_stop_strings(served_llm):
    """The real model on its native CPU decode step, stop strings found by the detokenizer (a stop string ends
    the request one step after its token, so its step in flight is thrown away)."""
    from tokenworks import LLM

    overlapped = LLM(overlap_schedule="on")
    prompts = ["The capital of France is", "List three colours:", "def add(a, b):", "Once upon a time"]
    params = [SamplingParams(temperature=0, max_tokens=24, stop=[" is", "."]),
              SamplingParams(temperature=0, max_tokens=30, stop=["\n\n"]),
              SamplingParams(temperature=0.7, seed=3, max_tokens=20, logprobs=1),
              SamplingParams(temperature=0, max_tokens=16)]
    want = served_llm.generate(prompts, params)
    got = overlapped.generate(prompts, params)
    assert [(o.text, o.token_ids, o.finish_reason) for o in got] == [(o.text, o.token_ids, o.finish_reason)
                                                                     for o in want]
    assert any(o.finish_reason == "stop" and o.token_ids[-1] not in served_llm.engine.eos_token_ids for o in want)
    assert overlapped.pool.num_used_blocks == 0
