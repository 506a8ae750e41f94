"""Speculative decoding by prompt lookup (``--num-speculative-tokens``) against plain decoding, the default model,
one request at a time (the single user of `make serve`), greedy or sampled with a seed.

Each task is a chat request of a kind people send: text to repeat, code to edit, a summary, JSON, a free answer.
Engines with K = 0 (the baseline) and each K asked are built in one process and take turns, task by task, over the
rounds; printed per task and K: the median time per output token, the ratio to K = 0 in the same rounds, tokens a
step brought, the share of drafts accepted, and whether the text equals the baseline's (sampled: the same seed).

    python benchmarks/speculative.py [--k 2,3,5] [--rounds 3] [--max-tokens 160] [--temperature 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CODE = '''def parse(line):
    name, value = line.split("=", 1)
    name = name.strip()
    value = value.strip()
    if not name:
        raise ValueError("empty name")
    return name, value
'''

TASKS = {
    "repeat": "Repeat this text exactly: The quick brown fox jumps over the lazy dog. Pack my box with five dozen "
              "liquor jugs. How vexingly quick daft zebras jump. Sphinx of black quartz, judge my vow.",
    "code edit": "Rename the function parse to parse_setting in this code and give the whole code back:\n" + CODE,
    "summary": "Summarize: The city council met on Tuesday to discuss the new park. The park will have a playground, "
               "a pond and a garden. Construction starts in May and ends in October. The budget is two million "
               "dollars, paid by the state.",
    "json": "List three fruits as a JSON array of objects with keys name, color and price.",
    "free answer": "Tell me about the history of lighthouses.",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", default="3", help="draft tokens a step checks, comma-separated (each against K = 0)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled, seeded")
    ap.add_argument("--model", default=None, help="model path (default: the built-in default model)")
    ns = ap.parse_args()
    import torch

    from tokenworks import LLM, SamplingParams

    ks = [0] + [int(k) for k in ns.k.split(",")]
    engines = {k: LLM(model=ns.model, num_speculative_tokens=k) for k in ks}
    params = SamplingParams(temperature=ns.temperature, seed=1, max_tokens=ns.max_tokens)
    how = f"temperature {ns.temperature}, seeded" if ns.temperature else "greedy"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {how}, up to {ns.max_tokens} tokens, "
          f"one request at a time; K = 0 is plain decoding", flush=True)
    per_token: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    seen: dict[tuple[str, int], tuple] = {}
    for r in range(-1, ns.rounds):  # round -1 warms each engine on each task, untimed
        for task, text in TASKS.items():
            chat = [{"role": "user", "content": text}]
            times = {}
            for k, llm in engines.items():
                sched = llm.engine.scheduler
                drafts, accepted, steps = sched.num_draft_tokens, sched.num_accepted_tokens, 0
                t = time.perf_counter()
                out = llm.chat(chat, params)[0]
                times[k] = (time.perf_counter() - t) / len(out.token_ids)
                seen[(task, k)] = (out.token_ids, sched.num_draft_tokens - drafts, sched.num_accepted_tokens - accepted)
            if r >= 0:
                for k in ks:
                    per_token.setdefault((task, k), []).append(times[k] * 1e3)
                    ratios.setdefault((task, k), []).append(times[k] / times[0])
        if r >= 0:
            print(f"round {r + 1}/{ns.rounds} done", flush=True)

    print(f"\n{'task':12s} {'K':>2s} {'tokens':>6s} {'ms/token':>9s} {'vs K=0':>7s}  {'rounds':22s} "
          f"{'tok/step':>8s} {'accepted':>8s}  text")
    summary: dict[int, list[float]] = {}
    for task in TASKS:
        base_tokens = seen[(task, 0)][0]
        for k in ks:
            tokens, drafts, accepted = seen[(task, k)]
            ratio = statistics.median(ratios[(task, k)])
            summary.setdefault(k, []).append(ratio)
            steps = len(tokens) - accepted  # each step one token of the model's own, plus its accepted drafts
            rounds = ", ".join(f"{x:.2f}" for x in ratios[(task, k)])
            print(f"{task:12s} {k:2d} {len(tokens):6d} {statistics.median(per_token[(task, k)]):9.2f} "
                  f"{ratio:6.2f}x  [{rounds:20s}] {len(tokens) / max(1, steps):8.2f} "
                  f"{(f'{accepted / drafts:.0%}' if drafts else '-'):>8s}  "
                  f"{'same' if tokens == base_tokens else 'DIFFERS'}")
    for k in ks[1:]:
        print(f"K={k}: geometric mean of the tasks' ratios to K=0: "
              f"{statistics.geometric_mean(summary[k]):.2f}x (per task {', '.join(f'{x:.2f}' for x in summary[k])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
