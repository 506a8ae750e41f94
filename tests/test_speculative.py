"""Speculative decoding by prompt lookup (engine/ngram.py, Scheduler._drafts / update, ModelRunner._draft_checks).

The promise: the same tokens as decoding one at a time (the model's greedy choices), in fewer steps where drafts are
accepted, with the KV of every position counted as computed being that of the request's own token there (never a
rejected draft's), and nothing leaked. Checked on the policy alone with a stand-in model, then on real engines.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from tokenworks.config import EngineArgs, ModelConfig, SchedulerConfig
from tokenworks.engine.block_pool import BlockPool
from tokenworks.engine.kv_cache_manager import KVCacheManager
from tokenworks.engine.ngram import NgramIndex
from tokenworks.engine.request import Request, RequestStatus
from tokenworks.engine.scheduler import DRAFT_MAX_RUNNING, Scheduler
from tokenworks.engine.scheduler_output import ModelRunnerOutput
from tokenworks.sampling_params import SamplingParams


def test_ngram_index_proposes_what_followed_the_latest_earlier_occurrence_longest_first():
    idx = NgramIndex(min_n=2, max_n=3)
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3]
    # suffix (1, 2, 3) seen at 0..2, followed by 4, 9, ...; the 2-gram (2, 3) was seen later (5..6) but 3 beats 2
    assert idx.propose(tokens, 3) == [4, 9, 2]
    tokens += [7]  # (3, 7) never seen, nor (2, 3, 7)
    assert idx.propose(tokens, 3) == []
    tokens += [2, 3]  # (7, 2, 3) unseen; (2, 3) latest earlier at 10..11, followed by 7, 2, 3
    assert idx.propose(tokens, 2) == [7, 2]
    assert idx.propose(tokens, 0) == []
    # grown a token at a time or indexed at once: the same proposals
    fresh = NgramIndex(min_n=2, max_n=3)
    assert fresh.propose(list(tokens), 4) == idx.propose(tokens, 4) == [7, 2, 3]
    assert NgramIndex().propose([5, 5], 3) == []  # the suffix itself is not an earlier occurrence
    assert NgramIndex().propose([5, 5, 5], 3) == [5]  # (5, 5) at 0..1 was followed by one token so far
    with pytest.raises(ValueError):
        NgramIndex(min_n=3, max_n=2)


def test_a_request_whose_drafts_keep_failing_proposes_fewer_and_fewer():
    idx, tokens = NgramIndex(), [1, 2, 1, 2, 1, 2]

    def pattern(misses: int) -> list[bool]:  # which of the next 8 steps propose, each's drafts rejected
        out = []
        for _ in range(8):
            out.append(bool(idx.propose(tokens, 3)))
            if out[-1] and misses:
                idx.checked(0)
        return out

    assert pattern(0) == [True] * 8  # (no feedback: nothing rejected)
    assert pattern(1) == [True, False, True, False, False, True, False, False]  # skips 1, then 2, then 4
    assert [bool(idx.propose(tokens, 3)) for _ in range(3)] == [False, False, True]  # the 4 skipped steps end
    idx.checked(2)  # accepted: proposes at once again, and a miss costs one step again
    assert idx.propose(tokens, 3)
    idx.checked(0)
    assert [bool(idx.propose(tokens, 3)) for _ in range(2)] == [False, True]


def test_drafts_a_model_never_accepts_cost_few_checks():
    world = World(3)
    world.sched.add_request(Request("w", [1, 2, 1, 2, 1, 2], SamplingParams(temperature=0, max_tokens=60)))
    global model
    copying, model = model, lambda h: 500 + len(h)  # never repeats: every draft rejected
    try:
        while world.sched.has_unfinished():
            world.step()
    finally:
        model = copying
    assert world.sched.num_accepted_tokens == 0
    assert world.drafted["w"] <= 3 * 6  # a draft step after 1, 2, 4, 8, 16, 16 skipped steps at most


def model(history: list[int]) -> int:
    """A stand-in network: copies the token 5 back (so prompt lookup finds it), except every 7th position."""
    return 200 + len(history) % 11 if len(history) % 7 == 0 else history[-5]


def plain(prompt: list[int], max_tokens: int, stop: tuple[int, ...] = ()) -> list[int]:
    history = list(prompt)
    for _ in range(max_tokens):
        history.append(model(history))
        if history[-1] in stop:
            break
    return history[len(prompt):]


class World:
    """A scheduler driven by the stand-in model, with a record of which token's KV each pool slot holds."""

    def __init__(self, k: int, num_blocks: int = 40, block_size: int = 4, budget: int = 64, max_len: int = 200):
        self.pool = BlockPool(num_blocks, True)
        self.bs = block_size
        self.sched = Scheduler(SchedulerConfig(budget, 8, max_len, num_speculative_tokens=k),
                               KVCacheManager(self.pool, block_size))
        self.slots: dict[tuple[int, int], int] = {}
        self.steps = 0
        self.samples = 0  # (request, step) pairs that sampled
        self.drafted: dict[str, int] = {}  # request id -> draft tokens scheduled for it

    def step(self) -> None:
        out = self.sched.schedule()
        sampled, checks = {}, {}
        for s in out.scheduled:
            history = self.sched.requests[s.request_id].all_token_ids[:s.start_position] + s.token_ids
            for j, t in enumerate(s.token_ids):  # the step writes each row's KV
                p = s.start_position + j
                self.slots[(s.block_ids[p // self.bs], p % self.bs)] = t
            k, n = s.num_draft_tokens, len(history)
            self.drafted[s.request_id] = self.drafted.get(s.request_id, 0) + k
            if s.sample:
                self.samples += 1
                sampled[s.request_id] = model(history)
                checks[s.request_id] = [model(history[:n - k + j]) for j in range(k)]
        self.sched.update(out, ModelRunnerOutput(sampled_token_ids=sampled,
                                                 draft_checks={r: c for r, c in checks.items() if c}))
        self.steps += 1
        for r in self.sched.running:  # every position counted as computed holds its own token's KV
            table = self.sched.kv.block_ids(r.request_id)
            assert [self.slots[(table[p // self.bs], p % self.bs)] for p in range(r.num_computed_tokens)] == \
                r.all_token_ids[:r.num_computed_tokens]

    def run(self, requests: list[Request]) -> None:
        for r in requests:
            self.sched.add_request(r)
        while self.sched.has_unfinished():
            self.step()
        assert self.pool.num_used_blocks == 0
        self.pool.check_integrity()


PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7], [20, 21, 22, 23, 24]]


def requests(params: list[SamplingParams]) -> list[Request]:
    return [Request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(PROMPTS, params))]


@pytest.mark.parametrize("k", [1, 3, 8])
def test_drafts_give_the_plain_tokens_in_fewer_steps_and_never_count_a_rejected_drafts_kv(k):
    greedy = SamplingParams(temperature=0, max_tokens=40)
    base, spec = World(0), World(k)
    a, b = requests([greedy] * 3), requests([greedy] * 3)
    base.run(a)
    spec.run(b)
    for ra, rb, prompt in zip(a, b, PROMPTS):
        assert ra.output_token_ids == rb.output_token_ids == plain(prompt, 40)
        assert rb.status == RequestStatus.FINISHED_LENGTH
    assert spec.steps <= base.steps * {1: 0.75, 3: 0.65, 8: 0.55}[k], (spec.steps, base.steps)
    s = spec.sched
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens  # every 7th position rejects a draft
    # each sampling step brings its accepted drafts and one token of the model's own
    assert sum(len(r.output_token_ids) for r in b) == s.num_accepted_tokens + spec.samples


def test_a_stop_token_inside_accepted_drafts_ends_the_request_there():
    stop = (3,)
    world = World(4)
    rs = [Request("s", PROMPTS[0], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=stop))]
    world.run(rs)
    expected = plain(PROMPTS[0], 40, stop)
    assert rs[0].output_token_ids == expected and expected[-1] == 3 and len(expected) > 3
    assert rs[0].status == RequestStatus.FINISHED_STOPPED
    assert world.drafted["s"] > 0


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 13])
def test_drafts_never_take_a_request_past_its_token_or_context_limit(max_tokens):
    world = World(8)
    rs = requests([SamplingParams(temperature=0, max_tokens=max_tokens)] * 3)
    world.run(rs)
    assert [r.output_token_ids for r in rs] == [plain(p, max_tokens) for p in PROMPTS]
    short = World(8, max_len=20)  # the context limit: prompt + output at most 20 tokens
    rs = requests([SamplingParams(temperature=0, max_tokens=100)] * 3)
    short.run(rs)
    assert [len(r.all_token_ids) for r in rs] == [20] * 3
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in rs)


