"""Structured output: text that follows a grammar (a JSON schema, any JSON object, a regex, a choice of strings, a
Lark or GBNF grammar), enforced at every choice by setting to -inf the logits of the tokens that would break it.

The grammars and their token masks are llguidance's (the engine behind Guidance, which vLLM and llama.cpp use too):
``grammar_for`` turns OpenAI's ``response_format`` and vLLM's ``guided_*`` fields into one llguidance grammar
string, which travels in ``SamplingParams.grammar`` and is checked before the request is placed
(``check_grammar``). On the worker, ``GrammarMasks`` (the sampler's) keeps one matcher per request and feeds it
the request's output tokens so far before each mask: a request prefilled on another worker, moved after a worker
died, or recomputed after a preemption has its matcher brought up to date from its tokens, the same way. Once the
grammar is complete only EOS is allowed, so the request ends with finish_reason "stop"; max_tokens can still cut
it short ("length"). Logprobs stay the model's own, as with penalties and logit_bias.

The worker builds llguidance's tokenizer (its view of every token's bytes) at its first structured request, about
a second for a 49k-token vocabulary; each request's matcher is made when it is first sampled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the router builds and checks grammars without torch
    import torch

    from tokenworks.engine.scheduler_output import ScheduledRequest

# compact JSON (no free whitespace between tokens: a small model left free pads with newlines until max_tokens)
JSON_OPTIONS = {"whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a dependency; a broken install should say what is missing
        raise RuntimeError("structured output needs llguidance (pip install llguidance)") from e
    return llguidance


def grammar_for(response_format: dict[str, Any] | None = None, *, json_schema: Any = None, regex: str | None = None,
                choice: Sequence[str] | None = None, grammar: str | None = None) -> str | None:
    """One llguidance grammar from what a request asks (at most one of them), or None for free text. Raises
    ValueError, naming the field, for a malformed or unsupported ask."""
    asked = {name: v for name, v in (("response_format", response_format), ("guided_json", json_schema),
                                      ("guided_regex", regex), ("guided_choice", choice), ("guided_grammar", grammar))
             if v is not None}
    if response_format is not None and response_format.get("type", "text") == "text":
        asked.pop("response_format")
    if len(asked) > 1:
        raise ValueError(f"give one of {', '.join(sorted(asked))}, not several")
    if not asked:
        return None
    matcher = _llguidance().LLMatcher
    if "response_format" in asked:
        kind = response_format.get("type")
        if kind == "json_object":
            return matcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if kind != "json_schema":
            raise ValueError(f"response_format type {kind!r} is not one of text, json_object, json_schema")
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("response_format json_schema must be an object with a 'schema' object")
        json_schema = spec.get("schema", {})
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except ValueError as e:
                raise ValueError(f"guided_json is not JSON: {e}") from e
        if not isinstance(json_schema, dict):
            raise ValueError("a JSON schema must be an object")
        return matcher.grammar_from_json_schema(json_schema, overrides=JSON_OPTIONS)
    if regex is not None:
        return matcher.grammar_from_regex(regex)
    if choice is not None:
        if not choice or not all(isinstance(c, str) and c for c in choice):
            raise ValueError("guided_choice must be a list of non-empty strings")
        return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice))
    try:
        return _llguidance().grammar_from("grammar", grammar)  # Lark, or GBNF converted to it
    except ValueError as e:
        raise ValueError(f"guided_grammar: {e}") from e


def check_grammar(grammar: str) -> None:
    """ValueError with llguidance's message if the grammar (or the schema or regex it came from) is invalid."""
    error = _llguidance().LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise ValueError(f"invalid grammar: {error}")


