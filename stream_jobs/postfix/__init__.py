"""Postfix adapters: the maillog ingest (``stormguard ingest postfix-log``) and the policy service."""
