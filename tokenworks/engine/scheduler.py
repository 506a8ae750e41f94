"""Continuous batching with a per-step token budget, chunked prefill and preemption.

Each step the running requests go first (decodes and unfinished prefill
chunks, oldest first), then waiting requests are admitted while the token
budget, the sequence limit and the KV pool allow. A prompt longer than the
remaining budget is split into chunks over several steps. When the pool
runs out, the most recently admitted running request is preempted: its
blocks are released (they stay in the prefix cache) and it is recomputed
later. Nothing here touches a tensor.

A step's tokens count as computed from the moment it is scheduled, and a
request that samples holds one *pending* token until ``update`` brings it
back. So the next step can be scheduled while one is still in flight (the
engine's overlapped mode): a pending token is a decode input
(``PLACEHOLDER``) the runner takes from the device, a request that the
pending token ends anyway (length, prefill-only) is not scheduled again, and
a request whose token is pending is never preempted (``stalled`` instead).
"""

from __future__ import annotations

import time
from collections import deque

from tokenworks.config import SchedulerConfig
from tokenworks.engine.kv_cache_manager import KVCacheManager
from tokenworks.engine.ngram import NgramIndex
from tokenworks.engine.request import Request, RequestStatus
from tokenworks.engine.scheduler_output import PLACEHOLDER, ModelRunnerOutput, ScheduledRequest, SchedulerOutput


