"""Efficiency classes (issue 10): the ideal energy of a request's work at the hardware's best operating
point over its attributed energy, in bands A-G."""

import dataclasses

import numpy as np
import pytest

from wattprint.profiler.attribution.offline import attribute
from wattprint.profiler.core.efficiency import IdealCost, bands, efficiency, efficiency_class
from wattprint.profiler.core.results import RequestResult
from wattprint.profiler.twin.simulate import WorkloadSpec, simulate


def test_bands_are_ordered_and_cover_everything():
    assert [n for n, _ in bands()] == list("ABCDEFG")
    assert bands()[-1][1] == 0.0
    assert efficiency_class(1.0) == "A" and efficiency_class(0.0) == "G" and efficiency_class(None) is None


def test_published_anchors_land_where_documented(llama8b, h100):
    """ML.ENERGY v3: Llama-3.1-8B on one H100 costs 0.070 J/token at batch 512 and 0.455 J at batch 8."""
    ideal = IdealCost.of(llama8b, h100)
    ctx = 1000
    flops = 2.0 * (llama8b.decoder_params + llama8b.head_params) + 4.0 * llama8b.layers * llama8b.heads * llama8b.head_dim * ctx
    kv = llama8b.kv_bytes_per_token * (ctx + 1)
    per_token = ideal.energy_j(flops, kv, 1)
    assert 0.015 < per_token < 0.05
    assert efficiency_class(efficiency(per_token, 0.070)) == "A"
    assert efficiency_class(efficiency(per_token, 0.455)) == "F"


def test_a_larger_model_serving_the_same_tokens_does_not_get_a_better_class(llama8b, h100):
    # every request arrives at once and the batch is capped: both models run the same batches (a slower
    # model would otherwise batch more under the same arrivals, which may rightly improve its class)
    spec = WorkloadSpec(requests=48, rate_rps=1e4, seed=4, max_seqs=16, prompt_max=800, output_max=300, busy_s=60)
    big = dataclasses.replace(llama8b, name="llama-2x", layers=2 * llama8b.layers)
    sim_small = simulate(llama8b, h100, spec)
    small_run = attribute(sim_small.steps, sim_small.energy, llama8b, h100, source="simulated")
    sim_big = simulate(big, h100, spec)
    big_run = attribute(sim_big.steps, sim_big.energy, big, h100, source="simulated")
    eff_small = np.median([r.efficiency for r in small_run.requests])
    eff_big = np.median([r.efficiency for r in big_run.requests])
    assert eff_big <= eff_small * 1.05  # same tokens, 2x the model: no better grade
    assert sorted(r.prompt_tokens for r in big_run.requests) == sorted(r.prompt_tokens for r in small_run.requests)


def test_batching_improves_the_class(llama8b, h100):
    one = WorkloadSpec(requests=40, rate_rps=50, seed=6, max_seqs=1, output_max=200, prompt_max=500, busy_s=60)
    batch = dataclasses.replace(one, max_seqs=32)
    res = {}
    for name, spec in (("one", one), ("batch", batch)):
        sim = simulate(llama8b, h100, spec)
        res[name] = attribute(sim.steps, sim.energy, llama8b, h100, source="simulated").requests
    e_one = np.median([r.efficiency for r in res["one"]])
    e_batch = np.median([r.efficiency for r in res["batch"]])
    assert e_batch > 1.5 * e_one
    order = "ABCDEFG"
    assert np.median([order.index(r.efficiency_class) for r in res["batch"]]) < \
        np.median([order.index(r.efficiency_class) for r in res["one"]])


def test_a_result_without_an_ideal_has_no_class():
    r = RequestResult("x", 1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 1, 1, 1.0, None, "simulated")
    assert r.efficiency is None and r.efficiency_class is None
    graded = RequestResult("x", 1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 1, 1, 1.0, None, "simulated", ideal_j=0.3)
    assert graded.efficiency == pytest.approx(0.3) and graded.efficiency_class == "B"
