"""The online driver holds a compute-bound step until the running fit knows its energy per FLOP (issue 8):
a trace that opens with a long prompt among short ones no longer settles that prefill at the prior's
utilisation slope. The hold is bounded in time and yields to the memory bound."""

from __future__ import annotations

import numpy as np
import pytest

from wattprint.profiler.attribution import pacing
from wattprint.profiler.attribution.coefficients import COEF_NAMES
from wattprint.profiler.attribution.fit import NormalEquations, flop_energy_rel_sigma
from wattprint.profiler.attribution.online import OnlineAttributor
from wattprint.profiler.attribution.pacing import HOLD_REL_SIGMA, undetermined
from wattprint.profiler.attribution.replay import arrivals, hook_batches, replay_online, resample
from wattprint.profiler.meters.replay import readings_from_samples
from wattprint.profiler.twin.simulate import WorkloadSpec, simulate

_F, _FU = COEF_NAMES.index("energy_per_flop_j"), COEF_NAMES.index("energy_per_flop_util_j")


def test_only_compute_bound_steps_off_the_cap_with_an_unknown_energy_per_flop_hold():
    flop_j = np.array([30.0, 0.1, 30.0, 30.0])
    step_j = np.array([34.0, 3.0, 34.0, 34.0])
    capped = np.array([False, False, True, False])
    sigma = np.array([0.05, 0.9, 0.9, 0.05])  # the decode step (flops 3 % of it) is uncertain: no matter
    assert not undetermined(flop_j, step_j, capped, sigma)
    sigma[3] = 2 * HOLD_REL_SIGMA  # a compute-bound step, free of the cap, not yet known
    assert undetermined(flop_j, step_j, capped, sigma)
    assert not undetermined(flop_j, step_j, np.ones(4, dtype=bool), sigma)  # at the cap, its energy is the cap's


def test_the_energy_per_flop_is_known_only_where_the_rows_saw_that_utilisation():
    rng = np.random.default_rng(3)
    theta = np.zeros(len(COEF_NAMES))
    theta[_F], theta[_FU] = 5.5e-13, 2.8e-13
    lam = np.eye(len(COEF_NAMES)) * 1e-6
    lam[_F, _F] = lam[_FU, _FU] = 49.0 / (0.5 * 6.9e-13) ** 2  # the prior: sigma half the profile's value

    def rows(u_lo, u_hi, n=200):
        X = np.zeros((n, len(COEF_NAMES)))
        F = rng.uniform(1e12, 3e13, n)
        u = rng.uniform(u_lo, u_hi, n)
        X[:, _F], X[:, _FU] = F, F * u
        for j in range(len(COEF_NAMES)):
            if j not in (_F, _FU):
                X[:, j] = rng.uniform(0.1, 1.0, n)  # the other coefficients, well determined
        return X, X @ theta + rng.normal(0.0, 0.5, n)

    ne = NormalEquations()
    ne.add(*rows(0.0, 0.1))  # short prompts only
    lo, hi = flop_energy_rel_sigma(ne, theta, lam, 49.0, np.array([0.05, 0.9]))
    assert lo < HOLD_REL_SIGMA < hi
    ne.add(*rows(0.6, 0.9, n=20))  # a few long prompts determine it
    assert flop_energy_rel_sigma(ne, theta, lam, 49.0, np.array([0.9]))[0] < HOLD_REL_SIGMA


@pytest.fixture(scope="module")
def opens_long(llama8b, h100):
    """H100 twin, 0.2 requests/s: a 2,162-token prompt at the start, the next long one ~65 s later."""
    return simulate(llama8b, h100, WorkloadSpec(requests=20, rate_rps=0.2, seed=1065, busy_s=40, quiet_s=4),
                    record_lead_s=0.01)


def test_a_long_first_prompt_is_priced_once_the_fit_knows_its_utilisation(opens_long, llama8b, h100, monkeypatch):
    sim = opens_long
    truth_pre = sum(t.prefill_j for t in sim.truth.values())

    def run():
        on = replay_online(sim.steps, readings_from_samples(sim.energy, "simulated"), llama8b, h100,
                           source="simulated", meter_hz=50.0)
        first = {r.id: r for r in on.requests}["req-000000"]
        cons = sum(r.energy_j for r in on.requests) + on.totals.idle_j
        assert cons == pytest.approx(on.totals.measured_j + on.totals.extrapolated_j, rel=1e-9)
        return first.prefill_j / sim.truth["req-000000"].prefill_j - 1, \
            sum(r.prefill_j for r in on.requests) / truth_pre - 1

    first_err, total_err = run()
    assert abs(first_err) < 0.05 and abs(total_err) < 0.01, (first_err, total_err)
    monkeypatch.setattr(pacing, "MAX_HOLD_WINDOWS", 0)  # no hold: settled at the prior's slope
    first_err0, total_err0 = run()
    assert first_err0 < -0.10 and abs(total_err0) > 0.015, (first_err0, total_err0)


def _settled_at(sim, g, hw, t_stop: float) -> float | None:
    """The last settled instant when the sidecar's feed has reached ``t_stop`` (trace time)."""
    on = OnlineAttributor(g, hw, n_devices=1, source="simulated", fit_lookahead_s=20.0)
    polls = resample(readings_from_samples(sim.energy, "simulated"), 50.0)
    for t, kind, item in arrivals(polls, hook_batches(sim.steps)):
        if t > t_stop:
            break
        on.add_reading(item) if kind == 0 else on.add_steps(item)
        on.advance(t)
    return on.settled_until_s


def test_the_hold_is_bounded_in_time_and_yields_to_memory(opens_long, llama8b, h100, monkeypatch):
    sim = opens_long
    prefill_at = min(s.t_start for s in sim.steps if any(e.prefill_tokens >= 2048 for e in s.requests))
    assert prefill_at < 10.0
    # 68 s in: the lead (20 s here) has long passed the long prompt's block; the next long prompt (71 s) has
    # not come
    held = _settled_at(sim, llama8b, h100, 68.0)
    assert held is None or held <= prefill_at  # waiting for the fit to know that step's energy per FLOP
    monkeypatch.setattr(pacing, "MAX_HOLD_WINDOWS", 5)  # at most five windows (10 s) past the lead
    assert _settled_at(sim, llama8b, h100, 68.0) > prefill_at
    monkeypatch.setattr(pacing, "MAX_HOLD_WINDOWS", 150)
    monkeypatch.setattr(pacing, "MAX_LEAD_ENTRIES", 0)  # memory first: no hold while entries pile up
    assert _settled_at(sim, llama8b, h100, 68.0) > prefill_at
