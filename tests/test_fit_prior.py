"""The fit's prior and row weights (issue 8): the decay tie, weights by the power at a row's ends, the
online fit's capped steps."""

import numpy as np

from wattprint.profiler.attribution.coefficients import prior_coefficients
from wattprint.profiler.attribution.fit import (
    NormalEquations,
    identified,
    prior_mean,
    prior_precision,
    row_weights,
    solve,
)
from wattprint.profiler.core.hardware import load_profile


def _prior():
    return prior_coefficients(load_profile("h100-sxm"), 1)


def test_prior_ties_the_idle_decay_to_static_power():
    c = _prior()
    theta = prior_mean(c)
    assert theta[5] == c.static_power_w - c.idle_power_w
    lam = prior_precision(c)
    d = 1.0 / np.sqrt(np.diag(lam))
    assert np.allclose(lam, lam.T) and np.all(np.linalg.eigvalsh(lam * np.outer(d, d)) > 0)
    # with no data the fit is the prior; evidence on static power alone moves the decay with it
    assert np.allclose(solve(NormalEquations(), theta, lam), theta)
    ne = NormalEquations()
    X = np.zeros((50, len(theta)))
    X[:, 0] = 1.0  # one second of static power per row, 10 % more than the profile's
    ne.add(X, np.full(50, 1.1 * c.static_power_w))
    fit = solve(ne, theta, lam)
    assert fit[0] > 1.05 * c.static_power_w
    assert fit[5] > theta[5] + 0.3 * (fit[0] - theta[0])  # the tie carries the change to the decay
    ok = identified(ne, lam)
    assert ok[0] and not ok[1]


def test_rows_ending_in_idle_weigh_more_than_busy_ones():
    tdp = 700.0
    b_t = np.arange(0.0, 3.0, 0.1)
    power = np.where(b_t < 1.5, 600.0, 70.0)
    b_e = np.concatenate([[0.0], np.cumsum(power[:-1] * 0.1)])
    w = row_weights(b_t, b_e, 5, tdp)
    assert len(w) == len(b_t) - 5
    assert w[-1] / w[0] > 30  # both ends idle vs both ends busy: (600/70)² ≈ 73, floored at tdp/10
    assert np.all(np.isfinite(w)) and np.all(w > 0)
    # a counter that does not move (zero power) is floored, never infinitely informative
    assert np.all(np.isfinite(row_weights(b_t, np.zeros_like(b_t), 5, tdp)))


def test_solve_keeps_physical_constraints_with_a_full_prior_matrix():
    c = _prior()
    theta0 = prior_mean(c)
    lam = prior_precision(c)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ne = NormalEquations()
        X = np.abs(rng.normal(size=(40, 7))) * np.array([1.0, 1e13, 5e12, 1e11, 1.0, 1.0, 0.01])
        ne.add(X, rng.normal(0.0, 500.0, 40))
        th = solve(ne, theta0, lam)
        assert np.all(np.delete(th, 2) >= 0)
        assert th[1] + th[2] >= -1e-30


def test_fit_recovers_the_twins_static_power_and_energy_per_byte_at_high_load():
    """Busy memory-bound steps barely separate static power from energy per byte: the fit must not let
    a pull on the energy per FLOP (the profile states no utilisation slope) push them apart."""
    from wattprint.configs import config_dir
    from wattprint.profiler.attribution.offline import attribute
    from wattprint.profiler.core.costmodel import geometry_from_config
    from wattprint.profiler.twin.power import GpuTwin
    from wattprint.profiler.twin.simulate import WorkloadSpec, simulate

    g = geometry_from_config(config_dir() / "models" / "qwen2.5-7b.json")
    hw = load_profile("a100-sxm")
    sim = simulate(g, hw, WorkloadSpec(requests=200, rate_rps=15, seed=1005), poll_hz=1000.0,
                   twin=GpuTwin(hw, tail_fraction=0.0))
    fit = attribute(sim.steps, sim.energy, g, hw, source="simulated").fit[0]
    gain = sim.gains[0]
    assert abs(fit["static_power_w"] / (gain * hw.static_power_w) - 1) < 0.04
    assert abs(fit["energy_per_byte_j"] / (gain * hw.energy_per_byte_j) - 1) < 0.04


def test_rows_from_the_first_sample_are_left_out_of_the_fit():
    from wattprint.profiler.attribution.columns import StepColumns
    from wattprint.profiler.attribution.fit import fit_rows

    c = _prior()
    cols = StepColumns.steps_only(np.array([0.05, 0.3]), np.array([0.25, 0.6]), np.array([1e12, 1e12]),
                                  np.array([1e9, 1e9]), np.array([10, 10]), [])
    b_t = np.linspace(0.0, 1.0, 11)
    b_e = np.linspace(0.0, 200.0, 11)
    X, y = fit_rows(cols, c, b_t, b_e, 0.0, -1e9, lag=2)
    X0, y0 = fit_rows(cols, c, b_t, b_e, 0.0, -1e9, lag=2, first_is_sample=True)
    assert np.all(X0[0] == 0) and y0[0] == 0
    assert np.allclose(X0[1:], X[1:]) and np.allclose(y0[1:], y[1:])
