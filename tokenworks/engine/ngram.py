"""Draft tokens by prompt lookup: the tokens that followed the latest earlier occurrence of a sequence's last n tokens.

The speculative decoding that needs no draft model (vLLM's and SGLang's "ngram", llama.cpp's lookup decoding):
where the output copies from the prompt or from itself (code edits, quotes, summaries, lists, JSON keys), the
tokens that followed the same n tokens before are a good guess at what comes next; the model checks the guesses in
one step and keeps the ones it would have chosen. No torch here.

``NgramIndex`` indexes a growing token list once, a position at a time: for each n in [min_n, max_n] the position
after the latest earlier occurrence of each n-gram. A lookup tries the longest n first. A step that checks drafts
costs more than a plain one (on the CPU about 1.6-1.9x for 1-3 drafts, docs/engine.md), so after a step whose
drafts were all rejected a request proposes none for 1, then 2, 4, ... up to ``MAX_BACKOFF`` steps, until drafts
are accepted again.
"""

from __future__ import annotations

MAX_BACKOFF = 16  # steps at most that a request whose drafts keep failing proposes none


class NgramIndex:
    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError("need 1 <= min_n <= max_n")
        self.min_n, self.max_n = min_n, max_n
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> the position after its latest occurrence
        self._indexed = 0  # n-grams ending before this position are in _after
        self._misses = 0  # steps in a row whose drafts were all rejected
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

    def checked(self, accepted: int) -> None:
        """After a step that checked this index's drafts: how many the model accepted."""
        if accepted:
            self._misses = 0
        else:
            self._skip = min(MAX_BACKOFF, 2 ** self._misses)
            self._misses += 1
