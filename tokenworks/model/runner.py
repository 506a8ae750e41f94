"""Turns a SchedulerOutput into tensors, runs the network, samples.

Rows of the flattened batch: decodes first, longest context first (so the
groups attended together are plain slices), then prefill chunks in scheduler
order. Decode attention: in groups of similar length (CPU), or all rows in one
``paged_decode`` call (``use_paged``: CUDA with Triton). A decode-only step
replays a captured CUDA graph when ``capture_graphs`` has run (see
cuda_graphs.py); any other step runs eagerly. On a CPU whose layers are all on
the native 4-bit kernel a step runs as one native call (cpu_native), decode
rows and prompt chunks alike (``native_suits``: without AMX or AVX512-BF16 only
steps of few prompt rows).

``launch`` queues a step and returns at once; its ``result()`` waits for the
sampled tokens. A decode input that is still ``PLACEHOLDER`` (its token was
sampled by the step launched just before, whose result the engine has not
taken yet) is read from that step's sampled tokens on the device.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from tokenworks.engine.scheduler_output import (PLACEHOLDER, ModelRunnerOutput, ScheduledRequest, SchedulerOutput,
                                                 TokenLogprobs)
from tokenworks.model import cpu_native
from tokenworks.model.attention import AttentionMetadata, DecodeGroup, PrefillSeq, decode_groups
from tokenworks.model.cuda_graphs import CudaGraphCapture, DecodeGraphs, GraphCapture
from tokenworks.model.host_copies import to_device
from tokenworks.model.kv_cache import KVCache
from tokenworks.model.llama import LlamaModel
from tokenworks.model.paged_decode import PagedDecode, context_mask, kernel_check, triton_available
from tokenworks.model.quantized_linear import wide_products
from tokenworks.model.sampler import SampledTokens, Sampler


# What one more decode attention group costs a step, in padded KV blocks' worth of attention: measured on
# CPU (SmolLM2-135M, 2 cores: a group's calls about 1 ms a step, a block about 0.07 ms). On a GPU, where an
# eager step is launch-bound, a group's launches cost far more than a padded block.
GROUP_OVERHEAD_BLOCKS = {"cpu": 16, "cuda": 256}


def is_decode(s: ScheduledRequest) -> bool:
    """One new token after a prefilled context."""
    return s.num_tokens == 1 and s.start_position > 0


def native_suits(scheduled: list[ScheduledRequest], max_prompt_rows: int | None = None) -> bool:
    """Whether the native step should run this step: every step, or (``max_prompt_rows``: where the layer by
    layer path multiplies many rows faster, without AMX) those with at most that many prompt rows."""
    return max_prompt_rows is None or sum(s.num_tokens for s in scheduled if not is_decode(s)) <= max_prompt_rows


# Prompt rows whose logits are made at a time for prompt logprobs: 128 x the vocabulary's floats (25 MB here).
PROMPT_LOGPROB_ROWS = 128


class LaunchedStep:
    """A step queued on the device; ``result()`` waits for its sampled tokens."""

    def __init__(self, sampled: SampledTokens | None = None,
                 prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] | None = None,
                 draft_checks: tuple[list[tuple[str, int]], torch.Tensor] | None = None) -> None:
        self.sampled = sampled
        self.prompt_logprobs = prompt_logprobs or {}
        self.draft_checks = draft_checks  # (request id, number of drafts) in order, the model's choices for them
        # The sampling requests in the order of ``sampled.tokens``: where the next step finds its pending inputs.
        self.order = [s.request_id for s in sampled.reqs] if sampled is not None else []

    @functools.cached_property
    def rows(self) -> dict[str, int]:
        """Request id -> its row in ``sampled.tokens`` (only when the next step's rows are not in ``order``)."""
        return {rid: i for i, rid in enumerate(self.order)}

    def result(self) -> ModelRunnerOutput:
        out = ModelRunnerOutput(prompt_logprobs=self.prompt_logprobs)
        if self.sampled is not None:
            tokens, out.logprobs = self.sampled.result()
            out.sampled_token_ids = {s.request_id: t for s, t in zip(self.sampled.reqs, tokens)}
        if self.draft_checks is not None:
            counts, chosen = self.draft_checks
            chosen, at = chosen.tolist(), 0
            for rid, k in counts:
                out.draft_checks[rid] = chosen[at:at + k]
                at += k
        return out


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, use_paged: bool | None = None) -> None:
        self.model = model
        self.kv = kv
        self.block_size = kv.block_size
        self.device = model.device
        self.sampler = Sampler(model.device)
        self.group_overhead = GROUP_OVERHEAD_BLOCKS.get(torch.device(self.device).type, 16)
        self.use_paged = triton_available(self.device) if use_paged is None else use_paged
        self.paged_problem = ""  # why the Triton paged decode kernel is not used though Triton is there
        if use_paged is None and self.use_paged:
            self.paged_problem = kernel_check(str(self.device), model.dtype)
            self.use_paged = not self.paged_problem
        self.graphs: DecodeGraphs | None = None
        self.native = self._native_step()
        # Without bfloat16 products in the native step (AMX or AVX512-BF16) the layers multiply many rows faster on
        # PyTorch's BLAS (quantized_linear.wide_products) than its int16 tiles: steps with that many prompt rows
        # stay layer by layer.
        self.native_prompt_rows = None if self.native is None or self.native.bfloat16_rows else wide_products()[1] - 1
        self._last = LaunchedStep()  # the step launched last: the source of the next step's pending inputs

    def _native_step(self) -> cpu_native.NativeStep | None:
        """Steps in one native call where every layer runs on the native 4-bit kernel (CPU)."""
        linears = [layer[n] for layer in self.model.layers for n in ("qkv", "o", "gate_up", "down")]
        if (not all(getattr(w, "native", None) is not None for w in linears) or self.kv.tensor.dtype not in cpu_native.KV_DTYPES
                or self.model.config.head_dim % 8):
            return None
        return cpu_native.NativeStep(cpu_native.library(), self.model, self.kv)

    def capture_graphs(self, max_num_seqs: int, max_blocks_per_seq: int, capture: GraphCapture | None = None) -> DecodeGraphs:
        """Capture decode steps of up to ``max_num_seqs`` rows (CUDA graphs unless ``capture`` says otherwise)."""
        self.graphs = DecodeGraphs(self.model, self.kv, max_num_seqs, max_blocks_per_seq, capture or CudaGraphCapture())
        self.graphs.capture_all()
        return self.graphs

    def _tensor(self, data: list) -> torch.Tensor:
        return to_device(data, torch.long, self.device)

    def _ids(self, ids: list[int], decodes: list[ScheduledRequest]) -> torch.Tensor:
        """A step's input token ids on the device (its ``decodes`` rows first), pending ones from the last step."""
        if PLACEHOLDER not in ids:
            return self._tensor(ids)
        last = self._last
        if ids.count(PLACEHOLDER) == len(ids) and [s.request_id for s in decodes] == last.order:
            return last.sampled.tokens  # steady decoding: the same requests in the same order, all pending
        t = self._tensor(ids)
        rows = last.rows
        src = [rows.get(s.request_id, -2) if s.token_ids[0] == PLACEHOLDER else -1 for s in decodes]
        if -2 in src:
            raise RuntimeError("a pending decode input whose token the last step did not sample")
        src = self._tensor(src + [-1] * (len(ids) - len(decodes)))
        return torch.where(src >= 0, last.sampled.tokens.index_select(0, src.clamp(min=0)), t)

    def prepare(self, scheduled: list[ScheduledRequest]) -> tuple[list[ScheduledRequest], torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        decodes = sorted((s for s in scheduled if is_decode(s)), key=lambda s: -s.context_len)
        prefills = [s for s in scheduled if not is_decode(s)]
        order = decodes + prefills
        ids: list[int] = []
        pos: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        sample_rows: list[int] = []
        for s in order:
            ids.extend(s.token_ids)
            p = range(s.start_position, s.context_len)
            pos.extend(p)
            slot_blocks.extend(s.block_ids[i // bs] for i in p)
            slot_offsets.extend(i % bs for i in p)
            if s.sample:
                sample_rows.append(len(ids) - 1)

        groups = []
        widths = [-(-s.context_len // bs) for s in decodes]
        paged = None
        if self.use_paged and decodes:
            table = to_device([s.block_ids[:w] + [0] * (widths[0] - w) for s, w in zip(decodes, widths)],
                              torch.int32, self.device)
            paged = PagedDecode(table, self._tensor([s.context_len for s in decodes]))
        for a, b in ([] if paged else decode_groups(widths, self.group_overhead)):
            width = widths[a]
            table = self._tensor([s.block_ids[:width] + [0] * (width - min(width, len(s.block_ids)))
                                  for s in decodes[a:b]])
            mask = context_mask(self._tensor([s.context_len for s in decodes[a:b]]), width, bs)
            groups.append(DecodeGroup(a, b, table, mask))
        prefill_meta = []
        row = len(decodes)
        for s in prefills:
            n = s.num_tokens
            if s.start_position == 0:
                prefill_meta.append(PrefillSeq(row, row + n, None, n, None))
            else:
                ctx = s.context_len
                table = self._tensor(s.block_ids[: -(-ctx // bs)])
                q_pos = torch.arange(s.start_position, ctx, device=self.device).unsqueeze(1)
                mask = torch.arange(ctx, device=self.device).unsqueeze(0) <= q_pos
                prefill_meta.append(PrefillSeq(row, row + n, table, ctx, mask))
            row += n
        meta = AttentionMetadata(
            slot_blocks=self._tensor(slot_blocks),
            slot_offsets=self._tensor(slot_offsets),
            decodes=groups,
            prefills=prefill_meta,
            paged=paged,
        )
        return order, self._ids(ids, decodes), self._tensor(pos), meta, sample_rows

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.launch(sched).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> LaunchedStep:
        self.sampler.drop(sched.finished_request_ids)
        self._last = self._launch(sched)
        return self._last

    def _launch(self, sched: SchedulerOutput) -> LaunchedStep:
        if sched.is_empty:
            return LaunchedStep()
        order, hidden, sample_rows = self.forward(sched.scheduled)
        scored = self._prompt_logprobs(order, hidden)
        checks = self._draft_checks(order, hidden)
        if not sample_rows:
            return LaunchedStep(prompt_logprobs=scored)
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden.index_select(0, self._tensor(sample_rows))
        sampling = [s for s in order if s.sample]
        return LaunchedStep(self.sampler.sample(self.model.logits(hidden), sampling, scratch=True), scored, checks)

    def _draft_checks(self, order: list[ScheduledRequest], hidden: torch.Tensor
                      ) -> tuple[list[tuple[str, int]], torch.Tensor] | None:
        """Speculative decoding: for the requests with draft tokens, the model's own choice at each draft's position
        (from the row of the token before it; the drafts' last row samples as usual), made by the sampler as if
        the step ended there: greedy the argmax, sampled the draw keyed by that position (model/race.py), so a
        draft is kept exactly when the token sampled without drafts would be that draft."""
        counts, rows, reqs, row = [], [], [], 0
        for s in order:
            k = s.num_draft_tokens
            if k:
                counts.append((s.request_id, k))
                last = row + s.num_tokens - 1
                rows.extend(range(last - k, last))
                reqs.extend(replace(s, token_ids=s.token_ids[:s.num_tokens - k + j], num_draft_tokens=0)
                            for j in range(k))
            row += s.num_tokens
        if not counts:
            return None
        logits = self.model.logits(hidden.index_select(0, self._tensor(rows)))
        return counts, self.sampler.sample(logits, reqs, scratch=True).tokens

    def _prompt_logprobs(self, order: list[ScheduledRequest], hidden: torch.Tensor
                         ) -> dict[str, tuple[int, list[TokenLogprobs]]]:
        """For the prompt chunks whose requests asked for prompt logprobs: each row's log-softmax at the prompt's
        next token (row p scores token p + 1), and its top alternatives; up to PROMPT_LOGPROB_ROWS rows' logits at
        a time. Hidden rows follow ``order``, each request's chunk in turn."""
        out: dict[str, tuple[int, list[TokenLogprobs]]] = {}
        row = 0
        for s in order:
            k = s.sampling_params.prompt_logprobs
            first, last = s.start_position + 1, min(s.context_len, len(s.prompt_token_ids) - 1) + 1
            if k is not None and not is_decode(s) and last > first:  # positions first..last-1 scored
                entries: list[TokenLogprobs] = []
                for a in range(first, last, PROMPT_LOGPROB_ROWS):
                    b = min(last, a + PROMPT_LOGPROB_ROWS)
                    rows = hidden[row + a - 1 - s.start_position: row + b - 1 - s.start_position]
                    logprobs = torch.log_softmax(self.model.logits(rows).float(), dim=-1)
                    targets = self._tensor(s.prompt_token_ids[a:b]).long().unsqueeze(1)
                    chosen = logprobs.gather(1, targets).squeeze(1).tolist()
                    top_vals, top_ids = logprobs.topk(k) if k else (logprobs[:, :0], logprobs[:, :0].long())
                    entries += [TokenLogprobs(c, i, v) for c, i, v in zip(chosen, top_ids.tolist(), top_vals.tolist())]
                out[s.request_id] = (first, entries)
            row += s.num_tokens
        return out

    @torch.inference_mode()
    def final_logits(self, sched: SchedulerOutput) -> torch.Tensor:
        """Run one step without sampling; (N, vocab) logits of the rows that would sample (tests)."""
        _, hidden, sample_rows = self.forward(sched.scheduled)
        return self.model.logits(hidden[sample_rows])

    def forward(self, scheduled: list[ScheduledRequest]) -> tuple[list[ScheduledRequest], torch.Tensor, list[int]]:
        """The step's rows in batch order, their final hidden states, and the rows that sample."""
        graphs = self.graphs
        if graphs is not None and len(scheduled) <= graphs.max_batch and all(
                is_decode(s) and -(-s.context_len // self.block_size) <= graphs.max_blocks_per_seq for s in scheduled):
            decodes, rows = self._decode_rows(scheduled)
            if PLACEHOLDER in rows["ids"]:
                rows["ids"] = self._ids(rows["ids"], decodes)
            return decodes, graphs.run(**rows), [i for i, s in enumerate(decodes) if s.sample]
        if self.native is not None and native_suits(scheduled, self.native_prompt_rows):
            return self.forward_native(scheduled)
        order, ids, pos, meta, sample_rows = self.prepare(scheduled)
        return order, self.model.forward(ids, pos, self.kv, meta), sample_rows

    def forward_native(self, scheduled: list[ScheduledRequest]) -> tuple[list[ScheduledRequest], torch.Tensor, list[int]]:
        """``forward`` as one call of the native CPU step (``self.native``), decode rows and prompt chunks alike."""
        order, decodes, rows, sample_rows = self._step_rows(scheduled)
        hidden = self.model.embed_tokens(self._ids(rows.pop("ids"), decodes)).float().contiguous()
        return order, self.native.step(hidden, **rows).to(self.model.dtype), sample_rows

    def _step_rows(self, scheduled: list[ScheduledRequest]
                   ) -> tuple[list[ScheduledRequest], list[ScheduledRequest], dict[str, list], list[int]]:
        """A step's rows in ``prepare``'s order (decodes first, longest context first, then each prompt chunk's
        tokens) for the native step: per row its token, position, KV slot, context length (position + 1) and
        which sequence's block table it reads; also the decodes and the rows that sample."""
        bs = self.block_size
        decodes = sorted((s for s in scheduled if is_decode(s)), key=lambda s: -s.context_len)
        order = decodes + [s for s in scheduled if not is_decode(s)]
        ids: list[int] = []
        pos: list[int] = []
        which: list[int] = []
        tables, sample_rows = [], []
        for k, s in enumerate(order):
            ids.extend(s.token_ids)
            pos.extend(range(s.start_position, s.context_len))
            which.extend([k] * s.num_tokens)
            tables.append(s.block_ids[: -(-s.context_len // bs)])
            if s.sample:
                sample_rows.append(len(ids) - 1)
        return order, decodes, dict(
            ids=ids, positions=pos, slot_blocks=[tables[k][p // bs] for k, p in zip(which, pos)],
            slot_offsets=[p % bs for p in pos], tables=tables, row_tables=which, context_lens=[p + 1 for p in pos]
        ), sample_rows

    def _decode_rows(self, decodes: list[ScheduledRequest]) -> tuple[list[ScheduledRequest], dict[str, list]]:
        """A decode-only step's rows in the eager path's order (longest context first), and per row what a
        captured CUDA graph needs: token, position, KV slot, block table."""
        bs = self.block_size
        decodes = sorted(decodes, key=lambda s: -s.context_len)
        pos = [s.start_position for s in decodes]
        return decodes, dict(
            ids=[s.token_ids[0] for s in decodes], positions=pos,
            slot_blocks=[s.block_ids[p // bs] for s, p in zip(decodes, pos)], slot_offsets=[p % bs for p in pos],
            tables=[s.block_ids[: -(-s.context_len // bs)] for s in decodes],
            context_lens=[s.context_len for s in decodes])
