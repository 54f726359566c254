"""Core data and pure functions: records, results, the cost model, hardware profiles, strata, efficiency."""
