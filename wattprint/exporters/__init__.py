"""wattprint.exporters."""
