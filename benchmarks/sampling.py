"""What choosing tokens costs beside the model: sampling at random, a grammar, logit_bias, against greedy.

Measured in the same run on the default model (or --model):
  - the sampler alone on one step's logits (--rows rows of the vocabulary): greedy, sampled and with top_p 0.95 as
    the CPU runs them now (the race over counter-based draws, model/race.py; temperature, filters and race in
    one native call where the kernels are built), the same two in PyTorch (what CUDA and CPUs without the kernels
    run), and the baseline the draws replaced (a torch.Generator per request, one torch.rand a row: mt19937, 0.1
    ms a row of 49,152 on a 2-core Zen 5, 2026-11-29);
  - whole decode steps (LLM.generate, --tokens tokens, ignore_eos) at each of --streams: greedy, sampled at
    temperature 1, sampled under a JSON schema (structured output), with a logit_bias of 20 tokens, with top_p
    0.95, with top_k 40.
Rounds alternate the ways; medians are printed with each way's ratio to greedy in the same round.

    python benchmarks/sampling.py [--streams 1,8] [--tokens 64] [--rounds 3] [--rows 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenworks import LLM, SamplingParams
from tokenworks.engine.scheduler_output import ScheduledRequest
from tokenworks.model import cpu_native
from tokenworks.model.race import race_torch, row_key
from tokenworks.model.sampler import Sampler, _filtered
from tokenworks.structured_output import grammar_for

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "story": {"type": "string"}},
          "required": ["name", "story"]}
PROMPT = [{"role": "user", "content": "Tell a long story about a harbour town, as JSON with a name and a story."}]


def sampler_ms(vocab: int, rows: int, reps: int) -> dict[str, float]:
    """ms per sample() of `rows` rows of N(0, 3^2) logits (a 0.95 nucleus of some 4,000 tokens): greedy, sampled
    and top_p 0.95 as the CPU runs them now (native where built), the same in PyTorch (CUDA's path), and the
    generators' baseline."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3

    def reqs(**params) -> list[ScheduledRequest]:
        return [ScheduledRequest(f"r{i}", [1], 8, [0], True, SamplingParams(seed=i, **params), [1] * 8, [])
                for i in range(rows)]

    def generators_baseline() -> torch.Tensor:  # the race as drawn until 2026-11-29: a generator per request
        score = torch.empty(rows, vocab)
        for i in range(rows):
            torch.rand(vocab, generator=gens[i], out=score[i])
        return torch.sub(logits, score.log_().neg_().log_(), out=score).argmax(dim=-1)

    sampler, greedy, sampled, nucleus = Sampler("cpu"), reqs(temperature=0.0), reqs(), reqs(top_p=0.95)
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    keys = [row_key(i, 8) for i in range(rows)]
    ways = {"greedy": lambda: sampler.sample(logits, greedy).result(),
            "sampled": lambda: sampler.sample(logits, sampled).result(),
            "sampled, top_p 0.95": lambda: sampler.sample(logits, nucleus).result(),
            "sampled in PyTorch": lambda: race_torch(logits, keys),
            "sampled, top_p 0.95 in PyTorch": lambda: race_torch(_filtered(logits, [p.sampling_params for p in nucleus]),
                                                                 keys),
            "sampled, generators (before)": generators_baseline}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(3):
        for name, f in ways.items():
            f()
            t = time.perf_counter()
            for _ in range(reps):
                f()
            times[name].append((time.perf_counter() - t) / reps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def step_ms(llm: LLM, streams: int, tokens: int, rounds: int) -> dict[str, list[float]]:
    bias = {t: 2.0 for t in range(1000, 1020)}
    ways = {"greedy": SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True),
            "sampled T=1": SamplingParams(temperature=1.0, seed=1, max_tokens=tokens, ignore_eos=True),
            "sampled, JSON schema": SamplingParams(temperature=1.0, seed=1, max_tokens=tokens, ignore_eos=True,
                                                   grammar=grammar_for(json_schema=SCHEMA)),
            "sampled, logit_bias x20": SamplingParams(temperature=1.0, seed=1, max_tokens=tokens, ignore_eos=True,
                                                      logit_bias=bias),
            "sampled, top_p 0.95": SamplingParams(temperature=1.0, seed=1, max_tokens=tokens, ignore_eos=True,
                                                  top_p=0.95),
            "sampled, top_k 40": SamplingParams(temperature=1.0, seed=1, max_tokens=tokens, ignore_eos=True,
                                                top_k=40)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for name, p in ways.items():  # warm: the grammar's tokenizer view is built at its first request
        llm.chat([PROMPT] * streams, [p] * streams)
    for _ in range(rounds):
        for name, p in ways.items():
            t = time.perf_counter()
            llm.chat([PROMPT] * streams, [p] * streams)
            times[name].append((time.perf_counter() - t) / tokens * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the built-in default model)")
    ap.add_argument("--streams", default="1,8", help="concurrent requests per run (default: 1,8)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request (default: 64)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds (default: 3)")
    ap.add_argument("--rows", type=int, default=8, help="rows of the sampler-alone case (default: 8)")
    args = ap.parse_args()

    llm = LLM(**({"model": args.model} if args.model else {}))
    vocab = llm.engine.vocab_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocabulary {vocab}")
    alone = sampler_ms(vocab, args.rows, 50)
    print(f"\nthe sampler alone, {args.rows} rows, ms per step (medians of 3; "
          f"native kernels: {'yes' if cpu_native.library() else 'no, ' + cpu_native.unavailable_reason()}):")
    for name, ms in alone.items():
        print(f"  {name:34s} {ms:7.3f}  ({ms / alone['greedy']:.2f}x greedy)")
    print(f"  sampled now / before: {alone['sampled'] / alone['sampled, generators (before)']:.2f}x")
    print(f"  top_p 0.95 now / in PyTorch: {alone['sampled, top_p 0.95'] / alone['sampled, top_p 0.95 in PyTorch']:.2f}x")
    for streams in (int(s) for s in args.streams.split(",")):
        times = step_ms(llm, streams, args.tokens, args.rounds)
        print(f"\n{streams} stream(s), {args.tokens} tokens each, ms per step (median; ratio to greedy, median of "
              f"the rounds' ratios):")
        for name, ts in times.items():
            ratio = statistics.median(t / g for t, g in zip(ts, times["greedy"]))
            print(f"  {name:34s} {statistics.median(ts):7.2f}  ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
