"""Continuous batching with a per-step token budget, chunked prefill and preemption.

Each step the running requests go first (decodes and unfinished prefill
chunks, oldest first), then waiting requests are admitted while the token
budget, the sequence limit and the KV pool allow. A prompt longer than the
remaining budget is split into chunks over several steps. When the pool
runs out, the most recently admitted running request is preempted: its
blocks are released (they stay in the prefix cache) and it is recomputed
later. Nothing here touches a tensor.
"""

from __future__ import annotations

from collections import deque

from tokenworks.config import SchedulerConfig
from tokenworks.engine.kv_cache_manager import KVCacheManager
from tokenworks.engine.request import Request, RequestStatus
from tokenworks.engine.scheduler_output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0

    # -- requests in and out ------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {request.num_tokens} tokens; the model's context allows at most "
                f"{self.config.max_model_len - 1} so that one token can be generated"
            )
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
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_ids.add(request.request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------

    def _chunk(self, request: Request, budget: int) -> int:
        n = min(request.num_tokens - request.num_computed_tokens, budget)
        if self.config.long_prefill_token_threshold > 0:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _scheduled(self, request: Request, n: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start : start + n],
            start_position=start,
            block_ids=self.kv.block_ids(request.request_id),
            sample=start + n == request.num_tokens,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
        )

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.config.max_num_batched_tokens

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            n = self._chunk(request, budget)
            while not self.kv.allocate_slots(request, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_request_ids.add(victim.request_id)
                if victim is request:
                    break
            else:
                out.scheduled.append(self._scheduled(request, n))
                budget -= n
                index += 1
                continue
            break

        while self.waiting and budget > 0 and not out.preempted_request_ids:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            computed_blocks, num_cached = self.kv.get_computed_blocks(request)
            n = min(request.num_tokens - num_cached, budget)
            if self.config.long_prefill_token_threshold > 0:
                n = min(n, self.config.long_prefill_token_threshold)
            if not self.kv.allocate_slots(request, n, computed_blocks):
                break
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
        """Advance progress after a step; return (request, new token) for each sampled request.

        Requests that hit EOS, a stop token or a length limit are finished here;
        the caller reads ``request.status`` to learn it.
        """
        new_tokens: list[tuple[Request, int]] = []
        for s in sched.scheduled:
            request = self.requests.get(s.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += s.num_tokens
            self.kv.cache_blocks(request)
            token = result.sampled_token_ids.get(s.request_id)
            if token is None:
                continue
            request.append_output_token(token)
            new_tokens.append((request, token))
            status = request.check_stop(self.config.max_model_len)
            if status is not None:
                self.finish(request, status)
        return new_tokens
