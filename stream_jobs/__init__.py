"""Stormguard shell: Faust app, broker, CLI, adapters."""
