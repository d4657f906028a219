"""Stormguard functional core: event model, baselines, policy. Pure and deterministic."""
