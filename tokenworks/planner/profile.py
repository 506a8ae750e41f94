"""A worker's measured speed, as fitted latency models: what the simulator and the planner read.

One step of the engine is modelled from the work it does:

    step seconds = a + b * tokens + c * attention

``tokens`` is the number of new tokens in the step (prompt chunks, plus one
per decoding request) and ``attention`` is the sum over requests of new
tokens x context after the step (a whole prompt of L tokens gives L**2, a
decoding request gives its context). Prefill and decode steps are fitted
separately because they sit on different sides of the roofline: a prefill
step is bound by compute (``b`` dominates), a decode step by reading the
weights once (``a``) and each request's KV (``c``). A step that mixes a
prefill chunk with decodes uses the prefill fit over all its tokens.

KV moves between workers in ``transfer.fixed_s + bytes / transfer.bytes_per_s``.

Profiles are JSON: ``Profile.save`` / ``Profile.load``. A profile projected
to other hardware from a measured one says so in ``projected_from``.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

PREFILL_FORM = "a + b*tokens + c*sum(new_tokens*context)"
DECODE_FORM = "a + b*batch + c*sum(context)"
TRANSFER_FORM = "fixed_s + bytes/bytes_per_s"


@dataclass(frozen=True)
class Fit:
    """Coefficients of one latency model and its error on points held out of the fit."""

    a: float
    b: float
    c: float
    form: str
    held_out_error_mean: float | None = None  # mean |predicted - measured| / measured
    held_out_error_max: float | None = None
    num_points: int = 0

    def __call__(self, x1: float, x2: float) -> float:
        return self.a + self.b * x1 + self.c * x2


@dataclass(frozen=True)
class TransferModel:
    fixed_s: float
    bytes_per_s: float
    transport: str = "nixl"

    def seconds(self, nbytes: float) -> float:
        return self.fixed_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class Profile:
    model: str
    dtype: str
    device: str  # "cpu" or "cuda"
    hardware: str  # a catalog name, or a description of the host
    date: str  # ISO 8601, when measured
    kv_bytes_per_token: int
    weight_bytes: int
    prefill: Fit
    decode: Fit
    transfer: TransferModel
    max_num_batched_tokens: int
    max_num_seqs: int
    block_size: int
    kv_capacity_tokens: int  # KV tokens one worker can hold
    units: int = 1  # how many of the catalog kind one worker uses (CPU cores, or GPUs for tensor parallelism)
    threads: int | None = None
    projected_from: str | None = None  # None: measured; else what it was projected from and how
    points: dict = field(default_factory=dict, compare=False)  # raw measurements, for plots and refits

    # --- step times -------------------------------------------------------------------------
    def prefill_seconds(self, tokens: float, attention: float) -> float:
        return self.prefill(tokens, attention)

    def decode_seconds(self, batch: float, context_sum: float) -> float:
        return self.decode(batch, context_sum)

    # --- files --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        try:
            d = dict(d)
            d["prefill"] = Fit(**d["prefill"])
            d["decode"] = Fit(**d["decode"])
            d["transfer"] = TransferModel(**d["transfer"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a tokenworks profile: {e}") from None

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Profile":
        with open(path) as f:
            try:
                return cls.from_json(json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e})") from None

    def describe(self) -> str:
        p, d, t = self.prefill, self.decode, self.transfer
        origin = f"projected from {self.projected_from}" if self.projected_from else f"measured {self.date[:10]}"
        return (f"{self.model} {self.dtype} on {self.hardware} ({origin})\n"
                f"  prefill step = {p.a * 1e3:.2f} ms + {p.b * 1e6:.2f} us/token + {p.c * 1e9:.3f} ns x tokens*context"
                f"{_err(p)}\n"
                f"  decode step  = {d.a * 1e3:.2f} ms + {d.b * 1e6:.2f} us/request + {d.c * 1e9:.3f} ns x context"
                f"{_err(d)}\n"
                f"  KV transfer  = {t.fixed_s * 1e3:.2f} ms + bytes / {t.bytes_per_s / 1e9:.2f} GB/s ({t.transport}); "
                f"{self.kv_bytes_per_token} B/token; {self.kv_capacity_tokens} tokens of KV per worker")


def _err(f: Fit) -> str:
    if f.held_out_error_mean is None:
        return ""
    return f"  (held-out error mean {f.held_out_error_mean:.1%}, max {f.held_out_error_max:.1%}, {f.num_points} points)"


def fit_linear3(x1: list[float], x2: list[float], y: list[float], form: str) -> Fit:
    """Least squares of relative error with non-negative coefficients (every subset of the three
    terms is solved and the best non-negative one kept: three unknowns make that exact and cheap)."""
    X = np.column_stack([np.ones(len(y)), np.asarray(x1, float), np.asarray(x2, float)])
    Y = np.asarray(y, float)
    if len(Y) == 0:
        raise ValueError("no points to fit")
    w = 1.0 / np.maximum(Y, 1e-9)  # relative error: short and long steps count alike
    best, best_err = np.zeros(3), math.inf
    for k in range(1, 4):
        for cols in itertools.combinations(range(3), k):
            cols = list(cols)
            coef, *_ = np.linalg.lstsq(X[:, cols] * w[:, None], Y * w, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(3)
            full[cols] = coef
            err = float(np.sum(((X @ full - Y) * w) ** 2))
            if err < best_err:
                best, best_err = full, err
    return Fit(float(best[0]), float(best[1]), float(best[2]), form, num_points=len(Y))


def fit_with_holdout(x1: list[float], x2: list[float], y: list[float], form: str, every: int = 4) -> Fit:
    """Fit on all but every ``every``-th point, report the error on those, then refit on all points."""
    idx = list(range(len(y)))
    held = [i for i in idx if i % every == every - 1]
    train = [i for i in idx if i % every != every - 1]
    final = fit_linear3(x1, x2, y, form)
    if not held or len(train) < 3:
        return final
    part = fit_linear3([x1[i] for i in train], [x2[i] for i in train], [y[i] for i in train], form)
    errs = [abs(part(x1[i], x2[i]) - y[i]) / y[i] for i in held]
    return replace(final, held_out_error_mean=float(np.mean(errs)), held_out_error_max=float(np.max(errs)))


def fit_transfer(nbytes: list[float], seconds: list[float], transport: str) -> TransferModel:
    f = fit_linear3(nbytes, [0.0] * len(nbytes), seconds, TRANSFER_FORM)
    bw = 1.0 / f.b if f.b > 0 else math.inf
    return TransferModel(fixed_s=f.a, bytes_per_s=bw, transport=transport)
