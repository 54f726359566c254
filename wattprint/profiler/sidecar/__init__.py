"""The sidecar daemon, in small parts: ``daemon`` (the :class:`Sidecar`: wiring, threads, snapshot,
health), ``driver`` (the online attributor of the current engine session, per-model totals), ``sessions``
(engine sessions from their Hello, the saved Hello), ``sinks`` (the consumers of results: recent-results
store, histograms, ledger), ``stats`` (drop/error counters, power) and ``recorder`` (a trace of what it
received, for ``wattprint profile``). The socket and its queue are :mod:`wattprint.profiler.transport.receiver`."""
