"""From logits to tokens: penalties, logit bias, grammars (structured output), temperature, top-k/top-p/min-p,
seeded sampling, logprobs.

A row that samples at random takes its token by the exponential race over counter-based draws (``race.py``): the
draws for a request's token at position p are a function of its seed (``SamplingParams.seed``, else one drawn for
the request here) and p, so its tokens depend only on its own logits, seed and positions, never on its neighbours
in the batch, on preemption, or on which worker sampled them.

``sample`` queues the work and the copy of its results to the host and
returns at once (``SampledTokens``); ``SampledTokens.result()`` waits for
them. Until then the tokens stay usable on the device as the next step's
inputs (overlapped scheduling).
"""

from __future__ import annotations

import random

import torch

from tokenworks.engine.scheduler_output import ScheduledRequest, TokenLogprobs
from tokenworks.model.host_copies import HostCopy, to_device
from tokenworks.model.race import native, race_native, race_torch, row_key
from tokenworks.sampling_params import SamplingParams
from tokenworks.structured_output import GrammarMasks


class SampledTokens:
    """One step's sampled tokens: ``tokens`` on the device (row i for ``reqs[i]``), the host copy under way."""

    def __init__(self, tokens: torch.Tensor, reqs: list[ScheduledRequest], logprob_rows: list[int],
                 logprob_tensors: list[torch.Tensor]) -> None:
        self.tokens = tokens
        self.reqs = reqs
        self.logprob_rows = logprob_rows
        self._copy = HostCopy([tokens, *logprob_tensors])

    def result(self) -> tuple[list[int], dict[str, TokenLogprobs]]:
        """Wait for the copy; the tokens in row order, and the logprobs of the requests that asked."""
        host = self._copy.get()
        token_list = host[0].tolist()
        logprobs: dict[str, TokenLogprobs] = {}
        if self.logprob_rows:
            chosen, top_vals, top_ids = (t.tolist() for t in host[1:])
            for i, row in enumerate(self.logprob_rows):
                s = self.reqs[row]
                k = s.sampling_params.logprobs
                logprobs[s.request_id] = TokenLogprobs(logprob=chosen[i], top_token_ids=top_ids[i][:k],
                                                       top_logprobs=top_vals[i][:k])
        return token_list, logprobs


class Sampler:
    def __init__(self, device: str) -> None:
        self.device = device
        self._seeds: dict[str, int] = {}  # the requests that sample at random without a seed of their own
        self.grammars: GrammarMasks | None = None  # set where the model's tokenizer is at hand (llm.build_engine)

    def drop(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._seeds.pop(rid, None)
        if self.grammars is not None:
            self.grammars.drop(request_ids)

    def _key(self, s: ScheduledRequest) -> int:
        """The race's key for the token this step samples for ``s`` (at position ``s.context_len``)."""
        seed = s.sampling_params.seed
        if seed is None:
            seed = self._seeds.get(s.request_id)
            if seed is None:
                seed = self._seeds[s.request_id] = random.getrandbits(63)
        return row_key(seed, s.context_len)

    def _apply_penalties(self, logits: torch.Tensor, reqs: list[ScheduledRequest]) -> torch.Tensor:
        for row, s in enumerate(reqs):
            p = s.sampling_params
            if not p.has_penalties:
                continue
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(s.prompt_token_ids) | set(s.output_token_ids)), device=logits.device)
                vals = logits[row, seen]
                logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if s.output_token_ids and (p.presence_penalty or p.frequency_penalty):
                out = torch.tensor(s.output_token_ids, device=logits.device)
                counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
                logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: list[ScheduledRequest], scratch: bool = False) -> SampledTokens:
        """logits: (N, vocab) float32, one row per request in ``reqs``. ``scratch``: the caller has no further use
        for them, so penalties, logit_bias and grammars change them in place (a copy of 32 rows cost 1.2 ms a
        step here, its fresh pages most of it), else a copy."""
        dev = logits.device
        want_logprobs = [row for row, s in enumerate(reqs) if s.sampling_params.logprobs is not None]
        raw_logprobs = None
        if want_logprobs:
            want = to_device(want_logprobs, torch.long, dev)
            raw_logprobs = torch.log_softmax(logits.index_select(0, want), dim=-1)
        penalized = any(s.sampling_params.has_penalties for s in reqs)
        biased = [row for row, s in enumerate(reqs) if s.sampling_params.logit_bias]
        guided = [row for row, s in enumerate(reqs) if s.sampling_params.grammar is not None]
        if penalized or biased or guided:
            logits = logits if scratch else logits.clone()  # changed in place below
        if penalized:
            logits = self._apply_penalties(logits, reqs)
        if biased:
            logits = _add_logit_bias(logits, reqs, biased)
        if guided:
            if self.grammars is None:
                raise RuntimeError("structured output needs the model's tokenizer, which this engine has not")
            logits = self.grammars.apply(logits, reqs, guided)

        random_rows = [row for row, s in enumerate(reqs) if not s.sampling_params.greedy]
        every = len(random_rows) == len(reqs)
        # argmax's first-of-ties, in 0.4x its time on the CPU (32 x 49,152); not needed where every row samples
        tokens = None if every else logits.max(dim=-1).indices
        if random_rows:
            params = [reqs[r].sampling_params for r in random_rows]
            rows = None if every else to_device(random_rows, torch.long, dev)
            x = logits if every else logits.index_select(0, rows)
            keys = [self._key(reqs[row]) for row in random_rows]
            if native(x):  # temperature, filters and race in one call
                chosen = race_native(x, keys, [p.temperature for p in params], [p.top_k for p in params],
                                     [p.top_p for p in params], [p.min_p for p in params])
            else:
                chosen = race_torch(_filtered(x, params), keys)
            tokens = chosen if every else tokens.index_copy_(0, rows, chosen)

        logprob_tensors = []
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens.index_select(0, want).unsqueeze(1)).squeeze(1)
            top_vals, top_ids = raw_logprobs.topk(max(reqs[r].sampling_params.logprobs for r in want_logprobs))
            logprob_tensors = [chosen, top_vals, top_ids]
        return SampledTokens(tokens, reqs, want_logprobs, logprob_tensors)


