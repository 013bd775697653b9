"""The run directory's state: the journal of committed layers, the run lock, stop signals,
injected faults (tests), the per-layer profile, and ``streamprune inspect``."""