def test_only_requests_whose_tokens_a_draft_cannot_change_get_drafts():
    params = [SamplingParams(temperature=0, max_tokens=20, logprobs=2),
              SamplingParams(temperature=0, max_tokens=20, stop=("x",)),
              SamplingParams(temperature=0, max_tokens=20, presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.2),
              SamplingParams(temperature=0.8, seed=1, max_tokens=20),  # (the runner draws each draft's check)
              SamplingParams(temperature=0, max_tokens=20, logit_bias={3: 1.0}),
              SamplingParams(temperature=0, max_tokens=20, min_tokens=12),  # (checked token by token)
              SamplingParams(temperature=0, max_tokens=20)]
    drafted = []
    for i, p in enumerate(params):  # one at a time (no drafts while more than DRAFT_MAX_RUNNING run)
        world, r = World(4), Request(f"q{i}", PROMPTS[0], p)
        world.run([r])
        drafted.append(world.drafted[r.request_id] > 0)
        assert r.output_token_ids == plain(PROMPTS[0], 20)
    assert drafted == [False] * 4 + [True] * 4


def test_no_drafts_while_more_requests_run_than_drafts_pay_for():
    world = World(3, num_blocks=80)
    rs = [Request(f"m{i}", PROMPTS[i % 3], SamplingParams(temperature=0, max_tokens=10 + 10 * i)) for i in range(6)]
    for r in rs:
        world.sched.add_request(r)
    while world.sched.has_unfinished():
        running = len(world.sched.running)
        before = dict(world.drafted)
        world.step()
        if running > DRAFT_MAX_RUNNING:
            assert all(world.drafted[rid] == before.get(rid, 0) for rid in world.drafted)
    assert world.drafted["m5"] > 0  # once the others finished
    assert [r.output_token_ids for r in rs] == [plain(PROMPTS[i % 3], 10 + 10 * i) for i in range(6)]


