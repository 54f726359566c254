"""The commands: the only place where parts are wired together (one module per command)."""
