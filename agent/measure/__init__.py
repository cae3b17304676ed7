"""Measure: launch a training run and time it from outside, evaluate its weights, know the devices."""
