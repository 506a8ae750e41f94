"""Workloads: what each benchmark request asks for, and (for traces) when.

Every workload is a list of ``BenchRequest``; synthetic ones are seeded.
Prompts are built from common one-token English words, so a prompt of N
words is close to N tokens for byte-level BPE tokenizers; the server's own
usage counts are what the report uses.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from dataclasses import dataclass
from datetime import datetime

WORDS = ("the of and to in is it that for on was with as at by be this are from or an have not but all "
         "they one had were you can there which their more when time will up out so if about what some other "
         "into them these two may then do first any my now such like our over man me even most made after also "
         "did many before must through back years where much your way well down should because each just those "
         "people how too little state good very make world still own see men work long get here between both life "
         "being under never day same another know while last might us great old year off come since against go "
         "came right used take three").split()


@dataclass
class BenchRequest:
    prompt: str
    max_tokens: int
    arrival: float | None = None  # seconds from the start (traces); None: the load generator decides
    input_tokens: int = 0  # what the workload meant to send (estimate)
    # workloads that say which prompts share a prefix (Mooncake's hash_ids; shared-prefix, multi-turn): the ids of
    # the prompt's whole blocks of ``block_tokens`` tokens, equal ids after equal ids meaning equal text; the
    # simulator's prefix caching reads them
    prefix_blocks: tuple[int, ...] = ()
    block_tokens: int = 0


class WorkloadError(ValueError):
    pass


# Prompts' token counts are estimates for a byte-level BPE that splits digits (SmolLM2's, measured): a word of
# WORDS is one token, a salt such as "s12t3" one per run of letters and one per digit, the multi-turn framing
# "\nUser:" three and "\nAssistant:" four
USER_TOKENS, ASSISTANT_TOKENS = 3, 4
# the prompt blocks the synthetic workloads state for the simulator's prefix caching: the engine's default
# KV block size (EngineConfig.block_size), in tokens as estimated
BLOCK_TOKENS = 16


def _words(rng: random.Random, n: int, salt: str = "") -> str:
    head = f"{salt} " if salt else ""
    return head + " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def _salt_tokens(salt: str) -> int:
    return len(re.findall(r"[a-z]+|[0-9]", salt))


class _BlockIds:
    """Fresh block ids for the prompts a synthetic workload builds (``BenchRequest.prefix_blocks``)."""

    def __init__(self) -> None:
        self._next = 0

    def extend(self, ids: list[int], tokens: int) -> tuple[int, ...]:
        """``ids`` (shared with other prompts, in place) grown with fresh ids to the whole blocks of ``tokens``."""
        while len(ids) < tokens // BLOCK_TOKENS:
            ids.append(self._next)
            self._next += 1
        return tuple(ids[: tokens // BLOCK_TOKENS])


def sample_length(spec: str, rng: random.Random) -> int:
    """N (fixed:N) | fixed:N | uniform:A:B | normal:MU:SIGMA | sharegpt:MEDIAN (a log-normal long tail)."""
    if spec.strip().isdigit():
        return max(1, int(spec))
    kind, _, rest = spec.partition(":")
    try:
        args = [float(x) for x in rest.split(":")] if rest else []
        if kind == "fixed":
            (n,) = args
            return max(1, int(n))
        if kind == "uniform":
            a, b = args
            return rng.randint(int(a), int(b))
        if kind == "normal":
            mu, sigma = args
            return max(1, int(rng.gauss(mu, sigma)))
        if kind == "sharegpt":
            (median,) = args
            return max(1, min(int(rng.lognormvariate(math.log(median), 1.0)), int(median * 20)))
    except ValueError as e:
        raise WorkloadError(f"bad length distribution {spec!r}: {e}") from None
    raise WorkloadError(f"unknown length distribution {spec!r}; use N (fixed:N), uniform:A:B, normal:MU:SIGMA or "
                        "sharegpt:MEDIAN")


def sample_lengths(spec: str, n: int, seed: int):
    """``n`` lengths of the same distributions as ``sample_length`` drawn at once with numpy (for simulations
    of millions of requests; a different random stream than ``sample_length``'s)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    probe = random.Random(0)
    sample_length(spec, probe)  # the spec's errors, with the same messages
    kind, _, rest = spec.partition(":")
    args = [float(x) for x in rest.split(":")]
    if kind == "fixed":
        out = np.full(n, int(args[0]))
    elif kind == "uniform":
        out = rng.integers(int(args[0]), int(args[1]) + 1, n)
    elif kind == "normal":
        out = rng.normal(args[0], args[1], n).astype(np.int64)
    else:
        out = np.minimum(rng.lognormal(math.log(args[0]), 1.0, n).astype(np.int64), int(args[0] * 20))
    return np.maximum(1, out).astype(np.int64)


def _system_prompts(rng: random.Random, num_prefixes: int, prefix_len: int):
    """``num_prefixes`` system prompts of ``prefix_len`` words: their texts, their token counts, the ids of their
    whole blocks, and the block ids' source for what follows them."""
    blocks = _BlockIds()
    texts = [_words(rng, prefix_len, salt=f"system{k}") for k in range(num_prefixes)]
    heads = [prefix_len + _salt_tokens(f"system{k}") for k in range(num_prefixes)]
    return texts, heads, [list(blocks.extend([], t)) for t in heads], blocks


def synthetic(n: int, input_len: str, output_len: str, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = sample_length(input_len, rng)
        out.append(BenchRequest(_words(rng, k, salt=f"q{i}"), sample_length(output_len, rng),
                                input_tokens=k + _salt_tokens(f"q{i}")))
    return out


def shared_prefix(n: int, num_prefixes: int, prefix_len: int, suffix_len: str, output_len: str, seed: int) -> list[BenchRequest]:
    """Prompts that each start with one of ``num_prefixes`` system prompts of ``prefix_len`` words."""
    rng = random.Random(seed)
    prefixes, heads, head_ids, blocks = _system_prompts(rng, num_prefixes, prefix_len)
    out = []
    for i in range(n):
        k = sample_length(suffix_len, rng)
        j = rng.randrange(num_prefixes)
        tokens = heads[j] + _salt_tokens(f"q{i}") + k
        out.append(BenchRequest(prefixes[j] + " " + _words(rng, k, salt=f"q{i}"), sample_length(output_len, rng),
                                input_tokens=tokens, prefix_blocks=blocks.extend(list(head_ids[j]), tokens),
                                block_tokens=BLOCK_TOKENS))
    return out


def multi_turn(n: int, turns: int, session_rate: float, think_time: float, num_prefixes: int, prefix_len: int,
               user_len: str, output_len: str, seed: int) -> list[BenchRequest]:
    """Chat sessions whose every turn resends the whole conversation so far: one of ``num_prefixes`` system
    prompts, then user and assistant messages (the assistant's as the workload wrote them, ``output_len`` long),
    so each turn's prompt extends the previous one's. Sessions start as a Poisson process at ``session_rate``
    per second; a session's turns come ``think_time`` seconds apart. ``n`` requests in all, in arrival order."""
    if turns < 1 or session_rate <= 0 or think_time < 0:
        raise WorkloadError("multi-turn needs --turns >= 1, --session-rate > 0 and --think-time >= 0")
    rng = random.Random(seed)
    systems, heads, head_ids, blocks = _system_prompts(rng, num_prefixes, prefix_len)
    out: list[BenchRequest] = []
    start, session = 0.0, 0
    while len(out) < n:
        j = rng.randrange(num_prefixes)
        history, tokens, ids = systems[j], heads[j], list(head_ids[j])  # ids: the conversation's blocks so far
        for turn in range(turns):
            k = sample_length(user_len, rng)
            salt = f"s{session}t{turn}"
            history += f"\nUser: {_words(rng, k, salt=salt)}\nAssistant:"
            tokens += USER_TOKENS + _salt_tokens(salt) + k + ASSISTANT_TOKENS
            answer = sample_length(output_len, rng)
            out.append(BenchRequest(history, answer, arrival=start + turn * think_time, input_tokens=tokens,
                                    prefix_blocks=blocks.extend(ids, tokens), block_tokens=BLOCK_TOKENS))
            salt = f"a{session}t{turn}"
            history += " " + _words(rng, answer, salt=salt)
            tokens += _salt_tokens(salt) + answer
        session += 1
        start += rng.expovariate(session_rate)
    out.sort(key=lambda r: r.arrival)
    return out[:n]


def mixed(n: int, seed: int, long_fraction: float = 0.15, short_input: str = "uniform:20:120",
          long_input: str = "uniform:800:1400", output_len: str = "uniform:32:96") -> list[BenchRequest]:
    """Mostly short chats; some very long prompts that arrive while the others decode."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        spec = long_input if rng.random() < long_fraction else short_input
        k = sample_length(spec, rng)
        out.append(BenchRequest(_words(rng, k, salt=f"q{i}"), sample_length(output_len, rng),
                                input_tokens=k + _salt_tokens(f"q{i}")))
    return out


def sharegpt_file(path: str, n: int | None, seed: int, max_output: int = 1024) -> list[BenchRequest]:
    """ShareGPT JSON: a list of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{path}: not valid JSON ({e})") from None
    out = []
    for k, item in enumerate(data):
        conv = item.get("conversations") if isinstance(item, dict) else None
        if not conv or len(conv) < 2 or not isinstance(conv[0], dict):
            continue
        prompt, answer = conv[0].get("value"), conv[1].get("value")
        if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt:
            continue
        out_len = min(max_output, max(1, len(answer) // 4))  # about 4 characters per token
        out.append(BenchRequest(prompt, out_len, input_tokens=max(1, len(prompt) // 4)))
    if not out:
        raise WorkloadError(f"{path}: no usable conversations")
    rng = random.Random(seed)
    rng.shuffle(out)
    return out[:n] if n else out


@dataclass
class TraceProblem:
    line: int
    message: str


def shared_blocks(requests: list[BenchRequest]) -> tuple[list[tuple[int, ...]], int] | None:
    """The requests' shared prompt blocks and the tokens a block, for the simulator's prefix caching
    (``SimWorkload.prefix_blocks``); None where the workload states none."""
    block_tokens = max((r.block_tokens for r in requests), default=0)
    return ([r.prefix_blocks for r in requests], block_tokens) if block_tokens else None


def _trace_prompt(length: int, hash_ids: list[int], block_tokens: int, salt: str) -> str:
    """Blocks with equal hash ids get equal text, so the trace's prefix sharing is kept."""
    parts = []
    for h in hash_ids:
        parts.append(_words(random.Random(h), block_tokens, salt=f"b{h}"))
    have = len(hash_ids) * block_tokens
    if length > have:
        parts.append(_words(random.Random(salt), length - have, salt=salt))
    return " ".join(parts)


def mooncake_jsonl(path: str, n: int | None = None, time_scale: float = 1.0, block_tokens: int = 512,
                   length_scale: float = 1.0) -> tuple[list[BenchRequest], list[TraceProblem]]:
    """Mooncake trace: one JSON object per line with timestamp (ms), input_length, output_length, hash_ids."""
    out, problems = [], []
    t0 = None
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ts = float(rec["timestamp"]) / 1000.0
                inp = int(int(rec["input_length"]) * length_scale)
                outp = max(1, int(int(rec["output_length"]) * length_scale))
                hashes = [int(h) for h in rec.get("hash_ids", [])]
            except (ValueError, KeyError, TypeError) as e:
                problems.append(TraceProblem(lineno, f"{type(e).__name__}: {e}"))
                continue
            t0 = ts if t0 is None else t0
            bt = max(1, int(block_tokens * length_scale))
            keep = [h for h in hashes][: max(0, inp // bt)]
            out.append(BenchRequest(_trace_prompt(inp, keep, bt, f"m{lineno}"), outp, (ts - t0) * time_scale, inp,
                                    prefix_blocks=tuple(keep), block_tokens=bt))
            if n and len(out) >= n:
                break
    return out, problems


def azure_csv(path: str, n: int | None = None, time_scale: float = 1.0, length_scale: float = 1.0
              ) -> tuple[list[BenchRequest], list[TraceProblem]]:
    """Azure LLM inference trace: CSV with TIMESTAMP, ContextTokens, GeneratedTokens."""
    out, problems = [], []
    t0 = None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or [])
        if missing:
            raise WorkloadError(f"{path}: missing columns {sorted(missing)}")
        for lineno, row in enumerate(reader, 2):
            try:
                ts = _parse_time(row["TIMESTAMP"])
                inp = max(1, int(int(row["ContextTokens"]) * length_scale))
                outp = max(1, int(int(row["GeneratedTokens"]) * length_scale))
            except (ValueError, TypeError) as e:
                problems.append(TraceProblem(lineno, f"{type(e).__name__}: {e}"))
                continue
            t0 = ts if t0 is None else t0
            out.append(BenchRequest(_words(random.Random(lineno), inp, salt=f"a{lineno}"), outp, (ts - t0) * time_scale, inp))
            if n and len(out) >= n:
                break
    return out, problems


def _parse_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    # "2023-11-16 18:15:46.6805900" has 7 fractional digits; Python takes at most 6.
    if "." in text:
        head, frac = text.rsplit(".", 1)
        text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text).timestamp()
