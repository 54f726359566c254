"""The energy timeline: the counter rule (change points, resets, publish times) and the sampler."""
