"""The two plain objects that cross the policy/mechanism line each step.

``SchedulerOutput``: filled by the scheduler, read by the model runner.
``ModelRunnerOutput``: filled by the model runner, read by the scheduler.
Neither holds a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenworks.sampling_params import SamplingParams

# A decode input whose token was sampled by the step still in flight (overlapped scheduling): the runner
# takes it from that step's sampled tokens on the device.
PLACEHOLDER = -1


@dataclass
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # tokens whose KV is computed this step (a prefill chunk, or 1 for decode; PLACEHOLDER)
    start_position: int  # position of token_ids[0] == num_computed_tokens before the step
    block_ids: list[int]  # the request's whole block table, covering start_position + len(token_ids)
    sample: bool  # True when this chunk reaches the last known token: sample the next one
    sampling_params: SamplingParams
    prompt_token_ids: list[int]  # shared with the request, read-only here (penalties)
    output_token_ids: list[int]  # shared with the request, read-only here (penalties)
    num_draft_tokens: int = 0  # the last this many of token_ids are draft tokens to check (speculative decoding)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens attended to by the last query of this chunk."""
        return self.start_position + len(self.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests that ended (finished, aborted) since the last step: the runner drops their state.
    finished_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: set[str] = field(default_factory=set)
    # Overlapped scheduling: a request that needed room could only get it by preempting one whose token is
    # still in flight; the engine takes the step in flight back before scheduling again.
    stalled: bool = False

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprobs:
    logprob: float  # of the sampled token
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)  # only requests with sample=True
    # requests with draft tokens: the model's own choice (the sampler's) at each draft's position, in order; the token
    # after the last draft is in sampled_token_ids
    draft_checks: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # only requests that asked
    # requests that asked for prompt logprobs, per prompt chunk of the step: (the position of the first prompt token
    # scored, one entry per scored token); a prompt's first token is never scored, nor the token to be sampled
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
