"""Benchmarks (`ratchet bench ...`): simulations and timings that print figures."""
