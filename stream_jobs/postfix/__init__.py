"""Postfix adapters: lists (virtual(5) maps), ingest (the maillog as events), list_state and policy (the HOLD service)."""
