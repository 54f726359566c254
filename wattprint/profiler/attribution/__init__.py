"""Attribution: measured joules -> steps -> requests (offline and online drivers share every rule)."""
