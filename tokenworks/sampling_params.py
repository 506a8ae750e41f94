"""Per-request sampling and stopping settings (the OpenAI knobs, checked once)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    ``temperature`` below ``GREEDY_BELOW`` (0 included) means greedy. ``seed`` makes a request's sampling
    reproducible whatever else shares its batch. Stop strings are removed
    from the returned text; stop token ids and EOS end the request with
    ``finish_reason == "stop"``, ``max_tokens`` with ``"length"``.
    ``logit_bias``: (token id, bias) pairs added to the logits before every
    choice, greedy or sampled (OpenAI's: -100 bans a token, 100 all but
    forces it); logprobs stay those of the model's own logits. ``grammar``:
    an llguidance grammar the output must follow (structured output; make
    one with ``tokenworks.structured_output.grammar_for``, e.g. from a
    JSON schema).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return, 0 = only the sampled token
    # the same for each prompt token after the first (the model's view of the prompt: scoring, perplexity);
    # such a request's prompt is computed whole, never taken from the prefix cache
    prompt_logprobs: int | None = None
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        _check(all(len(pair) == 2 for pair in bias), "logit_bias must map token ids to biases")
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in bias))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1")
        _check(0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]")
        _check(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)")
        _check(0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]")
        _check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]")
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be in [0, 20]")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(len(self.stop) <= 16, "at most 16 stop strings")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]")
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens")
        _check(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t, _ in self.logit_bias),
               "logit_bias keys must be token ids (integers >= 0)")
        _check(all(isinstance(b, (int, float)) and -100.0 <= b <= 100.0 for _, b in self.logit_bias),
               "logit_bias values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def reads_outputs(self) -> bool:
        """Whether choosing the next token reads the tokens chosen so far (penalties, a grammar)."""
        return self.has_penalties or self.grammar is not None

    @property
    def takes_drafts(self) -> bool:
        """Whether draft tokens may be checked for this request several in one step (speculative decoding): each
        token depends on its position's logits and the position alone (greedy, or a draw keyed by seed and
        position; logit_bias alike; not penalties or a grammar, which read the tokens before it) and nothing is
        asked per token that a draft would change (logprobs, stop strings)."""
        return not self.reads_outputs and not self.stop and self.logprobs is None


# Temperatures under this sample greedily: dividing by them overflows float32 (1 / 1e-40 is inf, and an inf logit
# beats the most likely one), and a temperature of 1e-5 already gives the second token e^-100000 of the first's odds
# at a logit gap of 1.
GREEDY_BELOW = 1e-5
MAX_LOGIT_BIAS = 1024  # tokens one request may bias


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
