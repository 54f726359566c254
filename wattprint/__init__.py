"""wattprint: a GPU-native energy profiler for LLM inference."""

__version__ = "0.1.0"
