"""Attribution: measured joules -> steps -> requests, prefill/decode, KV cache, and idle.

The method (``docs/attribution.md``):

1. **Intervals.** Each device's cumulative counter changes about every 100 ms. A change seen between
   two polls is taken to have been published at their midpoint; consecutive change points bound
   intervals whose energy is known exactly.
2. **Fit.** A per-device linear energy model is fitted to those intervals by ridge least squares
   (prior: the hardware profile): a step costs ``p_static·dt + e_f·F + e_fu·F·u + e_b·B`` (F its
   FLOPs, u its utilisation, B its weight + KV bytes), capped at ``tdp_w·dt``; time between steps costs
   ``p_idle + p_decay·exp(-s/tau)`` (s: time since the last step ended).
3. **Blocks.** The predictions are rescaled per block of at least ``window_s`` seconds (whole counter
   intervals) so that each block's predicted energy equals its measured energy. Every measured joule
   is given exactly once, to a step or to idle (conservation), and the counter's timing jitter, which
   is large per 100 ms interval, is small per block.
4. **Requests.** A step's energy is split between its requests by the v1 convention
   (:func:`wattprint.profiler.core.costmodel.dynamic_energy_j` with the fitted coefficients); a share counts
   as prefill when the request had prefill tokens in the step; its KV part is
   ``share · e_b·(KV read + KV write) / d_r``.

The same core runs offline (:func:`attribute`, one global fit, vectorised over the whole trace) and
online (:class:`OnlineAttributor`, a running fit with forgetting, blocks settled as they complete,
bounded memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.core import costmodel as cm
from wattprint.profiler.core.costmodel import ModelGeometry
from wattprint.profiler.core.hardware import HardwareProfile
from wattprint.profiler.meters.base import Reading
from wattprint.profiler.core.records import (
    EnergySample,
    EntryArrays,
    StepRecord,
    StepTrace,
    entry_arrays,
)
from wattprint.profiler.core.results import RequestResult, Totals

COEF_NAMES = ("static_power_w", "energy_per_flop_j", "energy_per_flop_util_j", "energy_per_byte_j",
              "idle_power_w", "idle_decay_power_w")
TAU_GRID_S = (0.5, 1.0, 2.0, 4.0, 8.0)
_FAR_PAST_S = 1e9  # "no step ever": the idle decay term has died out
FIT_LAG = 10  # counter intervals per regression window


# ----------------------------------------------------------------------------------------- columns
@dataclass
class StepColumns:
    """A run of steps as arrays (one row per step, one per request-step entry)."""

    t_start: np.ndarray
    t_end: np.ndarray
    offsets: np.ndarray  # entries of step i are offsets[i]:offsets[i+1]
    req: np.ndarray  # entry -> request slot
    prefill: np.ndarray
    decode: np.ndarray
    context: np.ndarray
    ids: list[str]  # slot -> request id
    # per-entry cost-model quantities
    flops: np.ndarray = field(init=False)
    kv_read: np.ndarray = field(init=False)
    kv_write: np.ndarray = field(init=False)
    step_of: np.ndarray = field(init=False)
    # per-step features
    step_flops: np.ndarray = field(init=False)
    step_bytes: np.ndarray = field(init=False)
    step_tokens: np.ndarray = field(init=False)

    def derive(self, g: ModelGeometry) -> StepColumns:
        n_steps = len(self.t_start)
        counts = np.diff(self.offsets)
        self.step_of = np.repeat(np.arange(n_steps), counts)
        new = (self.prefill + self.decode).astype(float)
        ctx = self.context.astype(float)
        self.flops = cm.request_flops(g, new, ctx)
        self.kv_read = cm.kv_read_bytes(g, ctx).astype(float)
        self.kv_write = cm.kv_write_bytes(g, new).astype(float)
        self.step_flops = np.bincount(self.step_of, self.flops, minlength=n_steps)
        kv = np.bincount(self.step_of, self.kv_read + self.kv_write, minlength=n_steps)
        self.step_bytes = kv + float(g.weight_bytes)
        self.step_tokens = np.bincount(self.step_of, new, minlength=n_steps)
        return self

    @property
    def dt(self) -> np.ndarray:
        return np.maximum(self.t_end - self.t_start, 1e-9)


def columns_from_steps(steps: Sequence[StepRecord], g: ModelGeometry,
                       slots: dict[str, int] | None = None, ids: list[str] | None = None,
                       entries: EntryArrays | None = None) -> StepColumns:
    """Turn step records into :class:`StepColumns`; ``slots``/``ids`` intern request ids (shared
    across calls). ``entries``: the columns already extracted by :func:`records.load_steps`."""
    slots = {} if slots is None else slots
    ids = [] if ids is None else ids
    e = entries if entries is not None else entry_arrays(list(steps))
    if not slots:  # a fresh table: adopt the entries' own interning
        slots.update(zip(e.slot_ids, range(len(e.slot_ids))))
        ids.extend(e.slot_ids)
        req = e.slot
    else:  # running table (online): map the entries' slots onto it
        for rid in e.slot_ids:
            if rid not in slots:
                slots[rid] = len(ids)
                ids.append(rid)
        req = np.fromiter(map(slots.__getitem__, e.slot_ids), np.int64, len(e.slot_ids))[e.slot]
    n = len(steps)
    cols = StepColumns(
        t_start=np.fromiter(map(_T0, steps), float, n),
        t_end=np.fromiter(map(_T1, steps), float, n),
        offsets=e.offsets, req=req, prefill=e.prefill, decode=e.decode, context=e.context, ids=ids,
    )
    return cols.derive(g)


_T0, _T1 = attrgetter("t_start"), attrgetter("t_end")


# ----------------------------------------------------------------------------------- change points
def change_points(t_s: np.ndarray, energy_j: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Boundaries (estimated publish times) and cumulative values where a device's counter changed.

    A counter that goes backwards (driver reload) is stitched, not turned into negative energy.
    Returns (times, values, resets).
    """
    e = np.asarray(energy_j, dtype=float)
    t = np.asarray(t_s, dtype=float)
    de = np.diff(e)
    resets = int((de < 0).sum())
    if resets:  # stitch: across a reset assume the counter restarted from zero
        de = np.where(de < 0, np.maximum(e[1:], 0.0), de)
        e = np.concatenate([[e[0]], e[0] + np.cumsum(de)])
    idx = np.flatnonzero(de != 0) + 1
    return 0.5 * (t[idx - 1] + t[idx]), e[idx], resets


