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

import bisect
import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

PREFILL_FORM = "a + b*tokens + c*sum(new_tokens*context)"
DECODE_FORM = "a + b*batch + c*sum(context)"  # with decode_attention "padded": c*batch*max(context)
TRANSFER_FORM = "fixed_s + bytes/bytes_per_s"


@dataclass(frozen=True)
class Fit:
    """One latency model, ``base(x1) + c * x2``, and its error on points held out of the fit.

    ``base`` is ``a + b * x1`` or, when ``table`` is given, the piecewise-linear curve through its
    (x1, seconds) pairs (extended along its end segments): measured engines are not linear in batch
    size (a CPU's one-row GEMM takes another path than a two-row one; a GPU step costs a fixed
    launch overhead until compute exceeds it), and a table follows that while keeping the model
    linear in x2, which the simulator's closed-form decode jumps need.
    """

    a: float
    b: float
    c: float
    form: str
    held_out_error_mean: float | None = None  # mean |predicted - measured| / measured
    held_out_error_max: float | None = None
    num_points: int = 0
    table: tuple[tuple[float, float], ...] = ()

    def base(self, x1: float) -> float:
        t = self.table
        if not t:
            return self.a + self.b * x1
        if len(t) == 1:
            return t[0][1]
        k = bisect.bisect_right(t, (x1, math.inf)) - 1
        k = min(max(k, 0), len(t) - 2)
        (x0, y0), (x1_, y1) = t[k], t[k + 1]
        return max(0.0, y0 + (y1 - y0) * (x1 - x0) / (x1_ - x0))

    def __call__(self, x1: float, x2: float) -> float:
        return self.base(x1) + self.c * x2

    def base_list(self, n: int) -> list[float]:
        """base(0..n) for integer x1, for lookups in the simulator's inner loop (one list per fit and n)."""
        return _base_list(self, n)

    def scaled(self, fixed: float, per_x1: float, per_x2: float, keep: float = 0.0) -> "Fit":
        """Terms scaled separately: of the intercept, ``keep`` seconds stay and the rest is scaled by
        ``fixed``; the x1 part by ``per_x1``; c by ``per_x2``."""
        g0 = self.base(0.0)
        keep = min(max(keep, 0.0), g0)
        a = keep + (g0 - keep) * fixed
        if not self.table:
            return Fit(a, self.b * per_x1, self.c * per_x2, self.form)
        table = tuple((x, a + (y - g0) * per_x1) for x, y in self.table)
        return Fit(a, 0.0, self.c * per_x2, self.form, table=table)


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
    weight_bytes: int  # what a decode step reads of the weights, as stored (a 4-bit layer's packed bytes)
    prefill: Fit
    decode: Fit
    transfer: TransferModel
    max_num_batched_tokens: int
    max_num_seqs: int
    block_size: int
    kv_capacity_tokens: int  # KV tokens one worker can hold
    units: int = 1  # how many of the catalog kind one worker uses (CPU cores, or GPUs for tensor parallelism)
    # How a decode step's attention cost grows: "sum" of the contexts (paged kernels), or "padded": every
    # request as long as the longest in the batch (tokenworks' runner gathers decode KV into a padded batch).
    decode_attention: str = "sum"
    # prompt tokens a step takes at most while requests decode (SchedulerConfig); 0: the whole budget (profiles
    # measured before the cap existed)
    prefill_tokens_while_decoding: int = 0
    prefix_caching: bool = True  # False: the engine was measured with --no-prefix-caching; its workers cache nothing
    quick: bool = False  # measured with ``profile --quick``: a few points, for tests (see ``warning``)
    parameters: int = 0  # the model's parameter count (0: not recorded), for its weights' size in another dtype
    threads: int | None = None
    projected_from: str | None = None  # None: measured; else what it was projected from and how
    points: dict = field(default_factory=dict, compare=False)  # raw measurements, for plots and refits

    def refit(self) -> "Profile":
        """The latency models fitted again from this profile's own points (after a change of the fitting)."""
        pre, dec = self.points.get("prefill"), self.points.get("decode")
        if not pre or not dec:
            raise ValueError("this profile keeps no measured points to refit from")
        return replace(self, prefill=fit_with_holdout(*zip(*pre), PREFILL_FORM),
                       decode=fit_with_holdout(*zip(*dec), DECODE_FORM))

    # --- files --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        try:
            d = dict(d)
            d["prefill"] = _fit_from_json(d["prefill"])
            d["decode"] = _fit_from_json(d["decode"])
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

    def warning(self, path: str) -> str:
        """What a user should know before simulating with this profile ("" when nothing)."""
        if self.quick:
            return (f"{path} was measured with 'tokenworks profile --quick' (a few points, for tests): its step "
                    "times can be 30 % off or more; measure without --quick for a plan")
        return ""

    def describe(self) -> str:
        p, d, t = self.prefill, self.decode, self.transfer
        origin = f"projected from {self.projected_from}" if self.projected_from else f"measured {self.date[:10]}"
        return (f"{self.model} {self.dtype} on {self.hardware} ({origin})\n"
                f"  prefill step = {_base(p, 'token')} + {p.c * 1e9:.3f} ns x tokens*context{_err(p)}\n"
                f"  decode step  = {_base(d, 'request')} + {d.c * 1e9:.3f} ns x context{_err(d)}\n"
                f"  KV transfer  = {t.fixed_s * 1e3:.2f} ms + bytes / {t.bytes_per_s / 1e9:.2f} GB/s ({t.transport}); "
                f"{self.kv_bytes_per_token} B/token; {self.kv_capacity_tokens} tokens of KV per worker"
                + ("" if self.prefix_caching else "; no prefix caching"))


