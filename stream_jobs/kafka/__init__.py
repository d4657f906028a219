"""Kafka plumbing: broker (the embedded broker), replay (producers and ``stormguard replay``), topics (topic admin)."""