# ------------------------------------------------------------------------------ cumulative features
def _gap_integrals(s0: np.ndarray, s1: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Integrals of 1 and exp(-s/tau) over s in [s0, s1] (s: time since the last step ended)."""
    return s1 - s0, tau * (np.exp(-s0 / tau) - np.exp(-s1 / tau))


def cumulative(t_eval: np.ndarray, t_start: np.ndarray, t_end: np.ndarray, step_vals: np.ndarray,
               tau: float, origin: float, prev_end: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative step values and gap features from ``origin`` to each time in ``t_eval``.

    A step's values accrue uniformly over its span; gaps accrue idle time and the decay integral.
    ``prev_end`` is when the last step before this run ended (``-inf``-like if none).
    Returns (step_cum [n, m], idle_time [n], decay [n]).
    """
    t_eval = np.asarray(t_eval, dtype=float)
    vals = step_vals.reshape(len(t_start), -1)
    m = vals.shape[1]
    dt = np.maximum(t_end - t_start, 1e-12)
    cum_vals = np.vstack([np.zeros((1, m)), np.cumsum(vals, axis=0)])
    # gap before step i: [gap_lo[i], t_start[i]] with s measured from gap_ref[i]
    gap_ref = np.concatenate([[prev_end], t_end[:-1]])
    gap_lo = np.maximum(gap_ref, origin)
    gi, gd = _gap_integrals(gap_lo - gap_ref, np.maximum(t_start - gap_ref, gap_lo - gap_ref), tau)
    cum_gi = np.concatenate([[0.0], np.cumsum(gi)])
    cum_gd = np.concatenate([[0.0], np.cumsum(gd)])

    k = np.searchsorted(t_start, t_eval, side="right") - 1  # last step started at or before t
    n = len(t_start)
    out_v = np.empty((len(t_eval), m))
    out_i = np.empty(len(t_eval))
    out_d = np.empty(len(t_eval))
    before = k < 0
    if before.any():  # in the gap before the first step
        tb = t_eval[before]
        lo = max(origin, prev_end)
        i0, d0 = _gap_integrals(np.full_like(tb, lo - prev_end), np.maximum(tb, lo) - prev_end, tau)
        out_v[before] = 0.0
        out_i[before] = i0
        out_d[before] = d0
    kk = np.clip(k, 0, max(n - 1, 0))
    after = ~before
    if after.any():
        ka = kk[after]
        ta = t_eval[after]
        frac = np.clip((ta - t_start[ka]) / dt[ka], 0.0, 1.0)
        out_v[after] = cum_vals[ka] + frac[:, None] * vals[ka]
        s1 = np.maximum(ta - t_end[ka], 0.0)
        i1, d1 = _gap_integrals(np.zeros_like(s1), s1, tau)
        out_i[after] = cum_gi[ka + 1] + i1
        out_d[after] = cum_gd[ka + 1] + d1
    return out_v, out_i, out_d


# ---------------------------------------------------------------------------------------------- fit
@dataclass
class Coefficients:
    """A device's fitted energy model (per device: FLOPs and bytes are the whole step's)."""

    static_power_w: float
    energy_per_flop_j: float
    energy_per_flop_util_j: float
    energy_per_byte_j: float
    idle_power_w: float
    idle_decay_power_w: float
    tau_s: float
    tdp_w: float
    peak_flops: float  # per device
    n_devices: int = 1

    @property
    def theta(self) -> np.ndarray:
        return np.array([getattr(self, n) for n in COEF_NAMES])

    def with_theta(self, theta: np.ndarray, tau_s: float | None = None) -> Coefficients:
        kw = dict(zip(COEF_NAMES, map(float, theta)))
        return Coefficients(**kw, tau_s=self.tau_s if tau_s is None else tau_s, tdp_w=self.tdp_w,
                            peak_flops=self.peak_flops, n_devices=self.n_devices)

    def utilisation(self, flops: np.ndarray, dt: np.ndarray) -> np.ndarray:
        return np.clip(flops / (self.n_devices * np.maximum(dt, 1e-9) * self.peak_flops), 0.0, 1.0)

    def step_features(self, cols: StepColumns) -> np.ndarray:
        """[dt, F, F·u, B] per step."""
        dt = cols.dt
        u = self.utilisation(cols.step_flops, dt)
        return np.column_stack([dt, cols.step_flops, cols.step_flops * u, cols.step_bytes])

    def step_energy(self, cols: StepColumns, feats: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Predicted energy of each step on this device, and which steps hit the power cap."""
        feats = self.step_features(cols) if feats is None else feats
        raw = feats @ self.theta[:4]
        cap = self.tdp_w * feats[:, 0]
        capped = raw > cap
        return np.where(capped, cap, raw), capped

    def flop_energy_j(self, cols: StepColumns) -> np.ndarray:
        """Effective energy per FLOP in each step (utilisation-dependent)."""
        u = self.utilisation(cols.step_flops, cols.dt)
        return np.maximum(self.energy_per_flop_j + self.energy_per_flop_util_j * u, 0.0)

    def as_dict(self) -> dict:
        d = {n: getattr(self, n) for n in COEF_NAMES}
        d["idle_decay_tau_s"] = self.tau_s
        return d


def prior_coefficients(hw: HardwareProfile, n_devices: int) -> Coefficients:
    """The hardware profile as a starting point (per device: a device sees 1/n of the step's work)."""
    return Coefficients(
        static_power_w=hw.static_power_w,
        energy_per_flop_j=hw.energy_per_flop_j / n_devices,
        energy_per_flop_util_j=0.0,
        energy_per_byte_j=hw.energy_per_byte_j / n_devices,
        idle_power_w=hw.idle_power_w,
        idle_decay_power_w=max(hw.static_power_w - hw.idle_power_w, 0.0),
        tau_s=2.0,
        tdp_w=hw.tdp_w,
        peak_flops=hw.peak_flops,
        n_devices=n_devices,
    )


@dataclass
class NormalEquations:
    """Sufficient statistics of the interval regression, so a fit can run online with forgetting."""

    xtx: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))
    xty: np.ndarray = field(default_factory=lambda: np.zeros(6))
    yty: float = 0.0
    n: float = 0.0

    def add(self, X: np.ndarray, y: np.ndarray, decay: float = 1.0) -> None:
        self.xtx = decay * self.xtx + X.T @ X
        self.xty = decay * self.xty + X.T @ y
        self.yty = decay * self.yty + float(y @ y)
        self.n = decay * self.n + len(y)


def _solve(ne: NormalEquations, prior: np.ndarray, strength: float = 1e-3) -> np.ndarray:
    """Ridge toward the prior, with every coefficient but the utilisation slope kept >= 0."""
    diag = np.diag(ne.xtx).copy()
    lam = strength * np.maximum(diag, 1e-30) + 1e-30
    free = np.ones(6, dtype=bool)
    theta = prior.copy()
    for _ in range(6):
        idx = np.flatnonzero(free)
        A = ne.xtx[np.ix_(idx, idx)] + np.diag(lam[idx])
        fixed = ~free
        b = ne.xty[idx] + lam[idx] * prior[idx] - ne.xtx[np.ix_(idx, np.flatnonzero(fixed))] @ theta[fixed]
        try:
            sol = np.linalg.solve(A, b)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(A, b, rcond=None)[0]
        theta[idx] = sol
        neg = [j for j in idx if theta[j] < 0 and COEF_NAMES[j] != "energy_per_flop_util_j"]
        if not neg:
            break
        for j in neg:
            theta[j] = 0.0
            free[j] = False
    return theta


def interval_design(cols: StepColumns, coef: Coefficients, b_t: np.ndarray, b_e: np.ndarray,
                    origin: float, prev_end: float, capped: np.ndarray | None = None, lag: int = FIT_LAG):
    """Regression rows: the energy between boundary k and boundary k+lag, for every k.

    Overlapping windows of ``lag`` counter intervals (~1 s): the error of an estimated publish time
    enters a window once instead of every 100 ms interval, while the windows still resolve how the
    mix of prefill and decode changes. Capped steps' known energy (tdp·dt) is moved to y.
    Returns (X [rows, 6], y [rows]).
    """
    feats = coef.step_features(cols)
    if capped is None:
        capped = np.zeros(len(feats), dtype=bool)
    free_feats = np.where(capped[:, None], 0.0, feats)
    known = np.where(capped, coef.tdp_w * feats[:, 0], 0.0)
    vals = np.column_stack([free_feats, known])
    cv, ci, cd = cumulative(b_t, cols.t_start, cols.t_end, vals, coef.tau_s, origin, prev_end)
    c = np.column_stack([cv, ci, cd])
    lag = max(1, min(lag, len(b_t) - 1))
    d = c[lag:] - c[:-lag]
    X = np.column_stack([d[:, 0:4], d[:, 5], d[:, 6]])
    y = (b_e[lag:] - b_e[:-lag]) - d[:, 4]
    return X, y


def fit_device(cols: StepColumns, coef0: Coefficients, b_t: np.ndarray, b_e: np.ndarray,
               origin: float, prev_end: float = -_FAR_PAST_S) -> tuple[Coefficients, dict]:
    """Fit one device's coefficients to its counter intervals (global, offline)."""
    best = None
    for tau in TAU_GRID_S:
        coef = coef0.with_theta(coef0.theta, tau)
        prior = coef0.theta
        capped = None
        for _ in range(4):
            X, y = interval_design(cols, coef, b_t, b_e, origin, prev_end, capped)
            ne = NormalEquations()
            ne.add(X, y)
            theta = _solve(ne, prior)
            coef = coef.with_theta(theta, tau)
            _, new_capped = coef.step_energy(cols)
            if capped is not None and np.array_equal(new_capped, capped):
                break
            capped = new_capped
        resid = float(np.sum((X @ theta - y) ** 2))
        if best is None or resid < best[0]:
            ss_tot = float(np.sum((y - y.mean()) ** 2)) if len(y) > 1 else 0.0
            best = (resid, coef, {"r2": 1.0 - resid / ss_tot if ss_tot > 0 else float("nan"),
                                  "intervals": int(len(y)), "capped_steps": int(capped.sum())})
    return best[1], best[2]


# ------------------------------------------------------------------------------------------ settle
def block_edges(b_t: np.ndarray, window_s: float) -> np.ndarray:
    """Indices into the boundaries that start a new block of at least ``window_s`` seconds."""
    if len(b_t) < 2:
        return np.array([0], dtype=np.int64)
    edges = [0]
    last = b_t[0]
    for i in range(1, len(b_t)):
        if b_t[i] - last >= window_s:
            edges.append(i)
            last = b_t[i]
    if edges[-1] != len(b_t) - 1:
        if len(edges) > 1:
            edges[-1] = len(b_t) - 1  # fold a short tail into the last block
        else:
            edges.append(len(b_t) - 1)
    return np.asarray(edges, dtype=np.int64)


def settle_device(cols: StepColumns, coef: Coefficients, e_t: np.ndarray, e_j: np.ndarray,
                  origin: float, prev_end: float) -> tuple[np.ndarray, np.ndarray]:
    """Give each block's measured energy (between block edges ``e_t`` with counter values ``e_j``)
    to the steps and gaps in it, in proportion to the model's prediction.

    Returns (energy of each step's part inside [e_t[0], e_t[-1]], idle joules per block).
    """
    pred, _ = coef.step_energy(cols)
    cv, ci, cd = cumulative(e_t, cols.t_start, cols.t_end, pred[:, None], coef.tau_s, origin, prev_end)
    step_pred = np.diff(cv[:, 0])
    gap_pred = coef.idle_power_w * np.diff(ci) + coef.idle_decay_power_w * np.diff(cd)
    measured = np.diff(e_j)
    total_pred = step_pred + gap_pred
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(total_pred > 0, measured / total_pred, 0.0)
    idle = np.where(total_pred > 0, scale * gap_pred, measured)  # nothing predicted: all idle
    # each step's prediction, weighted by the scale of the block(s) it falls in
    nb = len(e_t) - 1
    js = np.clip(np.searchsorted(e_t, cols.t_start, side="right") - 1, 0, nb - 1)
    je = np.clip(np.searchsorted(e_t, cols.t_end, side="left") - 1, 0, nb - 1)
    dt = np.maximum(cols.t_end - cols.t_start, 1e-12)
    # part of the step inside the settled span [e_t[0], e_t[-1]]
    inside = np.clip(np.minimum(cols.t_end, e_t[-1]) - np.maximum(cols.t_start, e_t[0]), 0.0, None) / dt
    inside = np.where(cols.t_end - cols.t_start > 0, inside,
                      ((cols.t_start >= e_t[0]) & (cols.t_start < e_t[-1])).astype(float))
    energy = pred * scale[js] * inside
    for i in np.flatnonzero(js != je):  # straddles block edges: weigh each part by its block
        parts = 0.0
        for j in range(js[i], je[i] + 1):
            lo, hi = max(cols.t_start[i], e_t[j]), min(cols.t_end[i], e_t[j + 1])
            if hi > lo:
                parts += (hi - lo) / dt[i] * scale[j]
        energy[i] = pred[i] * parts
    return energy, idle


# -------------------------------------------------------------------------------------- split steps
@dataclass
class EntrySplit:
    """Per request-step entry: energy share, its KV part, and whether it counts as prefill."""

    energy: np.ndarray
    kv: np.ndarray
    is_prefill: np.ndarray


def split_steps(cols: StepColumns, g: ModelGeometry, step_energy: np.ndarray,
                e_flop_step: np.ndarray, e_byte: float) -> EntrySplit:
    """The v1 convention: a step's energy split by d_r / Σd."""
    so = cols.step_of
    kv_j = e_byte * (cols.kv_read + cols.kv_write)  # e_byte·(KV read + KV write)
    # d_r = e_flop·F + e_byte·KV + e_byte·W·T/T_step, built in place
    d = e_flop_step[so]
    d *= cols.flops
    d += kv_j
    d += (e_byte * g.weight_bytes / cols.step_tokens)[so] * (cols.prefill + cols.decode)
    dsum = np.bincount(so, d, minlength=len(cols.t_start))
    with np.errstate(divide="ignore", invalid="ignore"):
        per_d = np.where(dsum > 0, step_energy / dsum, 0.0)  # joules per unit of d, per step
    share = per_d[so] * d
    kv = per_d[so] * kv_j  # = share · e_byte·KV / d_r
    return EntrySplit(share, kv, cols.prefill > 0)


# ------------------------------------------------------------------------------------- accumulation
class RequestTable:
    """Running per-request sums, in slots (arrays grow as requests appear)."""

    FIELDS = ("energy_j", "prefill_j", "decode_j", "kv_j", "kv_read_bytes", "kv_write_bytes", "flops",
              "prefill_tokens", "decode_tokens", "t_start", "t_end", "prompt_tokens")

    def __init__(self):
        self.ids: list[str] = []
        self.slots: dict[str, int] = {}
        self.data = np.zeros((len(self.FIELDS), 0))
        self.stratum: dict[int, str | None] = {}
        self.finished: set[int] = set()
        self._col = {f: i for i, f in enumerate(self.FIELDS)}

    def ensure(self, n: int) -> None:
        if self.data.shape[1] < n:
            grow = max(n, 2 * self.data.shape[1], 64)
            new = np.zeros((len(self.FIELDS), grow))
            new[self._col["t_start"]] = math.inf
            new[self._col["t_end"]] = -math.inf
            new[:, : self.data.shape[1]] = self.data
            self.data = new

    def col(self, name: str) -> np.ndarray:
        return self.data[self._col[name]]

    def add(self, cols: StepColumns, split: EntrySplit, frac_in: np.ndarray | None = None,
            count_tokens: np.ndarray | None = None) -> None:
        """Add entries' energy (already scaled) and, where ``count_tokens``, their tokens/bytes/FLOPs."""
        n = len(self.ids)
        self.ensure(n)
        req = cols.req
        bc = np.bincount
        e_pre = np.where(split.is_prefill, split.energy, 0.0)
        self.col("energy_j")[:n] += bc(req, split.energy, n)
        self.col("prefill_j")[:n] += bc(req, e_pre, n)
        self.col("decode_j")[:n] += bc(req, split.energy - e_pre, n)
        self.col("kv_j")[:n] += bc(req, split.kv, n)
        w = np.ones(len(req)) if count_tokens is None else count_tokens.astype(float)
        if w.any():
            self.col("kv_read_bytes")[:n] += bc(req, cols.kv_read * w, n)
            self.col("kv_write_bytes")[:n] += bc(req, cols.kv_write * w, n)
            self.col("flops")[:n] += bc(req, cols.flops * w, n)
            self.col("prefill_tokens")[:n] += bc(req, cols.prefill * w, n)
            self.col("decode_tokens")[:n] += bc(req, cols.decode * w, n)
            # entries are in time order: a request's first entry starts it, its last ends it
            # (fancy assignment keeps the last write, so write backwards for the first)
            idx = np.flatnonzero(w > 0)
            r_idx, so = req[idx], cols.step_of[idx]
            ts = np.full(n, math.inf)
            ts[r_idx[::-1]] = cols.t_start[so[::-1]]
            te = np.full(n, -math.inf)
            te[r_idx] = cols.t_end[so]
            np.minimum(self.col("t_start")[:n], ts, out=self.col("t_start")[:n])
            np.maximum(self.col("t_end")[:n], te, out=self.col("t_end")[:n])

    def result(self, slot: int, source: str, model: str | None, status: str = "final") -> RequestResult:
        d = {f: float(self.data[i, slot]) for i, f in enumerate(self.FIELDS)}
        prefill_tokens = int(d["prefill_tokens"])
        prompt = max(int(d["prompt_tokens"]), prefill_tokens)
        done_prefill = prefill_tokens > 0 and prefill_tokens >= prompt
        output = int(d["decode_tokens"]) + (1 if done_prefill else 0)
        return RequestResult(
            id=self.ids[slot], energy_j=d["energy_j"], prefill_j=d["prefill_j"], decode_j=d["decode_j"],
            kv_j=d["kv_j"], kv_read_bytes=d["kv_read_bytes"], kv_write_bytes=d["kv_write_bytes"],
            prompt_tokens=prompt, output_tokens=output, flops=d["flops"], stratum=self.stratum.get(slot),
            source=source, t_start=d["t_start"] if math.isfinite(d["t_start"]) else None,
            t_end=d["t_end"] if math.isfinite(d["t_end"]) else None, model=model, status=status,
        )


def add_breakdowns(tot: Totals, cols: StepColumns, split: EntrySplit, table: RequestTable,
                   count: np.ndarray | None = None) -> None:
    """Add a run of settled entries to the totals: attributed/prefill/decode/KV joules, and the
    per-phase, per-stratum breakdowns. ``count`` marks entries whose tokens and bytes count now."""
    cnt = np.ones(len(cols.req), dtype=bool) if count is None else count
    attributed = float(split.energy.sum())
    pre = float(split.energy[split.is_prefill].sum())
    tot.attributed_j += attributed
    tot.prefill_j += pre
    tot.decode_j += attributed - pre
    tot.kv_j += float(split.kv.sum())
    tot.kv_read_bytes += float(cols.kv_read[cnt].sum())
    tot.kv_write_bytes += float(cols.kv_write[cnt].sum())
    # per stratum: index requests by stratum, then bincount entries (vectorised)
    names = sorted({v or "" for v in table.stratum.values()} | {""})
    code = {n: i for i, n in enumerate(names)}
    req_code = np.zeros(max(len(table.ids), 1), dtype=np.int64)
    for k, v in table.stratum.items():
        req_code[k] = code[v or ""]
    ec = req_code[cols.req]
    m = len(names)
    kv = np.bincount(ec, split.kv, m)
    by = {ph: np.bincount(ec, np.where(mask, split.energy, 0.0), m)
          for ph, mask in (("prefill", split.is_prefill), ("decode", ~split.is_prefill))}
    tok = {ph: np.bincount(ec, np.where(cnt, t, 0).astype(float), m)
           for ph, t in (("prefill", cols.prefill), ("decode", cols.decode))}
    for i, name in enumerate(names):
        if kv[i]:
            tot.kv_j_by_stratum[name] = tot.kv_j_by_stratum.get(name, 0.0) + float(kv[i])
        for ph in ("prefill", "decode"):
            if by[ph][i]:
                d = tot.energy_j_by_phase_stratum.setdefault(ph, {})
                d[name] = d.get(name, 0.0) + float(by[ph][i])
            if tok[ph][i]:
                d = tot.tokens_by_phase_stratum.setdefault(ph, {})
                d[name] = d.get(name, 0.0) + float(tok[ph][i])


# ------------------------------------------------------------------------------------------ offline
def _request_metadata(entries: EntryArrays, table: RequestTable) -> None:
    """Stratum and prompt length of each request, from its first entry (the vLLM hook repeats them on
    every entry; files may give them once). Only requests whose first entry names no stratum are
    looked up further, in their later entries. Per-request work, not per-entry."""
    reqs, slot = entries.reqs, entries.slot
    n = len(entries.slot_ids)
    first = np.empty(n, dtype=np.int64)
    first[slot[::-1]] = np.arange(len(slot) - 1, -1, -1)  # the last write wins: each slot's first entry
    prompt_col = table.col("prompt_tokens")
    missing = np.zeros(n, dtype=bool)
    for k, i in enumerate(first.tolist()):
        r = reqs[i]
        if r.stratum is not None:
            table.stratum[k] = r.stratum
        else:
            missing[k] = True
        if r.prompt_tokens:
            prompt_col[k] = r.prompt_tokens
    if missing.any():
        for i in np.flatnonzero(missing[slot]).tolist():
            r = reqs[i]
            k = int(slot[i])
            if r.stratum is not None and table.stratum.get(k) is None:
                table.stratum[k] = r.stratum
            if r.prompt_tokens:
                prompt_col[k] = max(prompt_col[k], r.prompt_tokens)


@dataclass
class Attribution:
    requests: list[RequestResult]
    totals: Totals
    step_energy_j: np.ndarray  # per step, summed over devices
    fit: list[dict]


def _energy_by_device(samples: Sequence[EnergySample]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    dev = np.fromiter((s.device for s in samples), np.int64, len(samples))
    t = np.fromiter((s.t for s in samples), float, len(samples))
    e = np.fromiter((s.energy_j for s in samples), float, len(samples))
    out = {}
    for d in np.unique(dev):
        m = dev == d
        out[int(d)] = (t[m], e[m])
    return out


def attribute(steps: Sequence[StepRecord] | StepTrace, samples: Sequence[EnergySample], g: ModelGeometry,
              hw: HardwareProfile, *, source: str = "unknown", window_s: float = 2.0,
              model_name: str | None = None, energy_path: str = "energy.jsonl") -> Attribution:
    """Offline attribution of a whole trace (one global fit per device)."""
    entries = None
    if isinstance(steps, StepTrace):
        steps, entries = steps.steps, steps.entries
    if not steps:
        raise InputError("no steps to attribute")
    table = RequestTable()
    if entries is None:
        entries = entry_arrays(list(steps))
    cols = columns_from_steps(steps, g, table.slots, table.ids, entries)
    table.ensure(len(table.ids))
    _request_metadata(entries, table)
    devices = _energy_by_device(samples)
    n_dev = len(devices)
    t_first, t_last = float(cols.t_start[0]), float(cols.t_end[-1])
    step_energy = np.zeros(len(cols.t_start))
    idle_j = measured_j = 0.0
    e_flop_step = np.zeros(len(cols.t_start))
    e_byte = 0.0
    fits, dev_measured, window = [], [], [math.inf, -math.inf]
    coefs = []
    for d, (t, e) in sorted(devices.items()):
        b_t, b_e, resets = change_points(t, e)
        if len(b_t) < 2 or b_t[0] > t_first or b_t[-1] < t_last:
            have = f"[{b_t[0]:.3f}, {b_t[-1]:.3f}] s" if len(b_t) else "no counter change at all"
            raise InputError(
                f"energy of device {d} does not cover the steps: counter changes span {have}, "
                f"steps span [{t_first:.3f}, {t_last:.3f}] s", energy_path)
        origin = float(b_t[0])
        coef, info = fit_device(cols, prior_coefficients(hw, n_dev), b_t, b_e, origin)
        info.update(device=d, counter_resets=resets, **coef.as_dict())
        fits.append(info)
        coefs.append(coef)
        edges = block_edges(b_t, window_s)
        energy, idle = settle_device(cols, coef, b_t[edges], b_e[edges], origin, -_FAR_PAST_S)
        step_energy += energy
        idle_j += float(idle.sum())
        m = float(b_e[-1] - b_e[0])
        measured_j += m
        dev_measured.append(m)
        e_flop_step += coef.flop_energy_j(cols)
        e_byte += coef.energy_per_byte_j
        window = [min(window[0], origin), max(window[1], float(b_t[-1]))]
    split = split_steps(cols, g, step_energy, e_flop_step, e_byte)
    table.add(cols, split)
    results = [table.result(k, source, model_name) for k in range(len(table.ids))]
    totals = Totals(
        measured_j=measured_j, attributed_j=0.0, idle_j=idle_j, source=source,
        t_start=window[0], t_end=window[1], requests=len(results), steps=len(cols.t_start),
        device_measured_j=dev_measured, coefficients=fits[0] if len(fits) == 1 else {"devices": fits},
    )
    add_breakdowns(totals, cols, split, table)
    return Attribution(results, totals, step_energy, fits)


# ------------------------------------------------------------------------------------------- online
class OnlineAttributor:
    """Streaming attribution with bounded memory: the fit/settle/split core of :func:`attribute`.

    Feed steps (in order) with :meth:`add_step` and meter readings with :meth:`add_reading`; call
    :meth:`advance` periodically. Blocks end at device 0's counter changes, at least ``window_s``
    apart (other devices' counters are interpolated there). A block is settled once every device's
    counter has changed past its end and every step that began before its end has arrived (or
    ``grace_s`` passed with none). Settling gives the block's measured joules to steps and idle and
    splits the steps' joules between requests; a finished request is final when its last step is
    settled, and is then emitted and forgotten.
    """

    def __init__(self, geometry: ModelGeometry, profile: HardwareProfile, *, n_devices: int, source: str,
                 model_name: str | None = None, window_s: float = 2.0, fit_half_life_s: float = 600.0,
                 grace_s: float = 1.0, stale_after_s: float = 300.0):
        self.g, self.hw, self.n_dev, self.source = geometry, profile, n_devices, source
        self.model = model_name or geometry.name
        self.window_s, self.grace_s = window_s, grace_s
        self.stale_after_s = stale_after_s  # a request unseen this long (aborted between steps) is settled
        self.half_life_s = fit_half_life_s
        self._steps: list[StepRecord] = []
        self._last_step: StepRecord | None = None
        self._received_until = -math.inf
        self._max_step_s = 0.0
        self._settled_until: float | None = None
        self._prev_end = -_FAR_PAST_S  # end of the last step wholly settled
        self.table = RequestTable()
        self._emitted: set[int] = set()
        self._dev = [_DeviceState(prior_coefficients(profile, n_devices)) for _ in range(n_devices)]
        self._pending_results: list[RequestResult] = []
        self._totals = Totals(0.0, 0.0, 0.0, source, device_measured_j=[0.0] * n_devices)
        self.late_steps = 0
        self._flushing = False

    # ---- input
    def add_step(self, step: StepRecord) -> None:
        """Add one step (in order). Raises :class:`InputError` for out-of-order or malformed steps."""
        last = self._last_step
        if last is not None and (step.step <= last.step or step.t_start < last.t_end - 1e-6):
            raise InputError(f"step {step.step} arrived out of order (after step {last.step})")
        if not step.t_end >= step.t_start:
            raise InputError(f"step {step.step} ends before it starts")
        if self._settled_until is not None and step.t_end <= self._settled_until:
            self.late_steps += 1  # its time was already settled (as idle)
            return
        self._steps.append(step)
        self._last_step = step
        self._received_until = step.t_end
        self._max_step_s = max(self._max_step_s, step.t_end - step.t_start)
        t = self.table
        for r in step.requests:
            k = t.slots.get(r.id)
            if k is None:
                k = t.slots[r.id] = len(t.ids)
                t.ids.append(r.id)
                t.ensure(len(t.ids))
            if r.stratum is not None and t.stratum.get(k) is None:
                t.stratum[k] = r.stratum
            if r.prompt_tokens:
                t.col("prompt_tokens")[k] = max(t.col("prompt_tokens")[k], r.prompt_tokens)
            if r.finished:
                t.finished.add(k)

    def add_reading(self, reading: Reading) -> None:
        """Add one meter poll (cumulative joules per device)."""
        for d, e in enumerate(reading.energy_j[: self.n_dev]):
            self._dev[d].observe(reading.t_s, float(e))

    # ---- output
    def advance(self, now_s: float) -> list[RequestResult]:
        """Settle every complete block; return the finished requests that became final."""
        while self._settle_next(now_s):
            pass
        out, self._pending_results = self._pending_results, []
        return out

    def totals(self) -> Totals:
        """Cumulative totals at the last settled instant (``attributed_j + idle_j == measured_j``)."""
        import msgspec

        return msgspec.convert(msgspec.to_builtins(self._totals), Totals)

    def lag_s(self, now_s: float) -> float:
        """How far settlement trails ``now_s`` (seconds)."""
        return now_s - self._settled_until if self._settled_until is not None else 0.0

    @property
    def coefficients(self) -> dict:
        return self._dev[0].coef.as_dict()

    @property
    def active_requests(self) -> int:
        return len(self.table.ids) - len(self._emitted)

    def provisional(self, request_id: str) -> RequestResult | None:
        """A request not yet final, as far as it is settled (status ``provisional``)."""
        k = self.table.slots.get(request_id)
        if k is None or k in self._emitted:
            return None
        return self.table.result(k, self.source, self.model, status="provisional")

    def finish(self) -> list[RequestResult]:
        """Shut down: settle what the counters cover (a last block may be short), then report every
        request still held (``provisional`` if its steps reach past the last counter change)."""
        out = self.advance(math.inf)
        self._flushing = True
        try:
            out += self.advance(math.inf)
        finally:
            self._flushing = False
        unsettled = {self.table.slots[r.id] for s in self._steps for r in s.requests}
        for k in range(len(self.table.ids)):
            if k not in self._emitted:
                final = k in self.table.finished and k not in unsettled
                out.append(self.table.result(k, self.source, self.model, status="final" if final else "provisional"))
                self._emitted.add(k)
        return out

    # ---- internals
    def _block_edges(self, now_s: float) -> tuple[float, float] | None:
        d0 = self._dev[0]
        if self._settled_until is None:  # the first block starts where every counter is known
            if any(len(d.b_t) < 2 for d in self._dev):
                return None
            first = max(d.b_t[0] for d in self._dev)
            starts = [b for b in d0.b_t if b >= first]
            if not starts:
                return None
            start = starts[0]
        else:
            start = self._settled_until
        end = next((b for b in d0.b_t if b >= start + self.window_s), None)
        if end is None and self._flushing and d0.b_t and d0.b_t[-1] > start:
            end = d0.b_t[-1]  # shutting down: a last, shorter block
        if end is None or any(not d.b_t or d.b_t[-1] < end for d in self._dev[1:]):
            return None
        grace = max(self.grace_s, 2.0 * self._max_step_s)
        if self._received_until < end and now_s - end < grace:
            return None  # a step may still be running across the block's end
        return start, end

    def _settle_next(self, now_s: float) -> bool:
        edges = self._block_edges(now_s)
        if edges is None:
            return False
        start, end = edges
        steps = [s for s in self._steps if s.t_start < end]
        cols = columns_from_steps(steps, self.g, self.table.slots, self.table.ids) if steps else None
        self.table.ensure(len(self.table.ids))
        step_energy = np.zeros(len(steps))
        e_flop = np.zeros(len(steps))
        e_byte = 0.0
        tot = self._totals
        for d, dev in enumerate(self._dev):
            e0, e1 = dev.energy_at(start), dev.energy_at(end)
            measured = e1 - e0
            if cols is not None:
                b_t, b_e = dev.boundaries_between(start, end)
                dev.update_fit(cols, b_t, b_e, start, self._prev_end, self.half_life_s)
                energy, idle = settle_device(cols, dev.coef, np.array([start, end]), np.array([e0, e1]),
                                             start, self._prev_end)
                step_energy += energy
                e_flop += dev.coef.flop_energy_j(cols)
                e_byte += dev.coef.energy_per_byte_j
                tot.idle_j += float(idle.sum())
            else:
                tot.idle_j += measured
            tot.device_measured_j[d] += measured
            tot.measured_j += measured
            dev.forget_before(end)
        if tot.t_start is None:
            tot.t_start = start
        tot.t_end = end
        self._settled_until = end
        if cols is not None:
            self._account(cols, step_energy, e_flop, e_byte, end)
        tot.coefficients = self.coefficients
        return True

    def _account(self, cols: StepColumns, step_energy: np.ndarray, e_flop: np.ndarray, e_byte: float,
                 end: float) -> None:
        split = split_steps(cols, self.g, step_energy, e_flop, e_byte)
        done = cols.t_end <= end  # steps wholly settled: their tokens, bytes and FLOPs count now
        count = done[cols.step_of]
        self.table.add(cols, split, count_tokens=count)
        tot = self._totals
        add_breakdowns(tot, cols, split, self.table, count)
        tot.steps += int(done.sum())
        if done.any():
            self._prev_end = max(self._prev_end, float(cols.t_end[done].max()))
        self._steps = [s for s in self._steps if s.t_end > end]
        live = {self.table.slots[r.id] for s in self._steps for r in s.requests}
        done_ids = self.table.finished - live - self._emitted
        t_last = self.table.col("t_end")
        stale = {k for k in range(len(self.table.ids)) if k not in live and k not in self._emitted
                 and t_last[k] < end - self.stale_after_s}
        for k in sorted(done_ids | stale):
            self._pending_results.append(self.table.result(k, self.source, self.model))
            self._emitted.add(k)
            tot.requests += 1
        if len(self._emitted) > 256 and len(self._emitted) * 2 > len(self.table.ids):
            self._compact()

    def _compact(self) -> None:
        """Forget emitted requests (bounded memory)."""
        old = self.table
        keep = [k for k in range(len(old.ids)) if k not in self._emitted]
        new = RequestTable()
        new.ensure(len(keep))
        for j, k in enumerate(keep):
            new.ids.append(old.ids[k])
            new.slots[old.ids[k]] = j
            new.data[:, j] = old.data[:, k]
            if k in old.stratum:
                new.stratum[j] = old.stratum[k]
            if k in old.finished:
                new.finished.add(j)
        self.table = new
        self._emitted = set()


@dataclass
class _DeviceState:
    """One device's counter change points, running fit and stitching offset (online)."""

    coef: Coefficients
    b_t: list = field(default_factory=list)
    b_e: list = field(default_factory=list)
    _last_t: float | None = None
    _last_raw: float | None = None
    _offset: float = 0.0
    resets: int = 0
    ne: NormalEquations = field(default_factory=NormalEquations)
    _prior: np.ndarray | None = None

    def observe(self, t: float, raw_e: float) -> None:
        if self._last_raw is not None and raw_e < self._last_raw:  # counter reset: stitch
            self._offset += self._last_raw
            self.resets += 1
        if self._last_raw is not None and raw_e != self._last_raw:
            self.b_t.append(0.5 * (self._last_t + t))
            self.b_e.append(raw_e + self._offset)
        self._last_t, self._last_raw = t, raw_e

    def energy_at(self, t: float) -> float:
        """Cumulative energy at ``t``, interpolated between change points."""
        return float(np.interp(t, self.b_t, self.b_e))

    def boundaries_between(self, t0: float, t1: float) -> tuple[np.ndarray, np.ndarray]:
        bt = np.asarray(self.b_t)
        m = (bt > t0) & (bt < t1)
        return (np.concatenate([[t0], bt[m], [t1]]),
                np.concatenate([[self.energy_at(t0)], np.asarray(self.b_e)[m], [self.energy_at(t1)]]))

    def forget_before(self, t: float) -> None:
        """Drop change points no longer needed (keep the last one at or before ``t``)."""
        i = int(np.searchsorted(self.b_t, t, side="right")) - 1
        if i > 0:
            del self.b_t[:i]
            del self.b_e[:i]

    def update_fit(self, cols: StepColumns, b_t: np.ndarray, b_e: np.ndarray, origin: float,
                   prev_end: float, half_life_s: float) -> None:
        if self._prior is None:
            self._prior = self.coef.theta
        if len(b_t) < 3:
            return
        _, capped = self.coef.step_energy(cols)
        X, y = interval_design(cols, self.coef, b_t, b_e, origin, prev_end, capped)
        self.ne.add(X, y, 0.5 ** ((b_t[-1] - b_t[0]) / half_life_s))
        if self.ne.n >= 20:
            self.coef = self.coef.with_theta(_solve(self.ne, self._prior))