@functools.lru_cache(maxsize=64)
def _base_list(fit: Fit, n: int) -> list[float]:
    return [fit.base(i) for i in range(n + 1)]


def _base(f: Fit, unit: str) -> str:
    if not f.table:
        return f"{f.a * 1e3:.2f} ms + {f.b * 1e6:.2f} us/{unit}"
    pts = f.table if len(f.table) <= 4 else (f.table[0], f.table[len(f.table) // 2], f.table[-1])
    return "table(" + ", ".join(f"{x:g} {unit}s: {y * 1e3:.1f} ms" for x, y in pts) + ")"


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


def fit_table(x1: list[float], x2: list[float], y: list[float], form: str) -> Fit:
    """base(x1) as one value per distinct x1 (a table) plus a shared c >= 0, least squares of relative error."""
    keys = sorted(set(x1))
    col = {k: i for i, k in enumerate(keys)}
    Y = np.asarray(y, float)
    w = 1.0 / np.maximum(Y, 1e-9)
    X = np.zeros((len(Y), len(keys) + 1))
    for r, (u, v) in enumerate(zip(x1, x2)):
        X[r, col[u]] = 1.0
        X[r, -1] = v
    coef, *_ = np.linalg.lstsq(X * w[:, None], Y * w, rcond=None)
    if coef[-1] < 0:
        coef, *_ = np.linalg.lstsq(X[:, :-1] * w[:, None], Y * w, rcond=None)
        coef = np.append(coef, 0.0)
    table = tuple((float(k), float(max(coef[i], 0.0))) for i, k in enumerate(keys))
    return Fit(0.0, 0.0, float(coef[-1]), form, num_points=len(Y), table=table)


def fit_with_holdout(x1: list[float], x2: list[float], y: list[float], form: str, every: int = 4,
                     tables: bool = True) -> Fit:
    """Fit on all but every ``every``-th point and measure the error on those, for the linear form and
    (``tables``) the table form; keep the form with the smaller held-out error, refitted on all points."""
    idx = list(range(len(y)))
    held = [i for i in idx if i % every == every - 1]
    train = [i for i in idx if i % every != every - 1]
    fitters = [fit_linear3] + ([fit_table] if tables else [])
    if not held or len(train) < 3:
        return fit_linear3(x1, x2, y, form)
    best = None
    for fitter in fitters:
        part = fitter([x1[i] for i in train], [x2[i] for i in train], [y[i] for i in train], form)
        errs = [abs(part(x1[i], x2[i]) - y[i]) / y[i] for i in held]
        if best is None or np.mean(errs) < best[0]:
            best = (float(np.mean(errs)), float(np.max(errs)), fitter)
    final = best[2](x1, x2, y, form)
    return replace(final, held_out_error_mean=best[0], held_out_error_max=best[1])


def _fit_from_json(d: dict) -> Fit:
    d = dict(d)
    d["table"] = tuple(tuple(p) for p in d.get("table") or ())
    return Fit(**d)


def fit_transfer(nbytes: list[float], seconds: list[float], transport: str) -> TransferModel:
    f = fit_linear3(nbytes, [0.0] * len(nbytes), seconds, TRANSFER_FORM)
    bw = 1.0 / f.b if f.b > 0 else math.inf
    return TransferModel(fixed_s=f.a, bytes_per_s=bw, transport=transport)
