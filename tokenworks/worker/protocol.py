"""Messages between the router and workers: msgspec structs over ZMQ, never pickle.

Router -> worker (the worker's PULL socket): Submit, Abort, Release, PeerGone, Shutdown.
Worker -> router (the router's PULL socket): Ready, Outputs (one per engine step: every request that got a
token), KVEvents (prefix blocks stored and removed, after a step that changed them), Failed, Stats, Unhealthy. Workers send token ids only; the router turns them into text.
"""

from __future__ import annotations

import msgspec

from tokenworks.sampling_params import SamplingParams
from tokenworks.transfer.base import KVPeer


class Submit(msgspec.Struct, tag="submit"):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    phase: str  # "full": prefill and decode here; "prefill": first token, then hold KV; "decode": KV from kv_peer
    first_token: int = -1  # decode: the token the prefill worker sampled
    kv_peer: KVPeer | None = None  # decode: where the prompt's KV is
    kv_block_ids: list[int] = []  # decode: the prefill worker's block table for the prompt


class Abort(msgspec.Struct, tag="abort"):
    request_id: str


class Release(msgspec.Struct, tag="release"):
    """Free blocks held for a request (the router gave up on its decode)."""

    request_id: str


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class PeerGone(msgspec.Struct, tag="peer_gone"):
    """The router declared a KV source dead (its process exited, or no heartbeat): pulls from it that wait now
    fail at once instead of at their timeout."""

    worker_id: str
    card: str  # KVPeer.card of the source's process


class Ready(msgspec.Struct, tag="ready"):
    worker_id: str
    role: str
    pid: int
    model: str
    commands_endpoint: str  # where the worker took its command socket (it binds the port itself)
    max_model_len: int
    block_size: int
    num_blocks: int
    kv_peer: KVPeer | None
    cpus: list[int]
    load_seconds: float
    warmup_seconds: float = 0.0
    graphs: str = ""  # how decode steps run (LoadedEngine.graphs: CUDA graphs, or the CPU's native kernels)
    cached_block_hashes: list[int] = []  # the prefix cache now; KVEvents carry every change after this
    num_host_blocks: int = 0  # the host tier's size (--kv-host-memory-gib), 0: none
    host_block_hashes: list[int] = []  # what it holds now
    max_num_seqs: int = 0  # requests its engine runs at once (admission: a request beyond them waits for a finish)
    kv_dtype: str = ""  # what its KV pool holds (KVCache.dtype_name: "float16", "int8", ...)


class KVEvents(msgspec.Struct, tag="kv_events"):
    """Changes to the worker's prefix cache, in order: (kind, block hash), kinds as in engine/block_pool.py."""

    worker_id: str
    events: list[tuple[int, int]]


class LogprobEntry(msgspec.Struct, array_like=True):
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


class Output(msgspec.Struct, array_like=True):
    """One request's part of an engine step."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[LogprobEntry] = []  # token strings left empty: the router names them
    prompt_logprobs: list[LogprobEntry | None] = []  # SamplingParams.prompt_logprobs: with the first token only
    prefilled: bool = False  # prefill phase done; KV held under kv_block_ids
    kv_block_ids: list[int] = []
    kv_bytes: int = 0  # decode phase: bytes pulled for this request (first output only)
    kv_seconds: float = 0.0
    kv_fallback: bool = False  # the pull failed and the prompt was recomputed locally
    kv_failure: str = ""  # why it failed: timeout, peer_gone, refused, layout, error


class Outputs(msgspec.Struct, tag="outputs"):
    """Everything one engine step produced, in one message."""

    worker_id: str
    outputs: list[Output]


class Failed(msgspec.Struct, tag="failed"):
    worker_id: str
    request_id: str
    message: str
    status: int = 400


class Stats(msgspec.Struct, tag="stats"):
    worker_id: str
    num_running: int
    num_waiting: int
    num_waiting_for_kv: int
    num_held: int
    blocks_used: int
    blocks_total: int
    blocks_cached: int
    expired_leases: int
    idle: bool  # nothing running, waiting, held or in flight, and every block back in the pool
    steps: int = 0  # engine steps run since start
    step_ms: float = 0.0  # mean wall time of an engine step over the last stats interval (0: none ran)
    busy_seconds: float = 0.0  # wall time spent in engine steps since start
    host_blocks_cached: int = 0  # blocks in the host tier
    host_blocks_restored: int = 0  # blocks copied back from it since start (prefix hits there)
    draft_tokens: int = 0  # speculative decoding: draft tokens checked since start
    accepted_draft_tokens: int = 0  # of them, those the model accepted


class Unhealthy(msgspec.Struct, tag="unhealthy"):
    """The worker cannot do its part any more (its KV source or pull threads broke); it exits next."""

    worker_id: str
    reason: str


ToWorker = Submit | Abort | Release | PeerGone | Shutdown
FromWorker = Ready | Outputs | KVEvents | Failed | Stats | Unhealthy
