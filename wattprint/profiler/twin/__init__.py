"""The simulated GPU twin: power and counter model, trace simulator, tiny random model."""
