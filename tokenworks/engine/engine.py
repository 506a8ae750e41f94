"""The engine loop: schedule, execute, update; plus text, stop strings and logprobs.

``step()`` is the whole loop body. The engine owns a Scheduler (policy) and
a runner (mechanism: ``execute(SchedulerOutput) -> ModelRunnerOutput``, and
for the overlapped mode ``launch(SchedulerOutput)``, whose ``result()``
waits); the tokenizer only turns new tokens into text deltas and finds stop
strings. No torch here.

Overlapped mode (``overlap=True``, the default on a GPU): a step schedules
and launches step n+1, then takes step n's sampled tokens back and updates,
so the host's work of one step runs while the device computes the next.
Step n+1's decode inputs that step n sampled are read on the device. The
cost: a request that stops on a sampled token (EOS, a stop token or string)
has one more token computed and thrown away; a length limit is foreseen and
costs nothing. Steps with repetition, presence or frequency penalties on a
pending token, and the rare step that would have to preempt a request whose
token is in flight, first take the step in flight back (no overlap for them).

Speculative decoding (the scheduler's ``num_speculative_tokens``, not with
overlap): a step may bring a request several tokens, its accepted drafts and
one of the model's own; they go out as one output.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tokenworks.engine.request import Request, RequestStatus
from tokenworks.engine.scheduler import Scheduler
from tokenworks.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tokenworks.outputs import Logprob, RequestOutput
from tokenworks.sampling_params import SamplingParams
from tokenworks.tokenizer import IncrementalDetokenizer, Tokenizer


class LaunchedStep(Protocol):
    def result(self) -> ModelRunnerOutput: ...


class Runner(Protocol):
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...

    def launch(self, sched: SchedulerOutput) -> LaunchedStep: ...


@dataclass
class _Track:
    request: Request
    detok: IncrementalDetokenizer | None
    logprobs: list[Logprob] | None
    prompt_logprobs: list[Logprob | None] | None = None  # filled chunk by chunk; handed out with the first token


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: Runner,
        tokenizer: Tokenizer | None,
        eos_token_ids: tuple[int, ...],
        vocab_size: int | None = None,
        overlap: bool = False,
        check_grammar: Callable[[str], None] | None = None,
        stop_tokenizer: Tokenizer | None = None,
    ) -> None:
        """``check_grammar``: raises ValueError for a grammar (structured output) the runner's sampler cannot
        follow; None where it follows none (no tokenizer at hand). ``stop_tokenizer``: where ``tokenizer`` is None
        (a worker: the router makes the text), the requests with stop strings are still detokenized with it, only
        to end each at the token that completes one (its KV freed then), not when the router's abort arrives a
        step or more later."""
        self.scheduler = scheduler
        self.check_grammar = check_grammar
        self.vocab_size = vocab_size  # prompt token ids are checked against it
        self.runner = runner
        self.tokenizer = tokenizer
        self.stop_tokenizer = stop_tokenizer
        self.eos_token_ids = eos_token_ids
        self._tracks: dict[str, _Track] = {}
        self.overlap = overlap
        # False: each output carries only its step's tokens and logprobs (``token_ids`` and ``text`` left empty),
        # not copies of everything so far; a worker, which sends only what is new, turns this off.
        self.cumulative_outputs = True
        if overlap and scheduler.config.num_speculative_tokens:
            raise ValueError("speculative decoding needs each step's tokens back before the next is scheduled: "
                             "not with overlapped steps")
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
        self._stalled = False

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    def _token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        vocab = self.vocab_size
        if vocab is not None and any(not isinstance(t, int) or not (0 <= t < vocab) for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        return token_ids

    def _check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against the vocabulary, a grammar against this engine."""
        vocab = self.vocab_size
        if vocab is not None and any(t >= vocab for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if params.grammar is not None:
            if self.check_grammar is None:
                raise ValueError("structured output needs the model's tokenizer, which this engine has not")
            self.check_grammar(params.grammar)

    def _track(self, request: Request, params: SamplingParams) -> _Track:
        detok = None
        tokenizer = self.tokenizer or (self.stop_tokenizer if params.stop else None)
        if tokenizer is not None:
            detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, params.stop)
        track = _Track(request, detok, [] if params.logprobs is not None else None,
                       [None] * len(request.prompt_token_ids) if params.prompt_logprobs is not None else None)
        self._tracks[request.request_id] = track
        return track

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, prefill_only: bool = False
    ) -> Request:
        """Queue a request. ``prefill_only``: stop after the first token and hold its KV for a decode worker."""
        self._check_params(params)
        request = Request(request_id, self._token_ids(prompt), params, self.eos_token_ids, prefill_only=prefill_only)
        self.scheduler.add_request(request)
        self._track(request, params)
        return request

    def reserve_transferred(
        self, request_id: str, prompt: list[int], first_token: int, params: SamplingParams
    ) -> tuple[Request, int] | None:
        """Decode side of disaggregation: a request whose prompt KV and first token were made elsewhere.

        Reserves blocks for it and returns (request, index of the first block to
        pull), or None when the pool has no room now (try again later). The
        caller pulls the KV, then calls ``scheduler.admit_transferred``.
        """
        self._check_params(params)
        request = Request(request_id, self._token_ids(prompt), params, self.eos_token_ids)
        request.append_output_token(first_token)
        first_block = self.scheduler.reserve_for_transfer(request)
        if first_block is None:
            return None
        track = self._track(request, params)
        if track.detok is not None:
            track.detok.add_token(first_token)  # already shown to the client by the prefill side
        return request, first_block

    def abort(self, request_id: str) -> bool:
        self._tracks.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        outs = []
        if self._in_flight is not None and (not self.overlap or self._stalled or self._outputs_on_pending()):
            outs = self._take_back()  # (not overlap: ``overlap`` was just turned off)
        if not self.overlap:
            sched = self.scheduler.schedule()
            return outs + self._update(sched, self.runner.execute(sched))
        sched = self.scheduler.schedule()
        self._stalled = sched.stalled
        launched = self.runner.launch(sched)
        if self._in_flight is not None:
            outs += self._take_back()
        if not sched.is_empty:
            self._in_flight = (sched, launched)
        return outs

    def _outputs_on_pending(self) -> bool:
        """Penalties and grammars read the output so far, which must then include the token in flight."""
        return any(r.num_pending and r.sampling_params.reads_outputs for r in self.scheduler.running)

    def _take_back(self) -> list[RequestOutput]:
        sched, launched = self._in_flight
        self._in_flight = None
        return self._update(sched, launched.result())

    def _update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[RequestOutput]:
        for rid, (first, entries) in result.prompt_logprobs.items():
            track = self._tracks.get(rid)
            if track is not None and track.prompt_logprobs is not None:  # (a recomputed prompt scores again)
                prompt = track.request.prompt_token_ids
                track.prompt_logprobs[first:first + len(entries)] = [
                    self._logprob(prompt[first + i], lp) for i, lp in enumerate(entries)]
        new_tokens = self.scheduler.update(sched, result)
        # one output per request and step, with every token the step brought it (more than one: accepted drafts)
        return [self._output(request, [t for _, t in pairs], result)
                for request, pairs in itertools.groupby(new_tokens, key=lambda pair: pair[0])]

    def _output(self, request: Request, tokens: list[int], result: ModelRunnerOutput) -> RequestOutput:
        track = self._tracks[request.request_id]
        finished = request.status.finished
        new_text = ""
        if track.detok is not None:  # (a request with stop strings gets no drafts: one token a step)
            for i, token in enumerate(tokens):
                new_text += track.detok.add_token(token, final=finished and i == len(tokens) - 1)
            if track.detok.stopped and not finished:
                self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
                finished = True
        token = tokens[-1]
        logprob = None
        if track.logprobs is not None and request.request_id in result.logprobs:
            logprob = self._logprob(token, result.logprobs[request.request_id])
            track.logprobs.append(logprob)
        prefilled = request.status == RequestStatus.PREFILLED
        if finished or prefilled:
            del self._tracks[request.request_id]
        cumulative = self.cumulative_outputs
        logprobs = None
        if track.logprobs is not None:
            logprobs = list(track.logprobs) if cumulative else ([logprob] if logprob is not None else [])
        prompt_logprobs = None
        if track.prompt_logprobs is not None and (cumulative or len(request.output_token_ids) == 1):
            prompt_logprobs = list(track.prompt_logprobs)
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            text=track.detok.text if track.detok is not None and cumulative else "",
            token_ids=list(request.output_token_ids) if cumulative else [],
            new_text=new_text,
            new_token_ids=tokens,
            finished=finished,
            finish_reason=request.status.finish_reason,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=request.num_cached_tokens,
            prefilled=prefilled,
            kv_block_ids=list(self.scheduler.kv.block_ids(request.request_id)) if prefilled else None,
        )

    def _logprob(self, token: int, lp) -> Logprob:
        name = self.tokenizer.id_to_token if self.tokenizer is not None else (lambda i: str(i))
        return Logprob(
            token_id=token,
            token=name(token) or "",
            logprob=lp.logprob,
            top=[(t, name(t) or "", v) for t, v in zip(lp.top_token_ids, lp.top_logprobs)],
        )