class GrammarMasks:
    """The sampler's part of structured output: a matcher per request, masks on the logits."""

    def __init__(self, tokenizer_json: Callable[[], str], eos_token_ids: Sequence[int], vocab_size: int) -> None:
        self._tokenizer_json = tokenizer_json
        self._eos = list(eos_token_ids)
        self._vocab = vocab_size
        self._tokenizer = None
        self._matchers: dict[str, tuple[Any, list[int]]] = {}  # request id -> (matcher, tokens it has consumed)

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _llguidance().LLTokenizer(self._tokenizer_json(), n_vocab=self._vocab,
                                                        eos_token=self._eos)
        return self._tokenizer

    def drop(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._matchers.pop(rid, None)

    def _matcher(self, s: ScheduledRequest):
        """The request's matcher, fed its output tokens up to now (made, or made again, when its tokens are not a
        continuation of what it has consumed: a request moved, prefilled elsewhere or recomputed; checked on the
        last CHECKED tokens it consumed, not a copy of the whole output each step)."""
        outputs = s.output_token_ids
        entry = self._matchers.get(s.request_id)
        n = len(entry[1]) if entry is not None else 0
        if entry is None or len(outputs) < n or outputs[max(0, n - CHECKED):n] != entry[1][-CHECKED:]:
            entry = (_llguidance().LLMatcher(self.tokenizer(), s.sampling_params.grammar, log_level=0), [])
            self._matchers[s.request_id] = entry
        matcher, consumed = entry
        if len(outputs) > len(consumed):
            new = list(outputs[len(consumed):])
            matcher.consume_tokens(new)
            consumed.extend(new)
        return matcher

    def apply(self, logits: torch.Tensor, reqs: list[ScheduledRequest], rows: list[int]) -> torch.Tensor:
        """Logits of the tokens each row's grammar does not allow now set to -inf, in place. A matcher in error
        (which sampling only allowed tokens does not reach) or with nothing left to allow gets EOS alone. The
        matchers write their masks (a bit per token) straight into one tensor for the batch; the native kernels
        apply them on the CPU (``cpu_native/grammar_mask.c``), PyTorch elsewhere. (2026-11-29, 32 rows of a JSON
        schema on the default model: 2.8 -> 1.7 ms a decode step in cProfile, the rest the matchers' own work; 0.99
        -> 0.30 ms alone on warm matchers. Before, each row's mask came as bytes, unpacked by numpy, and a
        masked_fill per row.)"""
        import ctypes

        import torch

        from tokenworks.model import cpu_native
        from tokenworks.model.host_copies import to_device

        vocab = logits.shape[1]
        words = -(-vocab // 32)
        masks = torch.empty(len(rows), words, dtype=torch.int32, pin_memory=logits.device.type == "cuda")
        for i, row in enumerate(rows):
            matcher, mask = self._matcher(reqs[row]), masks[i]
            if not matcher.is_error():
                matcher.unsafe_compute_mask_ptr(mask.data_ptr(), words * 4)
            if matcher.is_error() or not bool(mask.any()):
                mask.zero_()
                for t in self._eos:
                    bit = int(mask[t >> 5]) | (1 << (t & 31))
                    mask[t >> 5] = bit - (1 << 32) if bit >= 1 << 31 else bit
        lib = cpu_native.library() if logits.device.type == "cpu" else None
        if lib is not None and logits.dtype == torch.float32 and logits.stride(1) == 1:
            for i, row in enumerate(rows):
                lib.tw_grammar_mask(ctypes.c_void_p(logits[row].data_ptr()), 1, vocab, vocab,
                                    ctypes.c_void_p(masks[i].data_ptr()), words)
            return logits
        dev = logits.device
        bits = torch.arange(32, dtype=torch.int32, device=dev)
        blocked = ((masks.to(dev, non_blocking=True).unsqueeze(-1) >> bits) & 1).view(len(rows), -1)[:, :vocab] == 0
        index = to_device(rows, torch.long, dev)
        return logits.index_copy_(0, index, logits.index_select(0, index).masked_fill_(blocked, float("-inf")))


CHECKED = 8  # tokens a matcher's consumed output is compared on (GrammarMasks._matcher)
