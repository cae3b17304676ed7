"""Verdict: the judge's sequential test, the screen on a first run, step calibration."""