# Speculative decoding: drafts are checked only while at most this many requests run. A draft step adds rows to the
# step, free while a step is bound by reading the weights and costly once it is bound by arithmetic: on the default
# model on 2 CPU cores (benchmarks/speculative.py), K = 3 per-token time 0.83x plain decoding at 2 requests, 0.94x at
# 4, 1.04x at 8.
DRAFT_MAX_RUNNING = 4


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0
        self.held: dict[str, Request] = {}  # PREFILLED requests whose blocks wait for a decode worker
        self.lease_seconds = 30.0
        self.num_expired_leases = 0
        self._ngrams: dict[str, NgramIndex] = {}  # speculative decoding: each drafting request's prompt lookup
        self.num_draft_tokens = 0  # drafts checked, and of them accepted, since start
        self.num_accepted_tokens = 0

    # -- requests in and out ------------------------------------------------------------

    def _check_new(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {request.num_tokens} tokens; the model's context allows at most "
                f"{self.config.max_model_len - 1} so that one token can be generated"
            )

    def add_request(self, request: Request) -> None:
        self._check_new(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request now (also used by the engine for stop strings) and free its blocks."""
        if request.status == RequestStatus.WAITING_FOR_KV:
            # Its blocks are being written by a transfer: free them when the transfer ends.
            request.abort_requested = True
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.PREFILLED:
            self.held.pop(request.request_id, None)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        self._ngrams.pop(request.request_id, None)
        del self.requests[request.request_id]
        self._finished_ids.add(request.request_id)

    # -- disaggregation: prefill side holds, decode side receives --------------------------

    def _hold(self, request: Request) -> None:
        """Keep a prefilled request's blocks for the decode side, until released or the lease ends."""
        self.running.remove(request)
        request.status = RequestStatus.PREFILLED
        request.lease_deadline = time.monotonic() + self.lease_seconds
        self.held[request.request_id] = request

    def release_held(self, request_id: str) -> bool:
        request = self.held.get(request_id)
        if request is None:
            return False
        self.finish(request, RequestStatus.FINISHED_STOPPED)
        return True

    def expire_leases(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        expired = [r for r in self.held.values() if r.lease_deadline <= now]
        for r in expired:
            self.finish(r, RequestStatus.FINISHED_ABORTED)
        self.num_expired_leases += len(expired)
        return [r.request_id for r in expired]

    def reserve_for_transfer(self, request: Request) -> int | None:
        """Decode side: take blocks for a request whose prompt KV comes from elsewhere.

        ``request`` already holds the first token as output. Blocks found in the
        local prefix cache are reused; returns the index of the first block to
        pull (the ones before it are local hits), or None if the pool is full now.
        """
        self._check_new(request)
        computed_blocks, num_cached = self.kv.get_computed_blocks(request)
        if not self.kv.allocate_slots(request, request.num_tokens - num_cached, computed_blocks):
            return None
        request.num_cached_tokens = num_cached
        request.status = RequestStatus.WAITING_FOR_KV
        self.requests[request.request_id] = request
        return len(computed_blocks)

    def admit_transferred(self, request: Request, ok: bool) -> None:
        """Decode side, after the pull: run it (ok), recompute it (pull failed) or drop it (aborted meanwhile)."""
        request.status = RequestStatus.WAITING
        if request.abort_requested:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
            return
        if ok:
            request.num_computed_tokens = request.num_tokens - 1  # the prompt; the first output token is next
            request.status = RequestStatus.RUNNING
            self.kv.cache_blocks(request)
            self.running.append(request)
        else:  # the KV never arrived: recompute prompt and first token here, as after a preemption
            self.kv.free(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            self.waiting.appendleft(request)

    @property
    def num_waiting_for_kv(self) -> int:
        return sum(1 for r in self.requests.values() if r.status == RequestStatus.WAITING_FOR_KV)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------

    def _capped(self, n: int) -> int:
        """At most ``long_prefill_token_threshold`` tokens of one request's prompt a step (0: no cap)."""
        cap = self.config.long_prefill_token_threshold
        return min(n, cap) if cap > 0 else n

    def _chunk(self, request: Request, budget: int) -> int:
        return self._capped(min(request.num_tokens + request.num_pending - request.num_computed_tokens, budget))

    @staticmethod
    def _decoding(request: Request) -> bool:
        """Whether a running request's next step is one token (a decode), not a chunk of its prompt."""
        return request.num_tokens + request.num_pending - request.num_computed_tokens <= 1

    def _drafts(self, request: Request, budget: int) -> list[int]:
        """Draft tokens to check after ``request``'s last token this step (speculative decoding), at most as many
        as its length limits and the step's budget leave room for beside the token that always comes."""
        if (request.num_tokens - request.num_computed_tokens != 1  # not a plain decode (a chunk, or a token pending)
                or request.prefill_only or not request.sampling_params.takes_drafts):
            return []
        k = min(self.config.num_speculative_tokens, budget - 1, self.config.max_model_len - request.num_tokens - 1,
                request.sampling_params.max_tokens - request.num_output_tokens - 1)
        index = self._ngrams.get(request.request_id)
        if index is None:
            index = self._ngrams[request.request_id] = NgramIndex()
        return index.propose(request.all_token_ids, k)

    def _scheduled(self, request: Request, n: int, drafts: list[int] = ()) -> ScheduledRequest:
        """Schedule ``n`` tokens of ``request`` and ``drafts`` after them (slots already allocated) and count
        them as computed."""
        start = request.num_computed_tokens
        token_ids = request.all_token_ids[start : start + n]
        if len(token_ids) < n:  # the pending token: a one-token decode
            token_ids.append(PLACEHOLDER)
        sample = start + n == request.num_tokens + request.num_pending
        token_ids += drafts
        request.num_computed_tokens += n + len(drafts)
        request.num_pending += sample
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=token_ids,
            start_position=start,
            block_ids=self.kv.block_ids(request.request_id),
            sample=sample,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            num_draft_tokens=len(drafts),
        )

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _make_room(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        """Allocate slots for ``n`` tokens of a running request, preempting the most recently admitted ones
        while the pool is short. False: no room this step (``request`` was preempted itself, or the next victim
        has a token in flight and ``out.stalled`` is set)."""
        while not self.kv.allocate_slots(request, n):
            victim = self.running[-1]
            if victim.num_pending:
                out.stalled = True
                return False
            self.running.pop()
            self._preempt(victim)
            out.preempted_request_ids.add(victim.request_id)
            if victim is request:
                return False
        return True

    def schedule(self) -> SchedulerOutput:
        if self.held:
            self.expire_leases()
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.config.max_num_batched_tokens
        # prompt tokens (chunks of a prompt, or of a preempted request's recompute) this step may still take
        cap = self.config.prefill_tokens_while_decoding
        prompt_room = cap if cap and any(self._decoding(r) for r in self.running) else budget

        drafting = self.config.num_speculative_tokens and len(self.running) <= DRAFT_MAX_RUNNING
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.num_pending and request.ends_with_pending(self.config.max_model_len):
                index += 1
                continue
            n = self._chunk(request, budget)
            if not self._decoding(request):
                n = min(n, prompt_room)
                if n == 0:  # no room for its next chunk this step; the decodes after it still go
                    index += 1
                    continue
                prompt_room -= n
            drafts = self._drafts(request, budget) if drafting else []
            if not self._make_room(request, n + len(drafts), out):
                break
            out.scheduled.append(self._scheduled(request, n, drafts))
            budget -= n + len(drafts)
            index += 1

        while self.waiting and budget > 0 and not out.preempted_request_ids and not out.stalled:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            computed_blocks, num_cached = self.kv.get_computed_blocks(request)
            n = self._capped(min(request.num_tokens - num_cached, budget, prompt_room))
            if n <= 0 or not self.kv.allocate_slots(request, n, computed_blocks):
                break
            prompt_room -= n
            self.waiting.popleft()
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._scheduled(request, n))
            budget -= n
        return out

    def update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[tuple[Request, int]]:
        """Advance progress after a step; return (request, new token) for each token it brought, in order (one per
        sampled request, or more where drafts were accepted).

        Requests that hit EOS, a stop token or a length limit are finished here;
        the caller reads ``request.status`` to learn it.
        """
        new_tokens: list[tuple[Request, int]] = []
        for s in sched.scheduled:
            request = self.requests.get(s.request_id)
            if request is None:
                continue  # finished or aborted while the step ran
            request.num_pending -= s.sample
            if request.status != RequestStatus.RUNNING:
                continue
            token = result.sampled_token_ids.get(s.request_id)
            if token is None:
                self.kv.cache_blocks(request)
                continue
            tokens = [token]
            if s.num_draft_tokens:
                tokens = self._accepted(s, result.draft_checks[s.request_id], token)
            status = None
            for token in tokens:
                request.append_output_token(token)
                new_tokens.append((request, token))
                status = request.check_stop(self.config.max_model_len)
                if status is not None:
                    break
            if s.num_draft_tokens:  # the rejected drafts' positions (and any after a stop) are not computed
                request.num_computed_tokens = request.num_tokens - 1
            self.kv.cache_blocks(request)
            if status == RequestStatus.PREFILLED:
                self._hold(request)
            elif status is not None:
                self.finish(request, status)
        return new_tokens

    def _accepted(self, s: ScheduledRequest, checks: list[int], after: int) -> list[int]:
        """A step's tokens for a request that had drafts: the drafts up to the first the model did not choose
        itself (``checks``: its choice at each draft's position), then its choice there, or ``after`` (its choice
        after the last draft) when it chose them all."""
        drafts = s.token_ids[len(s.token_ids) - s.num_draft_tokens:]
        a = 0
        while a < len(drafts) and checks[a] == drafts[a]:
            a += 1
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += a
        index = self._ngrams.get(s.request_id)
        if index is not None:
            index.checked(a)
        return drafts[:a] + [checks[a] if a < len(drafts) else after]
