"""The engine loop: schedule, execute, update; plus text, stop strings and logprobs.

``step()`` is the whole loop body. The engine owns a Scheduler (policy) and
a runner (mechanism, anything with ``execute(SchedulerOutput) ->
ModelRunnerOutput``); the tokenizer only turns new tokens into text deltas
and finds stop strings. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tokenworks.engine.request import Request, RequestStatus
from tokenworks.engine.scheduler import Scheduler
from tokenworks.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tokenworks.outputs import Logprob, RequestOutput
from tokenworks.sampling_params import SamplingParams
from tokenworks.tokenizer import IncrementalDetokenizer, Tokenizer


class Runner(Protocol):
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...


@dataclass
class _Track:
    request: Request
    detok: IncrementalDetokenizer | None
    logprobs: list[Logprob] | None


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: Runner,
        tokenizer: Tokenizer | None,
        eos_token_ids: tuple[int, ...],
        vocab_size: int | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.vocab_size = vocab_size  # prompt token ids are checked against it
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._tracks: dict[str, _Track] = {}
        self.num_steps = 0

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Request:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; pass token ids")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        vocab = self.vocab_size
        if vocab is not None and any(not (0 <= t < vocab) for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        request = Request(request_id, token_ids, params, self.eos_token_ids)
        self.scheduler.add_request(request)
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.stop)
        self._tracks[request_id] = _Track(request, detok, [] if params.logprobs is not None else None)
        return request

    def abort(self, request_id: str) -> bool:
        self._tracks.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched)
        new_tokens = self.scheduler.update(sched, result)
        self.num_steps += 1
        return [self._output(request, token, result) for request, token in new_tokens]

    def _output(self, request: Request, token: int, result: ModelRunnerOutput) -> RequestOutput:
        track = self._tracks[request.request_id]
        finished = request.status.finished
        new_text = ""
        if track.detok is not None:
            new_text = track.detok.add_token(token, final=finished)
            if track.detok.stopped and not finished:
                self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
                finished = True
        if track.logprobs is not None and request.request_id in result.logprobs:
            track.logprobs.append(self._logprob(token, result.logprobs[request.request_id]))
        if finished:
            del self._tracks[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            text=track.detok.text if track.detok is not None else "",
            token_ids=list(request.output_token_ids),
            new_text=new_text,
            new_token_ids=[token],
            finished=finished,
            finish_reason=request.status.finish_reason,
            logprobs=list(track.logprobs) if track.logprobs is not None else None,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _logprob(self, token: int, lp) -> Logprob:
        name = self.tokenizer.id_to_token if self.tokenizer is not None else (lambda i: str(i))
        return Logprob(
            token_id=token,
            token=name(token) or "",
            logprob=lp.logprob,
            top=[(t, name(t) or "", v) for t, v in zip(lp.top_token_ids, lp.top_logprobs)],
        )
