"""Greedy outputs and logits of the real default model against Hugging Face transformers."""

import pytest
import torch

from tokenworks import LLM, SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
SENTENCES = [
    "The history of the city begins with a small fishing village on the river bank.",
    "In 1887 the railway reached the valley and the town grew quickly.",
    "Engineers argue about caches, queues and the cost of moving memory between machines.",
    "She opened the notebook, read the first page twice, and smiled.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
]


def make_prompts(tok):
    text = " ".join(SENTENCES * 30)
    long_ids = tok.encode(text)  # well over 1,000 tokens
    prompts = [[long_ids[0]], long_ids[:2], long_ids[:5]]
    for n in (9, 16, 17, 31, 33, 64, 100, 127, 200, 255, 300, 513, 700, 1000, 1030, 1100):
        prompts.append(long_ids[:n])
    prompts.append(tok.encode("What is the capital of France?"))
    prompts.append(tok.encode("Write a haiku about the sea."))
    prompts.append(long_ids[500:1200])
    assert len(prompts) >= 20 and max(map(len, prompts)) >= 1000 and min(map(len, prompts)) == 1
    return prompts


@pytest.fixture(scope="module")
def reference(hf_reference, llm):
    hf_tok, model = hf_reference
    prompts = make_prompts(llm.tokenizer)
    outputs, logits = [], []
    with torch.inference_mode():
        for p in prompts:
            # transformers' own greedy loop over its KV cache, not stopping at EOS.
            out = model(torch.tensor([p]), use_cache=True)
            logits.append(out.logits[0, -1].float())
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(NEW_TOKENS - 1):
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            outputs.append(tokens)
    return prompts, outputs, logits


def test_tokenizer_matches_transformers(hf_reference, llm):
    hf_tok, _ = hf_reference
    texts = SENTENCES + ["  leading spaces", "numbers 1234567 and 3.14159", "émigré naïve 日本語 🙂", "<|im_start|>user\nhi<|im_end|>"]
    for t in texts:
        assert llm.tokenizer.encode(t) == hf_tok.encode(t, add_special_tokens=False), t
        assert llm.tokenizer.decode(llm.tokenizer.encode(t), skip_special_tokens=False) == t


@pytest.mark.parametrize(
    "options",
    [
        dict(enable_prefix_caching=True),
        dict(enable_prefix_caching=False),
        dict(enable_prefix_caching=True, max_num_batched_tokens=96, block_size=16),  # long prompts split in chunks
    ],
    ids=["prefix-cache", "no-prefix-cache", "chunked-96"],
)
def test_greedy_tokens_identical_to_transformers(reference, options, request):
    prompts, expected, _ = reference
    llm = request.getfixturevalue("llm") if options == dict(enable_prefix_caching=True) else LLM(dtype="float32", device=request.getfixturevalue("device"), quantization="none", **options)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for attempt in range(2):  # the second pass runs on a warm prefix cache
        outs = llm.generate(prompts, params)
        got = [o.token_ids for o in outs]
        mismatches = [(i, len(prompts[i]), got[i], expected[i]) for i in range(len(prompts)) if got[i] != expected[i]]
        assert not mismatches, f"pass {attempt}: {mismatches}"
        if options.get("enable_prefix_caching") and attempt == 1:
            assert sum(o.num_cached_tokens for o in outs) > 0
    llm.pool.check_integrity()
    assert llm.pool.num_used_blocks == 0


def test_final_position_logits_within_1e3(reference, llm):
    from tokenworks.engine.request import Request
    from tokenworks.engine.scheduler_output import ScheduledRequest, SchedulerOutput

    prompts, _, ref_logits = reference
    pool, kv = llm.pool, llm.engine.scheduler.kv
    diffs = []  # (prompt length, max |difference|, difference of the logits' sums) per prompt
    for i, p in enumerate(prompts):
        r = Request(f"logits-{i}", p, SamplingParams(max_tokens=1))
        assert kv.allocate_slots(r, len(p))
        s = ScheduledRequest(r.request_id, p, 0, kv.block_ids(r.request_id), True, r.sampling_params, p, [])
        got = llm.loaded.runner.final_logits(SchedulerOutput(scheduled=[s]))[0]
        kv.free(r)
        diffs.append((len(p), (got - ref_logits[i]).abs().max().item(), (got.double().sum() - ref_logits[i].double().sum()).item()))
    # Every prompt's figures on failure: one prompt off points at its length's path, all of them at shared state.
    assert max(d for _, d, _ in diffs) < 1e-3, diffs
    pool.check_integrity()


def test_prompt_logprobs_equal_transformers_whole_and_chunked(hf_reference, llm):
    """Each prompt token's log-probability given the tokens before it (the first has none), with its top
    alternatives, against transformers' log-softmax over the whole prompt at once: computed in one chunk, and in
    chunks of 16 tokens (a prompt over several steps, beside another request). A request asking for them is not
    served from the prefix cache."""
    _, model = hf_reference
    ids = llm.tokenizer.encode(" ".join(SENTENCES))[:70]
    with torch.inference_mode():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    chunked = LLM(dtype="float32", quantization="none", max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    for engine in (llm, chunked):
        engine.generate([ids], SamplingParams(max_tokens=1))  # the prompt now sits in the prefix cache
        out, other = engine.generate([ids, ids[:40]], [params, SamplingParams(temperature=0, max_tokens=3)])
        assert out.num_cached_tokens == 0 and other.prompt_logprobs is None
        got = out.prompt_logprobs
        assert len(got) == len(ids) and got[0] is None
        for t in range(1, len(ids)):
            lp = got[t]
            assert lp.token_id == ids[t] and abs(lp.logprob - want[t - 1, ids[t]].item()) < 5e-3, t
            top = want[t - 1].topk(3)
            assert [i for i, _, _ in lp.top] == top.indices.tolist()
            assert max(abs(v - w) for (_, _, v), w in zip(lp.top, top.values.tolist())) < 5e-3
        assert engine.pool.num_used_blocks == 0
