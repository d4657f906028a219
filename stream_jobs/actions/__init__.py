"""Acting on decisions: ``stormguard deliver`` (the outbox) and the sinks it feeds."""
