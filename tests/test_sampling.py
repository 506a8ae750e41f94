"""Sampling and stopping on the real default model."""

import math

import pytest

from tokenworks import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, in a small village by the sea,"


def test_same_seed_same_output_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPT, p)[0].token_ids
    others = [SamplingParams(temperature=0.9, max_tokens=12, ignore_eos=True)] * 5
    batch = llm.generate(["Hello there", PROMPT, "1, 2, 3,", "The weather", "Why is the sky blue?", "Dear diary,"],
                         [others[0], p] + others[1:])
    assert batch[1].token_ids == alone
    different_seed = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=16, ignore_eos=True))
    assert different_seed[0].token_ids != alone


def test_top_k_1_is_greedy_and_temperature_0_is_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0]
    topk1 = llm.generate(PROMPT, SamplingParams(temperature=1.5, top_k=1, max_tokens=12, seed=5))[0]
    assert greedy.token_ids == topk1.token_ids
    tiny_p = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12, seed=5))[0]
    assert tiny_p.token_ids == greedy.token_ids
    high_min_p = llm.generate(PROMPT, SamplingParams(temperature=1.0, min_p=1.0, max_tokens=12, seed=5))[0]
    assert high_min_p.token_ids == greedy.token_ids
    # a temperature whose inverse overflows float32 is greedy too (dividing by it made every positive logit inf)
    tiny_t = llm.generate(PROMPT, SamplingParams(temperature=1e-40, max_tokens=12, seed=5))[0]
    assert tiny_t.token_ids == greedy.token_ids


def test_max_tokens_and_finish_reasons(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    chat = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=200))[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in llm.engine.eos_token_ids
    assert "<|im_end|>" not in chat.text


def test_stop_string_is_cut_from_the_text(llm):
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    words = free.text.split()
    stop = words[len(words) // 2]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text
    assert free.text.startswith(out.text) and len(out.text) < len(free.text)


def test_a_worker_engine_ends_a_request_at_its_stop_string_without_making_text():
    """A served worker's engine (``build_engine(detokenize=False)``: no text out) still ends a request with stop
    strings at the token that completes one, finish reason "stop", its KV freed; requests without stop strings
    are never detokenized there."""
    from tokenworks.config import EngineArgs
    from tokenworks.llm import build_engine

    engine = build_engine(EngineArgs(), detokenize=False).engine
    assert engine.tokenizer is None and engine.stop_tokenizer is not None
    prompt = engine.stop_tokenizer.encode(PROMPT)

    def run(rid: str, params: SamplingParams) -> tuple[list[int], str | None, str]:
        engine.add_request(rid, prompt, params)
        assert (engine._tracks[rid].detok is None) == (not params.stop)
        tokens, reason = [], None
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
                reason = out.finish_reason if out.finished else reason
        return tokens, reason, engine.stop_tokenizer.decode(tokens)

    free, free_reason, text = run("free", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert free_reason == "length" and len(free) == 30
    stop = text.split()[len(text.split()) // 2]
    cut, reason, cut_text = run("cut", SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))
    assert reason == "stop" and cut == free[: len(cut)] and len(cut) < 30
    assert stop in cut_text and stop not in engine.stop_tokenizer.decode(cut[:-1])  # its last token completes it
    assert engine.scheduler.kv.pool.num_used_blocks == 0
    # A prefill worker's request whose first token completes a stop string ends there, its KV not held for a decode
    # worker that will never come.
    first = engine.stop_tokenizer.decode(free[:1])
    engine.add_request("prefill", prompt, SamplingParams(temperature=0, max_tokens=30, stop=[first]), prefill_only=True)
    outs = engine.step()
    assert [(o.new_token_ids, o.finished, o.finish_reason, o.prefilled) for o in outs] == [(free[:1], True, "stop", False)]
    assert not engine.scheduler.held and engine.scheduler.kv.pool.num_used_blocks == 0


def test_stop_token_ids(llm):
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    stop_id = free.token_ids[3]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop"


def test_logprobs_are_consistent(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok
        assert len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy: the sampled token is the most likely one
        assert math.isclose(lp.top[0][2], lp.logprob, rel_tol=1e-6)
        assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]
        assert lp.logprob <= 0.0


def test_penalties_discourage_repetition(llm):
    prompt = "apple apple apple apple apple apple apple apple"
    plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    penalized = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, repetition_penalty=2.0,
                                                   frequency_penalty=1.0, presence_penalty=1.0, ignore_eos=True))[0]
    def most_repeated(ids):
        return max(ids.count(t) for t in set(ids))

    assert most_repeated(plain.token_ids) > most_repeated(penalized.token_ids)
    assert penalized.token_ids != plain.token_ids


def test_logit_bias_forces_and_bans_tokens_in_a_mixed_batch(llm):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    plain = llm.generate(PROMPT, greedy)[0]
    forced_id = llm.tokenizer.encode(" banana")[0]
    banned = plain.token_ids[0]
    outs = llm.generate([PROMPT] * 4, [
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={forced_id: 100}),
        greedy,  # unbiased in the same batch: untouched
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={banned: -100}, logprobs=1),
        SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True, logit_bias={forced_id: 100}),
    ])
    assert outs[0].token_ids == [forced_id] * 8 and outs[3].token_ids == [forced_id] * 8
    assert outs[1].token_ids == plain.token_ids
    assert banned not in outs[2].token_ids and outs[2].token_ids[0] != plain.token_ids[0]
    # logprobs are the model's own: the banned token still tops the first position's list
    assert outs[2].logprobs[0].top[0][0] == banned
    assert math.isclose(outs[2].logprobs[0].top[0][2], plain.logprobs[0].logprob, rel_tol=1e-5)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(PROMPT, SamplingParams(logit_bias={llm.engine.vocab_size: 1.0}))
    assert llm.pool.num_used_blocks == 0 and not llm.engine.has_unfinished()


