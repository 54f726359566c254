"""wattprint.profiler.meters."""
