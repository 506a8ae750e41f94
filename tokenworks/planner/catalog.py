"""The hardware catalog: accelerators and hosts with their peaks and prices, and roofline projection.

The shipped catalog is ``hardware.json`` beside this file; ``--catalog FILE``
replaces it. A profile measured on one kind is projected to another by
scaling each term of its latency models by the ratio of the resource that
term spends: compute-bound terms (prefill per token and attention, decode
per request) by peak FLOP/s, memory-bound terms (reading the weights once a
step, reading KV during decode) by memory bandwidth and bytes per element.
A step's intercept is split into the weights' read at the source's peak
bandwidth (scaled) and the rest, software overhead per step (kept as is:
Python and kernel launches do not speed up with a faster memory). A
projected profile says that it is projected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

from tokenworks.planner.profile import Profile, TransferModel

DEFAULT_CATALOG = os.path.join(os.path.dirname(__file__), "hardware.json")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class HardwareKind:
    name: str
    device: str
    peak_tflops: dict[str, float]
    memory_bandwidth_GBps: float
    memory_GiB: float
    interconnect_GBps: float
    price_per_hour: float  # per unit (one accelerator, or one CPU core)
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def flops(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            raise ValueError(f"{self.name} has no peak FLOP/s for {dtype} in the catalog")
        return self.peak_tflops[dtype] * 1e12


@dataclass(frozen=True)
class Catalog:
    kinds: dict[str, HardwareKind]
    path: str

    def __getitem__(self, name: str) -> HardwareKind:
        try:
            return self.kinds[name]
        except KeyError:
            raise ValueError(f"{name!r} is not in the catalog {self.path}; it has: {', '.join(self.kinds)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.kinds


def load_catalog(path: str | None = None) -> Catalog:
    path = path or DEFAULT_CATALOG
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    kinds = {}
    for k in doc.get("kinds", []):
        try:
            kind = HardwareKind(name=k["name"], device=k["device"], peak_tflops=dict(k["peak_tflops"]),
                                memory_bandwidth_GBps=float(k["memory_bandwidth_GBps"]), memory_GiB=float(k["memory_GiB"]),
                                interconnect_GBps=float(k["interconnect"]["GBps"]),
                                price_per_hour=float(k["price_per_hour"]), sources=dict(k.get("sources", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad hardware entry {k.get('name', '?')!r}: {e}") from None
        if kind.memory_bandwidth_GBps <= 0 or kind.price_per_hour < 0:
            raise ValueError(f"{path}: {kind.name}: bandwidth must be positive and price not negative")
        kinds[kind.name] = kind
    if not kinds:
        raise ValueError(f"{path}: no hardware kinds")
    return Catalog(kinds, path)


def project(profile: Profile, catalog: Catalog, to_kind: str, units: int = 1, dtype: str | None = None,
            memory_fraction: float = 0.9) -> Profile:
    """The profile as it would be on ``units`` x ``to_kind``, by roofline scaling (marked projected)."""
    src = catalog[profile.hardware]
    dst = catalog[to_kind]
    dtype = dtype or (profile.dtype if dst.device == src.device else "bfloat16")
    src_units = profile.units
    compute = (src.flops(profile.dtype) * src_units) / (dst.flops(dtype) * units)
    byte_ratio = DTYPE_BYTES[dtype] / DTYPE_BYTES[profile.dtype]
    memory = (src.memory_bandwidth_GBps * src_units) / (dst.memory_bandwidth_GBps * units) * byte_ratio
    p, d = profile.prefill, profile.decode
    # A step's intercept is reading the weights once (scales with bandwidth) plus software overhead
    # (Python, kernel launches: stays). The weight read is at least weight_bytes / peak bandwidth.
    weights_s = profile.weight_bytes / (src.memory_bandwidth_GBps * 1e9 * src_units)
    prefill = p.scaled(memory, compute, compute, keep=p.base(0.0) - weights_s)
    decode = d.scaled(memory, compute, memory, keep=d.base(0.0) - weights_s)
    if dtype == profile.dtype:
        weight_bytes = profile.weight_bytes
    elif profile.parameters:  # e.g. a CPU profile of 4-bit layers projected to a GPU that runs the model in bf16
        weight_bytes = profile.parameters * DTYPE_BYTES[dtype]
    else:
        weight_bytes = int(profile.weight_bytes * byte_ratio)
    kv_per_token = max(1, int(profile.kv_bytes_per_token * byte_ratio))
    free = dst.memory_GiB * units * 2**30 * memory_fraction - weight_bytes
    if free <= 0:
        raise ValueError(f"{profile.model} ({weight_bytes / 2**30:.1f} GiB of weights in {dtype}) does not fit in "
                         f"{units} x {dst.name} ({dst.memory_GiB:g} GiB each)")
    transfer = TransferModel(profile.transfer.fixed_s, dst.interconnect_GBps * 1e9, profile.transfer.transport)
    return replace(profile, hardware=dst.name, device=dst.device, dtype=dtype, units=units, prefill=prefill,
                   decode=decode, transfer=transfer, weight_bytes=weight_bytes, kv_bytes_per_token=kv_per_token,
                   kv_capacity_tokens=int(free // kv_per_token),
                   projected_from=f"{profile.units} x {src.name} {profile.dtype} profile of {profile.date[:10]} "
                                  "by roofline scaling", points={})
