"""The wire between the engine hook and the sidecar: messages, sender, receiver."""
