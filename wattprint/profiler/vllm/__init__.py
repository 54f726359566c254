"""wattprint.profiler.vllm."""