def test_a_small_pool_preempts_and_recomputes_with_drafts_and_leaks_nothing():
    world = World(4, num_blocks=14, budget=16)
    rs = requests([SamplingParams(temperature=0, max_tokens=30)] * 3)
    world.run(rs)
    assert world.sched.num_preemptions > 0
    assert [r.output_token_ids for r in rs] == [plain(p, 30) for p in PROMPTS]


# -- real engines --------------------------------------------------------------------------------------------------

CFG = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position=256, tie_word_embeddings=True)
ARGS = EngineArgs(dtype="float32", num_blocks=64, max_num_batched_tokens=96, max_num_seqs=8, overlap_schedule="off")


def _tiny(device: str, k: int):
    from tokenworks.llm import build_random_engine

    loaded = build_random_engine(replace(ARGS, device=device, num_speculative_tokens=k), CFG, "tiny")
    loaded.runner.graphs = None
    return loaded.engine


def _run(engine, prompts, params):
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"t{i}", p, sp)
    done, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            done.setdefault(out.request_id, []).append(out)
        steps += 1
    return done, steps


def test_a_random_model_decodes_the_same_tokens_with_drafts_in_a_mixed_batch(device):
    prompts = [[(5 * i + 3 * (j % (4 + i))) % 96 + 1 for j in range(12 + 5 * i)] for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=33, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1),  # no drafts: alongside
              SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)]
    base, spec = _tiny(device, 0), _tiny(device, 4)
    a, steps_a = _run(base, prompts, params)
    b, steps_b = _run(spec, prompts, params)
    tokens = {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in b.items()}
    assert tokens == {rid: outs[-1].token_ids for rid, outs in a.items()}
    assert all(outs[-1].token_ids == tokens[rid] and outs[-1].finish_reason == "length" for rid, outs in b.items())
    assert [len(tokens[f"t{i}"]) for i in range(4)] == [48, 33, 40, 1]
    assert sum(len(o.new_token_ids) > 1 for outs in b.values() for o in outs) > 0  # steps brought several tokens
    assert all(len(o.new_token_ids) == 1 for o in b["t2"])
    assert [lp.token_id for lp in b["t2"][-1].logprobs] == tokens["t2"]
    sched = spec.scheduler
    assert sched.num_accepted_tokens > 0 and steps_b < steps_a
    assert spec.scheduler.kv.pool.num_used_blocks == 0
    spec.scheduler.kv.pool.check_integrity()


