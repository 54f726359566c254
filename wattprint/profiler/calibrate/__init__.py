"""Calibration: plans, runs, analysis and fit of a GPU's energy coefficients.

``plan`` (which runs) -> a device runs them (``simdevice`` or ``gpudevice`` with ``launchers``) ->
``analysis`` (one row per run) -> ``fit`` (with ``stats``) -> ``procedure`` (the whole procedure, returning
a hardware profile). The command ``wattprint calibrate`` is :mod:`wattprint.commands.calibrate`.
"""
