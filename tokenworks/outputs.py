"""What the engine hands back for each request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, token text, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""  # all output text so far
    token_ids: list[int] = field(default_factory=list)  # all output token ids so far
    new_text: str = ""  # text added by the latest step (streaming)
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    logprobs: list[Logprob] | None = None
    # SamplingParams.prompt_logprobs: one per prompt token, None for the first (nothing before it to score); given
    # once, with the request's first output token
    prompt_logprobs: list[Logprob | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Disaggregated prefill: the first token is out and the prompt's KV blocks are held for a decode worker.
    prefilled: bool = False
    kv_block_ids: list[int] | None = None
