"""Calibration: plans, runs, analysis and fit of a GPU's energy coefficients."""
