"""Deployment files: the layout `tokenworks plan --emit-deployment FILE` chose, which `tokenworks serve
--deployment FILE` starts as it stands (on this machine, or with --ray on a cluster). YAML or JSON:

    version: 1
    pools:
      - role: prefill            # prefill, decode or aggregated
        workers: 1
        hardware: h100-sxm       # a kind of the hardware catalog (tokenworks/planner/hardware.json)
        units_per_worker: 1      # of that kind: GPUs, or CPU cores
        resources: {GPU: 1}      # what a Ray node must offer each worker: CPU, GPU, or a custom resource
        engine: {max_num_batched_tokens: 4096}   # engine flags (EngineArgs fields) of this pool's workers
      - role: decode
        workers: 3
        hardware: h100-sxm
        resources: {GPU: 1}
    local_prefill_threshold: 16  # serve's --local-prefill-threshold
    slo: {ttft_ms: 500, tpot_ms: 50}       # what the plan was sized for (recorded, not enforced)
    plan: {...}                  # what the planner predicted for it (recorded)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import msgspec

from tokenworks.config import EngineArgs

ROLE_OF = {"prefill": "prefill", "decode": "decode", "aggregated": "both"}
# Engine flags a pool may not set: the model and the device are the server's (--model; --gpus or the hardware).
SERVER_ONLY = ("model", "device", "cache_dir")


class Pool(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["prefill", "decode", "aggregated"]
    workers: int
    hardware: str | None = None
    units_per_worker: int = 1
    resources: dict[str, float] = {}
    engine: dict[str, Any] = {}


class DeploymentSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int = 1
    pools: list[Pool]
    local_prefill_threshold: int | None = None
    slo: dict[str, float] = {}
    plan: dict[str, Any] = {}

    def count(self, role: str) -> int:
        return sum(p.workers for p in self.pools if p.role == role)

    def describe(self) -> str:
        return " + ".join(f"{p.workers} {p.role}" + (f" on {p.hardware}" if p.hardware else "") for p in self.pools
                          if p.workers)


def _fail(path: str, message: str) -> ValueError:
    return ValueError(f"deployment {path}: {message}")


def validate(spec: DeploymentSpec, path: str = "<deployment>", catalog=None) -> DeploymentSpec:
    """Counts that can run, hardware kinds the catalog knows, engine flags that exist and have the right types."""
    if spec.version != 1:
        raise _fail(path, f"version {spec.version} is not supported (this tokenworks reads version 1)")
    if not spec.pools:
        raise _fail(path, "no pools")
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    for i, p in enumerate(spec.pools):
        where = f"pools[{i}] ({p.role})"
        if p.workers < 0:
            raise _fail(path, f"{where}: workers must be 0 or more, not {p.workers}")
        if p.units_per_worker < 1:
            raise _fail(path, f"{where}: units_per_worker must be 1 or more, not {p.units_per_worker}")
        if p.hardware is not None:
            if catalog is None:
                from tokenworks.planner.catalog import load_catalog

                catalog = load_catalog()
            if p.hardware not in catalog:
                raise _fail(path, f"{where}: hardware {p.hardware!r} is not a kind of the catalog "
                                  f"({', '.join(catalog.kinds)})")
        bad = [k for k, v in p.resources.items() if v < 0]
        if bad:
            raise _fail(path, f"{where}: resources must not be negative ({', '.join(bad)})")
        unknown = sorted(set(p.engine) - fields)
        if unknown:
            raise _fail(path, f"{where}: unknown engine flag(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        fixed = sorted(set(p.engine) & set(SERVER_ONLY))
        if fixed:
            raise _fail(path, f"{where}: {', '.join(fixed)} cannot differ between pools (give it to serve)")
        try:
            msgspec.convert(p.engine, EngineArgs)
        except msgspec.ValidationError as e:
            raise _fail(path, f"{where}: engine: {e}") from None
    if spec.count("decode") + spec.count("aggregated") < 1:
        raise _fail(path, "at least one decode or aggregated worker is needed")
    if spec.local_prefill_threshold is not None and spec.local_prefill_threshold < 0:
        raise _fail(path, "local_prefill_threshold must be 0 or more")
    return spec


def load(path: str, catalog=None) -> DeploymentSpec:
    """Read and validate a deployment file; every problem is one ValueError line naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise _fail(path, e.strerror or str(e)) from None
    yaml = path.endswith((".yaml", ".yml"))
    try:
        spec = (msgspec.yaml if yaml else msgspec.json).decode(raw, type=DeploymentSpec)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise _fail(path, str(e)) from None
    return validate(spec, path, catalog)


def save(spec: DeploymentSpec, path: str) -> None:
    """Write YAML for a .yaml/.yml path, else JSON."""
    yaml = path.endswith((".yaml", ".yml"))
    data = msgspec.yaml.encode(spec) if yaml else msgspec.json.format(msgspec.json.encode(spec), indent=2) + b"\n"
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def from_candidate(candidate, catalog, slo, local_prefill_threshold: int, plan: dict[str, Any],
                   engine: dict[str, Any] | None = None) -> DeploymentSpec:
    """The deployment of one of the planner's candidates: its pools, each worker's units of its hardware kind as
    the resources a Ray node must offer (GPUs, or CPU cores), and the engine flags the plan assumed (``engine``)."""
    pools = []
    for role, n, kind, units in candidate.pools:
        device = catalog[kind].device
        pools.append(Pool(role="aggregated" if role == "both" else role, workers=n, hardware=kind,
                          units_per_worker=units, resources={"GPU" if device.startswith("cuda") else "CPU": float(units)},
                          engine=dict(engine or {})))
    slo_ms = {f"{name}_ms": v * 1000 for name, v in (("ttft", slo.ttft), ("tpot", slo.tpot), ("itl", slo.itl),
                                                      ("e2e", slo.e2e)) if v is not None}
    return DeploymentSpec(pools=pools, local_prefill_threshold=local_prefill_threshold, slo=slo_ms, plan=plan)
