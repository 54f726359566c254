"""Settlement: each block's measured joules go to its steps and gaps in proportion to the model."""

from __future__ import annotations

import numpy as np

from wattprint.profiler.attribution.coefficients import Coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.features import cumulative


def block_edges(b_t: np.ndarray, window_s: float) -> np.ndarray:
    """Indices into the boundaries where blocks end: each block spans at least ``window_s`` seconds,
    except a last, shorter one up to the last boundary (the online driver's rule: it cannot know
    the future, so offline does the same and both settle identical blocks)."""
    if len(b_t) < 2:
        return np.array([0], dtype=np.int64)
    edges = [0]
    last = b_t[0]
    for i in range(1, len(b_t)):
        if b_t[i] - last >= window_s:
            edges.append(i)
            last = b_t[i]
    if edges[-1] != len(b_t) - 1:
        edges.append(len(b_t) - 1)
    return np.asarray(edges, dtype=np.int64)


def settle_device(cols: StepColumns, coef: Coefficients, e_t: np.ndarray, e_j: np.ndarray,
                  origin: float, prev_end: float,
                  prev_tail_w: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Give each block's measured energy (between block edges ``e_t`` with counter values ``e_j``)
    to the steps and gaps in it, in proportion to the model's prediction. A gap's prediction is the
    idle curve plus the fast tail of the step before it (``prev_tail_w``: the tail power of the step
    that ended at ``prev_end``, before ``cols``).

    Returns (energy of each step's part inside [e_t[0], e_t[-1]], idle joules per block, the static
    part of each step's energy: fitted static power × the step's duration inside, at most its energy,
    the tail power of the last step ended by ``e_t[-1]``, else ``prev_tail_w``: the next run's).
    """
    pred, _ = coef.step_energy(cols)
    tails = coef.tail_power_w(cols, pred) if coef.tail_fraction > 0 else None
    cv, ci, cd, ct = cumulative(e_t, cols.t_start, cols.t_end, pred[:, None], coef.tau_s, origin, prev_end,
                                tails, coef.tail_tau_s, np.array([prev_tail_w]))
    step_pred = np.diff(cv[:, 0])
    gap_pred = coef.idle_power_w * np.diff(ci) + coef.idle_decay_power_w * np.diff(cd) + np.diff(ct[:, 0])
    measured = np.diff(e_j)
    total_pred = step_pred + gap_pred
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(total_pred > 0, measured / total_pred, 0.0)
    # each step's prediction, weighted by the scale of the block(s) it falls in
    nb = len(e_t) - 1
    js = np.clip(np.searchsorted(e_t, cols.t_start, side="right") - 1, 0, nb - 1)
    # a step accrues over [t_start, t_start + dt] exactly as features.cumulative accrues it (a step of
    # no duration over 1e-12 s, the same arithmetic), so that what the blocks predicted is what the steps
    # receive: the fraction of step i accrued by time x is clip((x - t_start) / dt, 0, 1)
    dt = np.maximum(cols.t_end - cols.t_start, 1e-12)

    def accrued(x, i=slice(None)):
        return np.clip((x - cols.t_start[i]) / dt[i], 0.0, 1.0)

    je = np.clip(np.searchsorted(e_t, cols.t_start + dt, side="left") - 1, 0, nb - 1)
    inside = accrued(e_t[-1]) - accrued(e_t[0])  # part of the step inside the settled span
    energy = pred * scale[js] * inside
    straddle = js != je
    in_block = np.bincount(js[~straddle], energy[~straddle], minlength=nb)
    for i in np.flatnonzero(straddle):  # straddles block edges: weigh each part by its block
        b = slice(js[i], je[i] + 1)
        parts = pred[i] * (accrued(e_t[js[i] + 1: je[i] + 2], i) - accrued(e_t[b], i)) * scale[b]
        energy[i] = float(parts.sum())
        in_block[b] += parts
    # conservation by construction: a block's idle is what its steps did not receive (equal to its
    # predicted gap energy × scale up to rounding)
    idle = np.where(total_pred > 0, measured - in_block, measured)
    ended = np.flatnonzero(cols.t_end <= e_t[-1])
    last_tail_w = float(tails[ended[np.argmax(cols.t_end[ended])]]) if tails is not None and len(ended) else prev_tail_w
    return energy, idle, static_part(coef, dt * inside, energy), last_tail_w


def static_part(coef: Coefficients, seconds: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """A step's static energy (convention v2): fitted static power × its duration, at most its energy."""
    return np.minimum(coef.static_power_w * seconds, energy)


def extrapolate_after(cols: StepColumns, coef: Coefficients, t_from: float) -> tuple[np.ndarray, np.ndarray]:
    """The model's prediction for each step's part after ``t_from`` (the counter's last change: no
    measurement covers it), and its static part. Reported as extrapolated, never as measured."""
    pred, _ = coef.step_energy(cols)
    dt = np.maximum(cols.t_end - cols.t_start, 1e-12)
    after = np.clip((cols.t_start + dt - np.maximum(cols.t_start, t_from)) / dt, 0.0, 1.0)
    energy = pred * after
    return energy, static_part(coef, dt * after, energy)


def with_first_sample(b_t: np.ndarray, b_e: np.ndarray, t0_s: float, e0_j: float) -> tuple[np.ndarray, np.ndarray]:
    """A device's boundaries start at its first sample: the value read then bounds the energy up to
    that time, so the interval up to the counter's first change is measured too (the edge rule)."""
    if len(b_t) and b_t[0] <= t0_s:
        return b_t, b_e
    return np.concatenate([[t0_s], b_t]), np.concatenate([[e0_j], b_e])
