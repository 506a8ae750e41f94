"""Structured output on the real default model: text that follows a JSON schema, any JSON object, a regex, a choice
or a grammar, greedy and sampled, beside free requests in one batch, overlapped or not; bad asks refused."""

import json
import re

import pytest

from tokenworks import SamplingParams
from tokenworks.structured_output import check_grammar, grammar_for

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "pets": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON: name, age and pets."}]


def is_person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age", "pets"} and isinstance(value["name"], str) and type(value["age"]) is int
            and isinstance(value["pets"], list) and len(value["pets"]) <= 3
            and all(isinstance(p, str) for p in value["pets"]))


def test_json_schema_greedy_and_sampled_beside_free_requests(llm):
    """On the float32 engine, whose greedy tokens do not depend on the batch (the 4-bit one's do: its products
    take other arithmetic from 4 rows), so that the free request's text can be compared with its own alone."""
    served_llm = llm
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    free = SamplingParams(temperature=0, max_tokens=20)
    alone = served_llm.chat([ASK], free)[0]
    outs = served_llm.chat([ASK] * 5, [
        SamplingParams(temperature=0, max_tokens=150, grammar=grammar),
        free,
        *(SamplingParams(temperature=0.7, seed=s, max_tokens=150, grammar=grammar) for s in range(3)),
    ])
    assert outs[1].text == alone.text  # a free request in the batch is untouched
    assert not alone.text.lstrip().startswith("{")  # ... and on its own the model does not answer in JSON
    for o in outs[:1] + outs[2:]:
        assert o.finish_reason == "stop" and is_person(o.text), o.text
    assert len({o.text for o in outs[2:]}) > 1  # sampling still samples, within the grammar
    assert served_llm.pool.num_used_blocks == 0


def test_regex_choice_grammar_and_any_json_object(served_llm):
    asks = [(grammar_for(regex=r"[A-Z]{3}-[0-9]{4}"), lambda t: re.fullmatch(r"[A-Z]{3}-[0-9]{4}", t)),
            (grammar_for(choice=["yes", "no", "maybe"]), lambda t: t in ("yes", "no", "maybe")),
            (grammar_for(grammar='start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/'),
             lambda t: re.fullmatch(r"The answer is [0-9]+\.", t)),
            (grammar_for({"type": "json_object"}), lambda t: isinstance(json.loads(t), dict))]
    outs = served_llm.chat([[{"role": "user", "content": "Is the sky blue? Answer briefly."}]] * len(asks),
                           [SamplingParams(temperature=0.8, seed=7, max_tokens=40, grammar=g) for g, _ in asks])
    for (_, ok), o in zip(asks, outs):
        assert o.finish_reason == "stop" and ok(o.text), o.text


def test_max_tokens_cuts_a_grammar_short_and_overlap_gives_the_same_text():
    """Two fresh engines, stepwise and overlapped, given the same requests in the same order (so that their prefix
    caches hold the same: a prompt prefilled whole and one mostly from the cache may differ in their logits' last
    bits, where a product of many rows runs on other arithmetic, and a sampled token with them)."""
    from tokenworks import LLM

    grammar = grammar_for(json_schema=PERSON)
    params = [SamplingParams(temperature=0, max_tokens=60, grammar=grammar),
              SamplingParams(temperature=0.9, seed=4, max_tokens=60, grammar=grammar),
              SamplingParams(temperature=0, max_tokens=24)]
    outs = {}
    for overlap in ("off", "on"):
        llm = LLM(overlap_schedule=overlap)
        cut = llm.chat([ASK], SamplingParams(temperature=0, max_tokens=5, grammar=grammar))[0]
        assert cut.finish_reason == "length" and cut.text.startswith("{") and len(cut.token_ids) == 5
        outs[overlap] = llm.chat([ASK] * 3, params)
    overlapped, want, got = llm, outs["off"], outs["on"]
    assert [(o.text, o.finish_reason) for o in got] == [(o.text, o.finish_reason) for o in want]
    assert is_person(got[0].text) and is_person(got[1].text)
    assert overlapped.pool.num_used_blocks == 0


@pytest.mark.parametrize("ask, field", [
    (dict(response_format={"type": "yaml"}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": [1]}}), "json_schema"),
    (dict(json_schema="{not json"), "guided_json"),
    (dict(choice=[]), "guided_choice"),
    (dict(regex="a", choice=["b"]), "not several"),
])
def test_malformed_asks_are_refused_naming_what(ask, field):
    with pytest.raises(ValueError, match=field):
        grammar_for(**ask)


def test_invalid_grammars_are_refused_before_they_run(served_llm):
    for grammar in (grammar_for(regex="[unclosed"), grammar_for(grammar="start: undefined_rule"),
                    grammar_for(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})):
        with pytest.raises(ValueError, match="invalid grammar"):
            check_grammar(grammar)
        with pytest.raises(ValueError, match="invalid grammar"):
            served_llm.generate("Hi", SamplingParams(grammar=grammar))
    assert grammar_for({"type": "text"}) is None and grammar_for() is None
    assert served_llm.pool.num_used_blocks == 0 and not served_llm.engine.has_unfinished()


def test_masks_block_the_same_tokens_natively_and_in_pytorch(llm, monkeypatch):
    """GrammarMasks.apply on the native kernel and in PyTorch (CUDA's path): the same tokens blocked, for a
    grammar at its start, part-way through, and broken (EOS alone); rows not asked for untouched."""
    import torch

    from tokenworks.engine.scheduler_output import ScheduledRequest
    from tokenworks.model import cpu_native

    if cpu_native.library() is None:
        pytest.skip(f"no native kernels here: {cpu_native.unavailable_reason()}")
    masks, tok = llm.engine.runner.sampler.grammars, llm.tokenizer
    grammar = grammar_for(json_schema=PERSON)
    outputs = [[], tok.encode('{"name":"Ada', add_special_tokens=False), tok.encode("no json", add_special_tokens=False)]
    reqs = [ScheduledRequest(f"mask{i}", [1], 0, [0], True, SamplingParams(grammar=grammar), [1], out)
            for i, out in enumerate(outputs)] + [ScheduledRequest("free", [1], 0, [0], True, SamplingParams(), [1], [])]
    logits = torch.randn(4, llm.engine.vocab_size, generator=torch.Generator().manual_seed(0))
    native = masks.apply(logits.clone(), reqs, [0, 1, 2])
    monkeypatch.setattr(cpu_native, "library", lambda: None)
    masks.drop({r.request_id for r in reqs})
    torch_way = masks.apply(logits.clone(), reqs, [0, 1, 2])
    assert torch.equal(native, torch_way) and torch.equal(native[3], logits[3])
    allowed = [int((~row.isinf()).sum()) for row in native[:3]]
    assert 0 < allowed[0] < 100 and allowed[1] > 1000  # '{' to start (compact JSON); most tokens inside a string
    assert (~native[2].isinf()).nonzero().flatten().tolist() == sorted(llm.engine.eos_token_ids)
