"""Kafka plumbing: the embedded broker and the producers (``stormguard replay``)."""