def test_streaming_deltas_add_up_to_the_text(llm):
    engine = llm.engine
    engine.add_request("stream-test", "Write three emoji: ", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    pieces, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.new_text)
            final = out
    assert "".join(pieces) == final.text
    assert "\ufffd" not in "".join(pieces)
    assert llm.pool.num_used_blocks == 0


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1),
                                 dict(logprobs=100), dict(stop=[""]), dict(min_p=2.0), dict(logit_bias={5: 101}),
                                 dict(logit_bias={-1: 1}), dict(logit_bias={"5": 1}), dict(logit_bias=[(5,)])])
def test_bad_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_bad_prompts_are_rejected_and_leak_nothing(llm):
    with pytest.raises(ValueError):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError):
        llm.generate([[10**9]], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        llm.generate([[1] * (llm.engine.max_model_len + 5)], SamplingParams())
    assert llm.pool.num_used_blocks == 0 and not llm.engine.has_unfinished()


def test_sampled_tokens_follow_the_distribution_and_never_take_a_zero():
    """The sampler alone (no model): 20,000 draws from one row of known probabilities, a token at each position,
    land on each token in proportion (within 4 standard deviations), never on a token of probability 0 (top_k cuts
    two off, temperature 0.5 squares the rest's odds); one request's tokens depend on its seed and positions only,
    not on its row in the batch."""
    import torch

    from tokenworks.engine.scheduler_output import ScheduledRequest
    from tokenworks.model.sampler import Sampler

    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = probs.log().unsqueeze(0)  # at temperature 0.5: probs ** 2, renormalized
    want = probs[:3] ** 2 / (probs[:3] ** 2).sum()
    sampler = Sampler("cpu")
    params = SamplingParams(temperature=0.5, top_k=3, seed=11)
    n = 20_000
    counts = torch.zeros(5)
    for position in range(n):
        req = ScheduledRequest("r", [1], position, [0], True, params, [1], [])
        counts[sampler.sample(logits, [req]).result()[0][0]] += 1
    assert counts[3] == counts[4] == 0
    sd = (n * want * (1 - want)).sqrt()
    assert ((counts[:3] - n * want).abs() < 4 * sd).all(), (counts, n * want)

    def tokens(rows: int) -> list[int]:  # request "s" seeded alike, first or last in a batch of `rows`
        fresh = Sampler("cpu")
        out = []
        for step in range(30):
            batch = [ScheduledRequest(f"o{i}", [1], step, [0], True, SamplingParams(temperature=1.0, seed=i), [1],
                                      []) for i in range(rows - 1)]
            mine = ScheduledRequest("s", [1], step, [0], True, SamplingParams(temperature=1.0, seed=5), [1], [])
            reqs = batch + [mine] if step % 2 else [mine] + batch
            got, _ = fresh.sample(logits.expand(rows, 5).contiguous(), reqs).result()
            out.append(got[reqs.index(mine)])
        return out
    assert tokens(1) == tokens(4) and len(set(tokens(1))) > 1


def test_a_seeded_token_depends_on_its_position_not_on_the_sampler_that_draws_it():
    """A prefill worker samples a request's first token and a decode worker the rest, a failover or a preemption
    samples some again: a seeded request's token at a position is the same whichever Sampler draws it, in whatever
    order; an unseeded request draws its own seed once and keeps it; different seeds draw differently."""
    import torch

    from tokenworks.engine.scheduler_output import ScheduledRequest
    from tokenworks.model.sampler import Sampler

    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))

    def draw(sampler: Sampler, rid: str, seed: int | None, positions) -> list[int]:
        params = SamplingParams(temperature=1.0, seed=seed)
        return [sampler.sample(logits, [ScheduledRequest(rid, [1], p - 1, [0], True, params, [], [])]).result()[0][0]
                for p in positions]

    whole = draw(Sampler("cpu"), "a", 7, range(40, 60))
    assert draw(Sampler("cpu"), "b", 7, range(50, 60)) == whole[10:]  # another worker, from position 50
    assert draw(Sampler("cpu"), "c", 7, reversed(range(40, 60))) == whole[::-1]
    assert draw(Sampler("cpu"), "a", 8, range(40, 60)) != whole
    sampler = Sampler("cpu")
    unseeded = draw(sampler, "u", None, range(40, 60))
    assert draw(sampler, "u", None, range(40, 60)) == unseeded  # the request's drawn seed is kept...
    assert draw(sampler, "v", None, range(40, 60)) != unseeded  # ...and another request's is its own
    sampler.drop({"u"})
    assert draw(sampler, "u", None, range(40, 60)) != unseeded  # dropped with the request


