"""Dashboards as code and the local Prometheus the tests and previews scrape."""
