"""Sampling's random choice: the exponential race over counter-based draws.

A row of logits x samples token argmax_j (x_j - log E_j) with E_j ~ Exp(1): the argmax of p_j / E_j, which is a
draw from softmax(x), without the softmax (its normalizer is the same for every token of the row). E_j is
-log(U_j), and U_j is not drawn from a generator's sequence but computed from (j, the row's key): two rounds of a
32-bit integer mixer keyed by the key's halves, the top 23 bits of the result taken as ((h >> 9) + 0.5) 2^-23 in
(0, 1). A row's key is a hash of the request's seed and the position of the token being sampled (``row_key``), so:

- a seeded request's tokens depend on its seed, its logits and their positions only: never on its neighbours in
  the batch, on how often it was preempted and recomputed, or on which worker sampled which token (the prefill
  worker's first token and a decode worker's next ones draw as one worker would);
- a row costs one pass over its logits, with no state, and every row of a batch is drawn at once.

(The race rather than one uniform's place in the cumulative distribution: the latter moves with every logit's last
bits, which the 4-bit CPU products change with a step's row count, so a seed's text changed with its batch;
the race's argmax moves only with the top tokens' logits.)

On the CPU ``race_native`` runs temperature, top-k, top-p, min-p and the race in one native call
(``cpu_native/race.c``: the same draws on vectors, and only the tokens near the top sorted), else the sampler
filters in PyTorch and ``race_torch`` races (CUDA, or a CPU without the kernels). Both give the same U_j bit for
bit, and logarithms within a few units in the last place (``tests/test_sampling.py`` holds them to it).

Before 2026-11-29 each request owned a ``torch.Generator`` and drew a row of uniforms from it each step: 0.1 ms a
row of 49,152 on the CPU (mt19937), one call per row, and a decode worker's generator started again from the seed
after the prefill worker's token.
"""

from __future__ import annotations

import ctypes

import torch

from tokenworks.model import cpu_native
from tokenworks.model.host_copies import to_device

_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1


def _mix64(z: int) -> int:
    """A 64-bit mixer (a bijection: add a constant, fold and multiply twice): nearby inputs to unrelated outputs."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def row_key(seed: int, position: int) -> int:
    """The 64-bit key of the draws for the token at ``position`` of a request seeded with ``seed``."""
    return _mix64(_mix64(seed & _M64) ^ position)


def native(x: torch.Tensor) -> bool:
    """Whether ``race_native`` can choose for these logits: on the CPU, with the native kernels built."""
    return x.device.type == "cpu" and cpu_native.library() is not None


def race_native(x: torch.Tensor, keys: list[int], temperature: list[float], top_k: list[int], top_p: list[float],
                min_p: list[float]) -> torch.Tensor:
    """(rows, vocab) logits on the CPU and, per row, a key, a temperature (> 0), top-k (0: off), top-p (1: off) and
    min-p (0: off) -> (rows,) int64 tokens: temperature, then the filters as ``sampler._top_k_top_p`` and min-p
    apply them (the tokens sorted by probability: the first k kept, then those whose predecessors' probability is
    below p, then those at least min-p times the most likely's), then the race among the tokens kept."""
    if x.dtype != torch.float32 or x.stride(1) != 1:
        x = x.float().contiguous()
    rows, vocab = x.shape
    out = torch.empty(rows, dtype=torch.int64)
    floats = ctypes.c_float * rows
    ks = (ctypes.c_int64 * rows)(*(min(k, vocab) for k in top_k))
    if cpu_native.library().tw_sample(x.data_ptr(), rows, vocab, x.stride(0), floats(*(1.0 / t for t in temperature)),
                                      ks, floats(*top_p), floats(*min_p), (ctypes.c_uint64 * rows)(*keys),
                                      out.data_ptr(), torch.get_num_threads()):
        raise MemoryError("the native sampler could not allocate its buffers")
    return out


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """race.c's 32-bit mixer, in place, on int32 tensors holding the words' two's complements (products wrap as
    unsigned ones do; shifts are arithmetic, hence the masks)."""
    h.bitwise_xor_((h >> 16).bitwise_and_(0xFFFF))
    h.mul_(0x7FEB352D)
    h.bitwise_xor_((h >> 15).bitwise_and_(0x1FFFF))
    h.mul_(0x846CA68B - (1 << 32))
    return h.bitwise_xor_((h >> 16).bitwise_and_(0xFFFF))


def _signed32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def uniforms(keys: list[int], vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, vocab) float32 U in (0, 1), row i drawn for ``keys[i]``."""
    # pinned and queued on CUDA: a copy from pageable memory would wait for the step in flight (overlap)
    halves = to_device([[_signed32(k & _M32), _signed32(k >> 32)] for k in keys], torch.int32, device)
    j = torch.arange(vocab, dtype=torch.int32, device=device).unsqueeze(0)
    h = _mix32_(torch.bitwise_xor(j, halves[:, :1]))
    h = _mix32_(h.bitwise_xor_(halves[:, 1:]))
    return (h >> 9).bitwise_and_(0x7FFFFF).float().add_(0.5).mul_(2.0 ** -23)  # exact: below 2^23


def race_torch(x: torch.Tensor, keys: list[int]) -> torch.Tensor:
    """The race in PyTorch, on any device, for logits already at their temperature and filtered (tokens cut set to
    -inf: ``sampler._filtered``): (rows,) int64 tokens."""
    u = uniforms(keys, x.shape[1], x.device)
    return torch.sub(x, u.log_().neg_().log_(), out=u).argmax(dim=-1)
