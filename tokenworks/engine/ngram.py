"""Draft tokens by prompt lookup: the tokens that followed the latest earlier occurrence of a sequence's last n tokens.

The speculative decoding that needs no draft model (vLLM's and SGLang's "ngram", llama.cpp's lookup decoding):
where the output copies from the prompt or from itself (code edits, quotes, summaries, lists, JSON keys), the
tokens that followed the same n tokens before are a good guess at what comes next; the model checks the guesses in
one step and keeps the ones it would have chosen. No torch here.

``NgramIndex`` indexes a growing token list once, a position at a time: for each n in [min_n, max_n] the position
after the latest earlier occurrence of each n-gram. A lookup tries the longest n first. A step that checks drafts
costs more than a plain one (on the CPU about 1.6-1.9x for 1-3 drafts, docs/engine.md), so while the share of a request's drafts accepted falls under ``BREAK_EVEN`` (a running mean, half of it the last
draft step's) it proposes none for 1, then 2, 4, ... up to ``MAX_BACKOFF`` steps between them, until enough are
accepted again.
"""

from __future__ import annotations

MAX_BACKOFF = 16  # steps at most that a request whose drafts keep failing proposes none
# The share of drafts that must be accepted: a step with 3 drafts costs about two plain ones on the CPU, so it must
# bring one more token than a plain step.
BREAK_EVEN = 1 / 3


class NgramIndex:
    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("need 1 <= min_n <= max_n")
        self.min_n, self.max_n = min_n, max_n
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> the position after its latest occurrence
        self._indexed = 0  # n-grams ending before this position are in _after
        self._gain: float | None = None  # running mean of the share of drafts accepted
        self._misses = 0  # draft steps in a row that left the mean under BREAK_EVEN
        self._skip = 0  # steps left that propose nothing

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix of ``tokens``
        (between max_n and min_n long) seen before; [] when none was seen. ``tokens`` only grows between calls
        (its first ``_indexed`` entries unchanged)."""
        end = len(tokens)
        after = self._after
        for e in range(max(self._indexed, self.min_n), end):  # n-grams ending at e (exclusive), before the suffix
            for n in range(self.min_n, min(self.max_n, e) + 1):
                after[tuple(tokens[e - n:e])] = e
        self._indexed = max(self._indexed, end)
        if k <= 0:
            return []
        if self._skip:
            self._skip -= 1
            return []
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            e = after.get(tuple(tokens[end - n:end]))
            if e is not None:
                return tokens[e:e + k]
        return []

    def checked(self, drafts: int, accepted: int) -> None:
        """After a step that checked ``drafts`` of this index's drafts: how many the model accepted."""
        share = accepted / drafts
        self._gain = share if self._gain is None else (self._gain + share) / 2
        if self._gain >= BREAK_EVEN:
            self._misses = 0
        else:
            self._skip = min(MAX_BACKOFF, 2 ** self._misses)
            self._misses += 1
