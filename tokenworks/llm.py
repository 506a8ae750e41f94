"""The offline API: ``LLM(model=None, **options).generate(prompts, params)`` and ``.chat``.

Also ``build_engine``, which loads a model and wires the policy (scheduler,
block pool) to the mechanism (network, KV tensor, runner).
"""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch

from tokenworks.config import EngineArgs, ModelConfig
from tokenworks.engine.block_pool import BlockPool
from tokenworks.engine.engine import Engine
from tokenworks.engine.kv_cache_manager import KVCacheManager
from tokenworks.engine.scheduler import Scheduler
from tokenworks.model.host_kv_tier import HostKVTier, host_blocks_for_budget
from tokenworks.model.kv_cache import KVCache, kv_dtype, num_blocks_for_budget, torch_dtype
from tokenworks.model import cpu_native
from tokenworks.model.llama import LlamaModel
from tokenworks.model.quantized_linear import Int4Linear, many_rows
from tokenworks.model.runner import ModelRunner
from tokenworks.model.weights import (forget_parsed_files, gguf_quantized_weights, load_model_files, random_weights,
                                      resolve_model_path)
from tokenworks.outputs import RequestOutput
from tokenworks.sampling_params import SamplingParams
from tokenworks.structured_output import GrammarMasks, check_grammar
from tokenworks.tokenizer import Tokenizer


@dataclass
class LoadedEngine:
    engine: Engine
    model_name: str
    model_config: ModelConfig
    runner: ModelRunner
    pool: BlockPool
    load_seconds: float
    graphs: str = ""  # how decode steps run: CUDA graphs captured (or why not); on CPU, the native kernels or why not
    host_tier: HostKVTier | None = None  # --kv-host-memory-gib


def build_engine(args: EngineArgs, detokenize: bool = True) -> LoadedEngine:
    """The engine for ``args``; ``detokenize=False``: token ids out only, no text (a served worker: the router
    detokenizes), stop strings still watched to end their requests at once (``Engine.stop_tokenizer``)."""
    t0 = time.perf_counter()
    quantized = {}
    if args.quantization == "auto" and args.device_config().device == "cpu":  # run as stored: float copies unread
        config = load_model_files(args.model, args.cache_dir, weights=False).config
        quantized = gguf_quantized_weights(resolve_model_path(args.model), config, args.cache_dir)
    files = load_model_files(args.model, args.cache_dir, skip=frozenset(quantized))
    tokenizer = Tokenizer(files.tokenizer_json, files.chat_template, files.bos_token, files.eos_token, files.add_bos_token)
    eos = files.config.eos_token_ids
    if not eos and files.eos_token is not None:
        eos = (tokenizer._tok.token_to_id(files.eos_token),)
    forget_parsed_files()
    weights, files.weights = files.weights, {}
    weights.update(quantized)
    return _assemble(args, files.name, files.config, weights, tokenizer if detokenize else None, eos, t0,
                     grammar_tokenizer=tokenizer.to_json, stop_tokenizer=None if detokenize else tokenizer)


def build_random_engine(args: EngineArgs, config: ModelConfig, name: str) -> LoadedEngine:
    """An engine of ``config``'s shape with random weights made on the device, no tokenizer (token ids only):
    for timing a model whose checkpoint is not at hand (``tokenworks profile --random-weights``)."""
    t0 = time.perf_counter()
    dev = args.device_config()
    weights = random_weights(config, torch_dtype(dev.resolved_dtype), dev.device)
    return _assemble(args, name, config, weights, None, config.eos_token_ids, t0)


