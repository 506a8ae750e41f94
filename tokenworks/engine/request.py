"""A request as the scheduler sees it: token ids, progress and status."""

from __future__ import annotations

import enum
import time

from tokenworks.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    WAITING_FOR_KV = "waiting_for_kv"  # decode side: blocks reserved, KV being pulled from a prefill worker
    PREFILLED = "prefilled"  # prefill side: first token out, blocks held under a lease for the decode side
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


class Request:
    """One unit of work. ``num_computed_tokens`` counts tokens whose KV is in the pool."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        prefill_only: bool = False,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = () if sampling_params.ignore_eos else tuple(eos_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)  # prompt + output, appended in place
        self.num_computed_tokens = 0  # advanced when a step is scheduled, so it counts the step in flight
        self.num_pending = 0  # tokens sampled by a step whose result is not back yet (0 or 1)
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.status = RequestStatus.WAITING
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.num_preemptions = 0
        self.block_hashes: list[int] = []  # hash of each full block of all_token_ids, filled lazily
        self.prefill_only = prefill_only  # stop after the first token and hold the KV (disaggregated prefill)
        self.lease_deadline = 0.0  # monotonic time at which held blocks are freed (PREFILLED)
        self.abort_requested = False  # aborted while its KV was in flight (WAITING_FOR_KV)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """Decide, after a token was appended, whether the request is done."""
        params = self.sampling_params
        if self.num_output_tokens >= params.min_tokens and self.output_token_ids:
            last = self.output_token_ids[-1]
            if last in self.eos_token_ids or last in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        if self.prefill_only:
            return RequestStatus.PREFILLED
        return None

    def ends_with_pending(self, max_model_len: int) -> bool:
        """Whether the token still pending ends this request whatever its value (a length limit, or the
        first token of a prefill-only request): then no step is scheduled after it."""
        return (self.prefill_only or self.num_output_tokens + self.num_pending >= self.sampling_params.max_tokens
                or self.num_tokens + self.num_pending >= max_model_len)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, out={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, pending={self.num_pending}, {self.status.name})"
        )
