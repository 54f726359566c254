"""wattprint.kernels."""