def _filtered(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Rows of logits at their temperatures, the tokens top-k, top-p and min-p drop set to -inf."""
    dev = x.device
    if any(p.temperature != 1.0 for p in params):
        x = x / to_device([p.temperature for p in params], x.dtype, dev).unsqueeze(1)
    cut = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
    if len(cut) == len(params):
        x = _top_k_top_p(x, [p.top_k for p in params], [p.top_p for p in params])
    elif cut:  # the other rows keep every token (_top_k_top_p keeps a row's candidates at most)
        rows = to_device(cut, torch.long, dev)
        x = x.index_copy(0, rows, _top_k_top_p(x.index_select(0, rows), [params[i].top_k for i in cut],
                                                [params[i].top_p for i in cut]))
    if any(p.min_p > 0 for p in params):  # p < min_p max(p), in logits: x < max(x) + log(min_p)
        floor = to_device([p.min_p for p in params], x.dtype, dev).log().unsqueeze(1)
        x = x.masked_fill(x < x.max(dim=-1, keepdim=True).values + floor, float("-inf"))
    return x


def _add_logit_bias(logits: torch.Tensor, reqs: list[ScheduledRequest], rows: list[int]) -> torch.Tensor:
    """Each row's (token id, bias) pairs added in place, in one scatter for the batch."""
    at = [(row, t, b) for row in rows for t, b in reqs[row].sampling_params.logit_bias]
    index = to_device([row * logits.shape[1] + t for row, t, _ in at], torch.long, logits.device)
    logits.view(-1).index_add_(0, index, to_device([b for _, _, b in at], logits.dtype, logits.device))
    return logits


# Top-k and top-p look at a row's TOP_CANDIDATES most likely tokens first (``topk``, not a sort of the whole row), a
# row whose nucleus reaches past them at 8 times as many, and so on (2026-11-29, 8 rows of 49,152: a sort 12.3 ms,
# topk of 1,024 1.6 ms, of 8,192 3.0 ms; the default model's 0.9-0.95 nuclei held 1-1,840 tokens on six prompts).
TOP_CANDIDATES = 1024


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float],
                 candidates: int = TOP_CANDIDATES) -> torch.Tensor:
    """Logits outside each row's top-k, and past its top-p nucleus (of the distribution renormalized to the
    top-k, where there is one), set to -inf; the most likely token always kept."""
    vocab = x.shape[1]
    width = min(vocab, max(t if t > 0 else candidates for t in top_k))
    vals, order = x.topk(width, dim=-1)  # descending
    ranks = torch.arange(width, device=x.device).unsqueeze(0)
    k = to_device([t if t > 0 else vocab for t in top_k], torch.long, x.device).unsqueeze(1)
    drop = ranks >= k
    kept = vals.masked_fill(drop, float("-inf"))
    has_k = k < vocab
    # the probabilities top-p reads: renormalized over the kept top-k, else over the whole row
    norm = torch.where(has_k, kept.logsumexp(dim=-1, keepdim=True), x.logsumexp(dim=-1, keepdim=True))
    probs = (kept - norm).exp()
    p = to_device(top_p, x.dtype, x.device).unsqueeze(1)
    drop |= ((probs.cumsum(dim=-1) - probs) >= p) & (p < 1.0)  # (top_p 1: a rounding past 1 drops nothing)
    drop[:, 0] = False  # always keep the most likely token
    out = torch.full_like(x, float("-inf")).scatter_(1, order, vals.masked_fill(drop, float("-inf")))
    short = (~has_k & (p < 1.0) & (probs.sum(dim=-1, keepdim=True) < p)).squeeze(1)  # nucleus past the candidates
    if width < vocab and bool(short.any()):
        rows = short.nonzero().squeeze(1).tolist()
        out[rows] = _top_k_top_p(x[rows], [top_k[i] for i in rows], [top_p[i] for i in rows], candidates * 8)
    return out
