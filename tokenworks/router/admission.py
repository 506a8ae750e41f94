"""Admission: predict a new request's wait for its first token, and refuse it (429) when that is too long.

The prediction uses the placement the router would make (router/policy.py):
the worker that would prefill it, what is queued there for a first token, and
that worker's measured rates, in two ways, taking the longer: prompt tokens
(queued + this request's uncached ones) over the prefill token rate, and
requests (queued + this one) over the first-token rate; the second sees the
wait for a free slot when an aggregated worker's batch is full and prompts are
short. Both rates are ``BacklogRate``s: work completed per second of time the
worker had such work queued, so they reflect its speed under load, neither the
arrival rate nor the batching of several first tokens into one step.
"""

from __future__ import annotations

import math

# Before a worker's rates are measured, how many requests may wait on it for a first token: a burst at start-up
# would otherwise all be admitted on a guess (measured: 40/s into a cold worker, the last admitted waited 13 s
# against a 5 s limit). The first first token, usually within a second, brings a measured rate.
COLD_QUEUE = 4
# What a request refused by COLD_QUEUE is told to wait (Retry-After): the first token is about that far away, and
# with it a measured rate (a refusal's usual advice, the wait past the limit, is unbounded before that).
COLD_RETRY_AFTER = 1.0


class BacklogRate:
    """Work done per second of backlog, exponentially weighted over about ``tau`` seconds of backlog."""

    def __init__(self, tau: float = 10.0) -> None:
        self.tau = tau
        self.work = 0.0
        self.busy = 0.0
        self.pending = 0
        self.mark: float | None = None  # start of the backlog interval not yet counted
        self.since: float | None = None  # when the current backlog began

    @property
    def rate(self) -> float:
        """Work per second; 0 until something completed."""
        return self.work / self.busy if self.busy > 0 and self.work > 0 else 0.0

    def _close(self, now: float, work: float) -> None:
        if self.mark is not None:
            dt = max(0.0, now - self.mark)
            decay = math.exp(-dt / self.tau)
            self.busy = self.busy * decay + dt
            self.work = self.work * decay + work
            self.mark = now

    def started(self, now: float) -> None:
        if self.pending == 0:
            self.mark = self.since = now
        self.pending += 1

    def done(self, now: float, work: float) -> None:
        """One queued item finished with ``work`` units (its prefilled tokens)."""
        self._close(now, work)
        self._leave()

    def cancelled(self, now: float) -> None:
        """One queued item left without finishing (its client went away, its worker died)."""
        self._close(now, 0.0)
        self._leave()

    def _leave(self) -> None:
        self.pending = max(0, self.pending - 1)
        if self.pending == 0:
            self.mark = self.since = None

    def backlog_age(self, now: float) -> float:
        """Seconds the current backlog has lasted (0: none)."""
        return 0.0 if self.since is None else now - self.since


class FirstTokenRates:
    """A worker's prefill tokens/s and first tokens/s under backlog (one request queued = one ``started``)."""

    def __init__(self) -> None:
        self.tokens = BacklogRate()
        self.requests = BacklogRate()

    def started(self, now: float) -> None:
        self.tokens.started(now)
        self.requests.started(now)

    def done(self, now: float, tokens: int) -> None:
        self.tokens.done(now, tokens)
        self.requests.done(now, 1)

    def cancelled(self, now: float) -> None:
        self.tokens.cancelled(now)
        self.requests.cancelled(now)

    def predicted_wait(self, queued_tokens: int, own_tokens: int, now: float, copies: int = 1) -> float:
        """Seconds until a request of ``own_tokens`` uncached tokens (``copies`` of it: n > 1), behind
        ``queued_tokens`` and the requests already queued, gets its first token. Before any rate is measured:
        the age of the backlog ahead of it (0 when the worker has none), or infinity once ``COLD_QUEUE``
        requests wait there."""
        waits = []
        if self.tokens.rate > 0:
            waits.append((queued_tokens + copies * max(1, own_tokens)) / self.tokens.rate)
        if self.requests.rate > 0:
            waits.append((self.requests.pending + copies) / self.requests.rate)
        if waits:
            return max(waits)
        return self.tokens.backlog_age(now) if self.requests.pending + copies <= COLD_QUEUE else math.inf
