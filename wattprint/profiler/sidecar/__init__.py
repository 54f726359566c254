"""The sidecar daemon, in small parts: engine sessions, the attributor driver, result sinks."""
