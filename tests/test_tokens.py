"""Token accounting from what the engine knows (issue 8): the prompt includes tokens served from the
prefix cache, the first sampled token is output, recomputation after a preemption is prefill work."""


from wattprint.profiler.attribution.offline import attribute
from wattprint.profiler.attribution.table import token_counts
from wattprint.profiler.core.records import EnergySample, RequestEntry, StepRecord


def counts(prefill, decode, prompt=0, cached=-1, given=-1):
    return token_counts({"prefill_tokens": prefill, "decode_tokens": decode, "prompt_tokens": prompt,
                         "cached_tokens": cached, "given_output_tokens": given})


def test_prefix_cache_hit_counts_the_first_sampled_token():
    # a 100-token prompt whose first 32 tokens were cached: 68 prefilled, then 4 decode steps
    assert counts(68, 4, prompt=100, cached=32) == (100, 32, 5)


def test_without_the_prompt_length_the_cached_tokens_complete_it():
    assert counts(68, 4, cached=32) == (100, 32, 5)


def test_the_engines_output_count_wins_over_the_step_rule():
    # preempted and recomputed: 10 prompt + 10 prefill recompute; the engine says 7 tokens came out
    assert counts(20, 5, prompt=10, cached=0, given=7) == (10, 0, 7)


def test_an_unfinished_prefill_has_no_output():
    assert counts(40, 0, prompt=100, cached=0) == (100, 0, 0)


def test_attribution_reports_cached_prompt_tokens():
    e = lambda *a, **k: RequestEntry(*a, **k)  # noqa: E731
    steps = [
        StepRecord(0, 1.00, 1.05, [e("a", 64, 0, 0, prompt_tokens=64)]),
        StepRecord(1, 1.06, 1.08, [e("a", 0, 1, 64), e("b", 36, 0, 48, prompt_tokens=84)]),  # b: 48 cached
        StepRecord(2, 1.09, 1.11, [e("a", 0, 1, 65, finished=True, output_tokens=3),
                                   e("b", 0, 1, 84, finished=True, output_tokens=2)]),
    ]
    samples = [EnergySample(0.9 + 0.02 * i, 0, 50.0 * (i // 3), "simulated") for i in range(20)]
    from wattprint.configs import config_dir
    from wattprint.profiler.core.costmodel import geometry_from_config
    from wattprint.profiler.core.hardware import load_profile

    g = geometry_from_config(config_dir() / "models" / "llama-3.1-8b.json")
    got = {r.id: r for r in attribute(steps, samples, g, load_profile("h100-sxm"), source="simulated").requests}
    assert (got["a"].prompt_tokens, got["a"].cached_prompt_tokens, got["a"].output_tokens) == (64, 0, 3)
    assert (got["b"].prompt_tokens, got["b"].cached_prompt_tokens, got["b"].output_tokens) == (84, 48, 2)
    assert got["b"].energy_j > 0
