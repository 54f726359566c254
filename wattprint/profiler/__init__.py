"""wattprint.profiler."""
