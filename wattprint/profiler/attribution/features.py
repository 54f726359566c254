"""Cumulative regression features over time: steps' values accrue uniformly over their span, gaps
accrue idle time, the integral of the idle decay term ``exp(-s/tau)`` and each step's fast tail (its
tail values × the integral of ``exp(-s/tail_tau)`` over the gap after it)."""

from __future__ import annotations

import numpy as np

FAR_PAST_S = 1e9  # "no step ever": the idle decay term has died out


def _gap_integrals(s0: np.ndarray, s1: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Integrals of 1 and exp(-s/tau) over s in [s0, s1] (s: time since the last step ended)."""
    return s1 - s0, tau * (np.exp(-s0 / tau) - np.exp(-s1 / tau))


def cumulative(t_eval: np.ndarray, t_start: np.ndarray, t_end: np.ndarray, step_vals: np.ndarray,
               tau: float, origin: float, prev_end: float, tail_vals: np.ndarray | None = None,
               tail_tau: float = 0.02, prev_tail: np.ndarray | None = None):
    """Cumulative step values and gap features from ``origin`` to each time in ``t_eval``.

    A step's values accrue uniformly over its span; gaps accrue idle time, the decay integral and the
    tail of the step before them: its ``tail_vals`` row [n, m] (per second) × ``exp(-s/tail_tau)``.
    ``prev_end`` is when the last step before this run ended (``-inf``-like if none), ``prev_tail``
    that step's tail row (none if not given).
    Returns (step_cum [n, m], idle_time [n], decay [n], tail_cum [n, m]).
    """
    t_eval = np.asarray(t_eval, dtype=float)
    vals = step_vals.reshape(len(t_start), -1)
    m = vals.shape[1]
    tails = np.zeros_like(vals) if tail_vals is None else tail_vals.reshape(len(t_start), m)
    tail0 = np.zeros(m) if prev_tail is None else np.asarray(prev_tail, dtype=float).reshape(m)
    dt = np.maximum(t_end - t_start, 1e-12)
    cum_vals = np.vstack([np.zeros((1, m)), np.cumsum(vals, axis=0)])
    # gap before step i: [gap_lo[i], t_start[i]] with s measured from gap_ref[i]
    gap_ref = np.concatenate([[prev_end], t_end[:-1]])
    gap_lo = np.maximum(gap_ref, origin)
    s0, s1 = gap_lo - gap_ref, np.maximum(t_start - gap_ref, gap_lo - gap_ref)
    gi, gd = _gap_integrals(s0, s1, tau)
    gt = _gap_integrals(s0, s1, tail_tau)[1][:, None] * np.vstack([tail0[None, :], tails[:-1]])
    cum_gi = np.concatenate([[0.0], np.cumsum(gi)])
    cum_gd = np.concatenate([[0.0], np.cumsum(gd)])
    cum_gt = np.vstack([np.zeros((1, m)), np.cumsum(gt, axis=0)])

    k = np.searchsorted(t_start, t_eval, side="right") - 1  # last step started at or before t
    n = len(t_start)
    out_v = np.empty((len(t_eval), m))
    out_i = np.empty(len(t_eval))
    out_d = np.empty(len(t_eval))
    out_t = np.empty((len(t_eval), m))
    before = k < 0
    if before.any():  # in the gap before the first step
        tb = t_eval[before]
        lo = max(origin, prev_end)
        b0, b1 = np.full_like(tb, lo - prev_end), np.maximum(tb, lo) - prev_end
        i0, d0 = _gap_integrals(b0, b1, tau)
        out_v[before] = 0.0
        out_i[before] = i0
        out_d[before] = d0
        out_t[before] = _gap_integrals(b0, b1, tail_tau)[1][:, None] * tail0[None, :]
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
        t1 = _gap_integrals(np.zeros_like(s1), s1, tail_tau)[1]
        out_t[after] = cum_gt[ka + 1] + t1[:, None] * tails[ka]
    return out_v, out_i, out_d, out_t
