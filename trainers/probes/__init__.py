"""Artifact probes: pure functions that measure high-norm tokens, registers and attention."""