@pytest.mark.parametrize("temperature", [0.3, 1.0])
def test_a_seeded_sample_draws_the_same_tokens_with_drafts(device, temperature):
    # A draft is kept exactly when the draw keyed by its position picks it, so a seeded text does not change.
    prompts = [[(5 * i + 3 * (j % (3 + i))) % 96 + 1 for j in range(16 + 4 * i)] for i in range(3)]
    params = [SamplingParams(temperature=temperature, seed=11 + i, max_tokens=40, ignore_eos=True, **extra)
              for i, extra in enumerate([{}, {"top_p": 0.9}, {"top_k": 5, "logit_bias": {7: 2.0}}])]
    base, spec = _tiny(device, 0), _tiny(device, 3)
    a, _ = _run(base, prompts, params)
    b, _ = _run(spec, prompts, params)
    assert {rid: outs[-1].token_ids for rid, outs in b.items()} == {rid: outs[-1].token_ids for rid, outs in a.items()}
    assert spec.scheduler.num_accepted_tokens > 0
    assert spec.scheduler.kv.pool.num_used_blocks == 0


def test_speculation_and_overlapped_steps_are_not_combined():
    with pytest.raises(ValueError, match="speculative"):
        EngineArgs(num_speculative_tokens=3, overlap_schedule="on")
    assert not EngineArgs(device="cuda", num_speculative_tokens=3).overlap  # auto gives way
    assert EngineArgs(device="cuda").overlap
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SchedulerConfig(num_speculative_tokens=-1)


def test_the_default_model_chats_the_same_text_with_drafts(llm):
    from tokenworks import LLM

    spec = LLM(dtype="float32", quantization="none", num_speculative_tokens=3)
    chats = [[{"role": "user", "content": "Repeat this text exactly: The quick brown fox jumps over the lazy dog. "
                                          "Pack my box with five dozen liquor jugs."}],
             [{"role": "user", "content": "List three fruits as a JSON array of objects with keys name and color."}],
             [{"role": "user", "content": "Tell me about lighthouses."}]]
    params = SamplingParams(temperature=0, max_tokens=80)
    for chat in chats:
        assert spec.chat(chat, params)[0].text == llm.chat(chat, params)[0].text
    sched = spec.engine.scheduler
    assert sched.num_accepted_tokens >= 10  # (14 here: the repeated sentence most)


def test_the_default_model_served_with_drafts_streams_the_offline_text_and_counts_them():
    import openai

    from tests.serving import Server
    from tokenworks import LLM

    chat = [{"role": "user", "content": "Repeat this text exactly: The quick brown fox jumps over the lazy dog. "
                                        "Pack my box with five dozen liquor jugs."}]
    expected = LLM(num_speculative_tokens=3).chat(chat, SamplingParams(temperature=0, max_tokens=60))[0]
    server = Server("--aggregated-workers", "1", "--num-speculative-tokens", "3")
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        text, usage = "", None
        for chunk in c.chat.completions.create(model="default", messages=chat, max_tokens=60, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        assert text == expected.text
        assert usage.completion_tokens == len(expected.token_ids)
        whole = c.chat.completions.create(model="default", messages=chat, max_tokens=60, temperature=0)
        assert whole.choices[0].message.content == expected.text
        time.sleep(0.6)  # a heartbeat (every 0.25 s) since the requests ended carries the worker's totals
        (w,) = server.wait_idle(20).values()
        assert 0 < w["accepted_draft_tokens"] <= w["draft_tokens"]
        assert server.metric("tokenworks:spec_decode_num_accepted_tokens_total") == w["accepted_draft_tokens"]
        assert server.metric("tokenworks:spec_decode_num_draft_tokens_total") == w["draft_tokens"]
    finally:
        server.stop()
