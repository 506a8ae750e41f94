"""Frozen configuration, each part given only to the component that needs it."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """The network's shape, read from config.json or GGUF metadata."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k
    rope_scaling: tuple[tuple[str, object], ...] = ()  # frozen form of the HF dict
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def rope_scaling_dict(self) -> dict[str, object]:
        return dict(self.rope_scaling)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool: its block size, its memory budget and prefix caching."""

    block_size: int = 16
    kv_cache_memory_gib: float | None = None  # None: from the model's context and the machine (kv_cache.py)
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # set to override the budget (tests use tiny pools)
    dtype: str = "auto"  # of the KV pool (kv_cache.py: kv_dtype)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "int8"):
            raise ValueError(f"unknown KV cache dtype {self.dtype!r}; use auto, float32, bfloat16, float16 or int8")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a positive power of two")
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise ValueError("kv_cache_memory_gib must be positive")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError("num_blocks must be >= 2")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits for one step."""

    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 64
    max_model_len: int = 4096
    long_prefill_token_threshold: int = 0  # >0: cap one request's chunk per step
    # >0: a step takes at most this many prompt tokens while any request decodes, so that a prompt's chunk does not
    # stall the decodes' next token for a whole budget's step (Sarathi-Serve's stall-free batching); 0: no cap
    prefill_tokens_while_decoding: int = 0
    num_speculative_tokens: int = 0  # >0: up to this many draft tokens a decode step checks (engine/ngram.py)

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1 or self.max_model_len < 2:
            raise ValueError("scheduler limits must be positive")
        if self.prefill_tokens_while_decoding < 0:
            raise ValueError("prefill_tokens_while_decoding must be >= 0")
        if not 0 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}]")


MAX_SPECULATIVE_TOKENS = 16
# The CPU's prompt tokens per step while requests decode. The default model on 2 Zen 5 cores, one aggregated worker,
# `tokenworks bench` at 16 streams (prompts of 50-400 words, 64-token outputs), 2 rounds: a budget of 512 for
# prompts too gave ITL p99 250 / 272 ms, 128 gave 73 / 80 ms, at the same throughput (392 / 380 against 379 / 387
# tok/s) and a lower TTFT p50 (356 / 407 -> 235 / 314 ms). docs/serving.md, "Prompt chunks while requests decode".
CPU_PREFILL_WHILE_DECODING = 128


@dataclass(frozen=True)
class DeviceConfig:
    """Where and in what precision the model runs."""

    device: str = "cpu"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    num_threads: int | None = None  # CPU intra-op threads; None = torch's default

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {self.dtype!r}; use auto, float32, bfloat16 or float16")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"unknown device {self.device!r}; use cpu or cuda[:N]")

    @property
    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"


def default_cache_dir() -> str:
    """Where converted copies of GGUF models are kept (XDG cache convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tokenworks")


@dataclass(frozen=True)
class EngineArgs:
    """The user-facing knobs of one engine; ``LLM(**options)`` and the CLI fill it."""

    model: str | None = None  # None: the built-in default model
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    kv_cache_memory_gib: float | None = None  # None: from the model's context and the machine (kv_cache.py)
    kv_cache_dtype: str = "auto"  # auto: float16 for a float32 model on CPU, else the model's (kv_cache.py: kv_dtype)
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's context length, capped by the KV pool
    long_prefill_token_threshold: int = 0
    # prompt tokens a step takes at most while requests decode (SchedulerConfig); None: auto, CPU_PREFILL_WHILE_DECODING
    # on CPU, where a step's time grows with its tokens, and no cap on CUDA, where a chunk of the budget costs little
    # more than a decode step
    prefill_tokens_while_decoding: int | None = None
    num_threads: int | None = None
    cache_dir: str | None = None
    seed: int = 0
    quantization: str = "auto"  # auto: a GGUF's Q4_0/Q4_1 layers run as 4-bit on CPU; none: all float
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs (model/cuda_graphs.py)
    overlap_schedule: str = "auto"  # launch step n+1 before taking step n back (engine/engine.py); auto: on CUDA
    kv_host_memory_gib: float = 0.0  # > 0: evicted prefix blocks kept in host memory (model/host_kv_tier.py)
    # > 0: decode steps check up to this many draft tokens found by prompt lookup (engine/ngram.py); steps are then
    # not overlapped (auto turns overlap off; on is refused with it)
    num_speculative_tokens: int = 0

    def __post_init__(self) -> None:
        if self.quantization not in ("auto", "none"):
            raise ValueError(f"quantization must be 'auto' or 'none', not {self.quantization!r}")
        if self.overlap_schedule not in ("auto", "on", "off"):
            raise ValueError(f"overlap_schedule must be 'auto', 'on' or 'off', not {self.overlap_schedule!r}")
        if self.num_speculative_tokens and self.overlap_schedule == "on":
            raise ValueError("speculative decoding needs each step's tokens back before the next is scheduled: "
                             "use overlap_schedule 'off' or 'auto' with num_speculative_tokens")
        model_dtype = self.device_config().resolved_dtype
        if self.device != "cpu" and self.kv_cache_dtype not in ("auto", model_dtype):
            # the CUDA kernels (fused RoPE + KV write, paged decode) and graphs are built for the model's dtype
            raise ValueError(f"a {self.kv_cache_dtype} KV cache with a {model_dtype} model runs on the CPU only; "
                             "on CUDA leave kv_cache_dtype at auto")

    @property
    def overlap(self) -> bool:
        """Whether the engine overlaps steps: asked for, or auto and on a GPU."""
        if self.overlap_schedule == "auto":
            return self.device.startswith("cuda") and not self.num_speculative_tokens
        return self.overlap_schedule == "on"

    def device_config(self) -> DeviceConfig:
        return DeviceConfig(device=self.device, dtype=self.dtype, num_threads=self.num_threads)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size,
            kv_cache_memory_gib=self.kv_cache_memory_gib,
            enable_prefix_caching=self.enable_prefix_caching,
            num_blocks=self.num_blocks,
            dtype=self.kv_cache_dtype,
        )

    def scheduler_config(self, model: ModelConfig, num_blocks: int) -> SchedulerConfig:
        pool_tokens = (num_blocks - 1) * self.block_size
        limit = min(model.max_position, pool_tokens)
        max_len = limit if self.max_model_len is None else self.max_model_len
        if max_len > limit:
            raise ValueError(
                f"max_model_len={max_len} exceeds what fits: the model's context is {model.max_position} "
                f"tokens and the KV pool holds {pool_tokens}"
            )
        return SchedulerConfig(
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_model_len=max_len,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            prefill_tokens_while_decoding=self.resolved_prefill_tokens_while_decoding,
            num_speculative_tokens=self.num_speculative_tokens,
        )

    @property
    def resolved_prefill_tokens_while_decoding(self) -> int:
        if self.prefill_tokens_while_decoding is not None:
            return self.prefill_tokens_while_decoding
        return 0 if self.device.startswith("cuda") else CPU_PREFILL_WHILE_DECODING