@pytest.mark.parametrize("rows,vocab", [(1, 5), (3, 17), (5, 1000), (33, 49152)])
def test_the_native_race_draws_what_the_pytorch_one_draws(rows, vocab):
    """race.c against race.py's PyTorch arithmetic: with equal logits the choice is the largest U_j, so every
    draw must match bit for bit; with real-looking logits the native choice scores within 1e-5 of the best
    PyTorch score (the logarithms differ in the last places); tokens at -inf (cut by a grammar) never win; a
    view with a row stride of its own reads the same rows."""
    import random

    import torch

    from tokenworks.model import cpu_native
    from tokenworks.model.race import race_native, race_torch, row_key, uniforms

    if cpu_native.library() is None:
        pytest.skip(f"no native kernels here: {cpu_native.unavailable_reason()}")
    rng = random.Random(rows * vocab)
    keys = [row_key(rng.getrandbits(63), rng.randrange(1 << 20)) for _ in range(rows)]

    def race(x):
        return race_native(x, keys, [1.0] * rows, [0] * rows, [1.0] * rows, [0.0] * rows)

    flat = torch.zeros(rows, vocab)
    assert torch.equal(race(flat), race_torch(flat, keys))
    assert torch.equal(race(flat), uniforms(keys, vocab).argmax(dim=-1))
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 4
    x[:, vocab // 2:] = float("-inf")
    chosen = race(x)
    u = uniforms(keys, vocab)
    score = x - (-u.log()).log()
    assert (chosen < max(vocab // 2, 1)).all()
    picked = score.gather(1, chosen.unsqueeze(1)).squeeze(1)
    assert (picked >= score.max(dim=-1).values - 1e-5).all()
    strided = torch.zeros(rows, vocab + 7)[:, :vocab]
    strided.copy_(x)
    assert torch.equal(race(strided), chosen)


def _settings():
    return [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.0, top_p=0.9),
            dict(temperature=0.8, top_p=0.95), dict(temperature=1.0, top_k=40), dict(temperature=1.3, top_k=5, top_p=0.5),
            dict(temperature=1.0, min_p=0.05), dict(temperature=0.6, top_p=0.99, min_p=0.1),
            dict(temperature=1.0, top_k=2000, top_p=0.999), dict(temperature=2.0, top_p=0.3), dict(temperature=1.0, min_p=1.0),
            dict(temperature=1.0, top_p=1e-6), dict(temperature=1.0, top_k=100, top_p=0.9, min_p=0.2)]


def test_the_native_filters_keep_what_the_pytorch_ones_keep():
    """race.c's temperature, top-k, top-p and min-p (only the tokens near the top sorted, by bins) against the
    sampler's PyTorch path (``_filtered``, then the race in PyTorch) on flat to peaked rows of the default model's
    vocabulary size, every combination in one batch: the same tokens."""
    import random

    import torch

    from tokenworks.model import cpu_native
    from tokenworks.model.race import race_native, race_torch, row_key
    from tokenworks.model.sampler import _filtered

    if cpu_native.library() is None:
        pytest.skip(f"no native kernels here: {cpu_native.unavailable_reason()}")
    rng, gen = random.Random(0), torch.Generator().manual_seed(1)
    params = [SamplingParams(**s) for s in _settings()]
    same = total = 0
    for trial in range(15):
        x = torch.randn(len(params), 49152, generator=gen) * [0.05, 0.5, 1.5, 3.0, 10.0][trial % 5]
        keys = [row_key(rng.getrandbits(63), rng.randrange(1000)) for _ in params]
        native = race_native(x, keys, [p.temperature for p in params], [p.top_k for p in params],
                             [p.top_p for p in params], [p.min_p for p in params])
        same += int((native == race_torch(_filtered(x, params), keys)).sum())
        total += len(params)
    assert same >= total - 2, f"{total - same} of {total} differ"  # an edge's rounding may, rarely


@pytest.mark.parametrize("way", ["native", "pytorch"])
def test_a_row_without_filters_keeps_every_token_beside_rows_with_them(way, monkeypatch):
    """A request sampling from the whole distribution in a batch with a top_p request: its tokens are drawn from
    the whole row, not from the candidates the other row's filter looks at (the PyTorch path cut every row of such
    a batch to its 1,024 most likely tokens: on a flat row of 5,000 tokens no draw ever fell past them)."""
    import torch

    from tokenworks.engine.scheduler_output import ScheduledRequest
    from tokenworks.model import cpu_native, sampler as sampler_module

    if way == "native" and cpu_native.library() is None:
        pytest.skip(f"no native kernels here: {cpu_native.unavailable_reason()}")
    if way == "pytorch":
        monkeypatch.setattr(sampler_module, "native", lambda x: False)
    logits = torch.zeros(2, 5000)
    logits[1, :10] = 10.0  # 98 % of the row's probability
    sampler = sampler_module.Sampler("cpu")
    free, nucleus = SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, top_p=0.5, seed=2)
    far, nucleus_tokens = 0, set()
    for position in range(400):
        reqs = [ScheduledRequest(rid, [1], position, [0], True, p, [], []) for rid, p in (("a", free), ("b", nucleus))]
        (a, b), _ = sampler.sample(logits, reqs).result()
        far += a >= 1024
        nucleus_tokens.add(b)
    assert 0.65 * 400 < far < 0.9 * 400  # 3,976 of 5,000 equally likely tokens lie past the first 1,024
    assert nucleus_tokens <= set(range(10)) and len(nucleus_tokens) > 3
