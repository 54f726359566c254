"""Access conditions per usage stratum (issue 10): what a policy file says, who may use which stratum,
the rolling energy budgets, the admission decision and the audit of a ledger against a policy.

* :mod:`.config` - ``configs/policy.yaml``: parsing and validation (``FILE:LINE: reason``);
* :mod:`.keys` - API keys -> strata (kept as SHA-256 digests only), and the stratum a request gets;
* :mod:`.budget` - rolling energy budgets in a bounded number of time buckets;
* :mod:`.decide` - admit / observe / deprioritize / reject, with the Retry-After delay;
* :mod:`.audit` - a ledger replayed against a policy (``wattprint policy report``).

Pure and small: no threads, no I/O except reading the files they are given.
"""