def _assemble(args: EngineArgs, name: str, config: ModelConfig, weights: dict, tokenizer: Tokenizer | None,
              eos: tuple[int, ...], t0: float, grammar_tokenizer: Callable[[], str] | None = None,
              stop_tokenizer: Tokenizer | None = None) -> LoadedEngine:
    """``grammar_tokenizer``: the model's tokenizer.json, for structured output (none without it)."""
    dev = args.device_config()
    if dev.num_threads:
        torch.set_num_threads(dev.num_threads)
    if dev.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but torch sees no CUDA device")
    dtype = torch_dtype(dev.resolved_dtype)
    model = LlamaModel(config, weights, dtype, dev.device)
    weights.clear()
    cache_cfg = args.cache_config()
    cache_dtype = kv_dtype(cache_cfg, dtype, dev.device)
    num_blocks = num_blocks_for_budget(config, cache_cfg, cache_dtype, dev.device)
    sched_cfg = args.scheduler_config(config, num_blocks)
    kv_tensor = KVCache(config, cache_cfg.block_size, num_blocks, cache_dtype, dev.device)
    pool = BlockPool(num_blocks, cache_cfg.enable_prefix_caching)
    tier = None
    if args.kv_host_memory_gib > 0 and cache_cfg.enable_prefix_caching:
        tier = HostKVTier(kv_tensor, host_blocks_for_budget(kv_tensor, args.kv_host_memory_gib), pool)
        pool.evict_hook = tier.save
    scheduler = Scheduler(sched_cfg, KVCacheManager(pool, cache_cfg.block_size, tier))
    runner = ModelRunner(model, kv_tensor)
    if grammar_tokenizer is not None:
        runner.sampler.grammars = GrammarMasks(grammar_tokenizer, eos, config.vocab_size)
    graphs = _capture_graphs(args, runner, sched_cfg.max_num_seqs, -(-sched_cfg.max_model_len // cache_cfg.block_size))
    engine = Engine(scheduler, runner, tokenizer, eos, vocab_size=config.vocab_size, overlap=args.overlap,
                    check_grammar=check_grammar if grammar_tokenizer is not None else None,
                    stop_tokenizer=stop_tokenizer)
    gc.collect()
    gc.freeze()  # what loading made lives as long as the engine: later collections need not walk it
    return LoadedEngine(engine, name, config, runner, pool, time.perf_counter() - t0, graphs, tier)


def _capture_graphs(args: EngineArgs, runner: ModelRunner, max_num_seqs: int, max_blocks: int) -> str:
    """CUDA: capture the decode graphs now (part of the load time); a line saying what was done, or why not. CPU:
    whether the 4-bit layers run on the native kernels (model/cpu_native) and steps in one call."""
    if not runner.device.startswith("cuda"):
        if runner.native is not None:
            steps = ("steps" if runner.native_prompt_rows is None
                     else f"decode steps and steps of up to {runner.native_prompt_rows} prompt tokens")
            tiles = cpu_native.amx_rows() and runner.model.config.head_dim % 32 == 0  # amx_attention.c
            attention = ", and long prompts' attention on them (split bfloat16: float32's numbers)" if tiles else ""
            return (f"4-bit layers and {steps} in one call on the native CPU kernels ({cpu_native.instruction_sets()}); "
                    f"{many_rows()}{attention}")
        if any(isinstance(layer["qkv"], Int4Linear) for layer in runner.model.layers):
            return f"4-bit layers on PyTorch's int4 kernel (native kernels: {cpu_native.unavailable_reason()})"
        return ""
    model = runner.model
    fused = "layer operations fused (Triton)" if model.fused else f"layer operations unfused ({model.fused_problem})"
    if args.enforce_eager:
        return f"decode runs eagerly (--enforce-eager); {fused}"
    if not runner.use_paged:
        why = (f"the Triton paged decode kernel failed its check ({runner.paged_problem})" if runner.paged_problem
               else "no triton for the paged decode kernel (pip install triton)")
        return f"decode runs eagerly: {why}; {fused}"
    free = torch.cuda.mem_get_info(runner.device)[0]
    try:
        graphs = runner.capture_graphs(max_num_seqs, max_blocks)
    except Exception as e:  # noqa: BLE001 - a capture that fails costs the graphs' speed, not the engine
        runner.graphs = None
        return f"decode runs eagerly: capturing the decode CUDA graphs failed ({type(e).__name__}: {e}); {fused}"
    used = free - torch.cuda.mem_get_info(runner.device)[0]
    return (f"decode CUDA graphs for batches {graphs.sizes[0]}..{graphs.max_batch} ({len(graphs.sizes)} sizes) "
            f"captured in {graphs.capture_seconds:.1f}s, {used / 2**20:.0f} MiB beside the KV pool; {fused}")


class LLM:
    """Offline batch generation on one engine in this process."""

    def __init__(self, model: str | None = None, **options: Any) -> None:
        known = {f.name for f in fields(EngineArgs)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown LLM options: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        self.args = EngineArgs(model=model, **options)
        self.loaded = build_engine(self.args)
        self.engine = self.loaded.engine
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @property
    def pool(self) -> BlockPool:
        return self.loaded.pool

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        param_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = []
        try:
            for prompt, p in zip(prompts, param_list):
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, prompt if isinstance(prompt, str) else list(prompt), p)
                ids.append(rid)
            return self._run(ids, use_tqdm)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(list(conv)) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req")
        while len(final) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [final[rid] for rid in ids]
