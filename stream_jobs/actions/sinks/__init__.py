"""Where Stormguard's actions go: one small class per kind of receiver.

A sink turns one :class:`~detectors.policy.Action` into one effect on one
receiver: :mod:`~stream_jobs.actions.sinks.alertmanager` (an alert in Prometheus Alertmanager),
:mod:`~stream_jobs.actions.sinks.webhook` (a signed Alertmanager-style webhook),
:mod:`~stream_jobs.actions.sinks.grafana` (an annotation), :mod:`~stream_jobs.actions.sinks.mailman`
(a list's emergency moderation), :mod:`~stream_jobs.actions.sinks.http` (any HTTP endpoint).
What a sink is, and the contract of :meth:`Sink.deliver`, are in :mod:`~stream_jobs.actions.sinks.base`;
:func:`sinks_from_env` makes the sinks the environment configures.
"""

from __future__ import annotations

import os
from typing import Optional

from stream_jobs.actions.sinks.base import (RETRYABLE_STATUSES, Rejected, Sink, SinkError, Skip, describe,
                                            retryable_status, url_tag)
from stream_jobs.settings import SettingsError, secret

__all__ = ["Sink", "SinkError", "Rejected", "Skip", "describe", "retryable_status", "url_tag", "sinks_from_env",
           "RETRYABLE_STATUSES"]


def _float(env: dict, name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise SettingsError(f"{name} must be > 0")
    return value


def split_named_url(entry: str) -> tuple[Optional[str], str]:
    """``ops=https://...`` → ("webhook-ops", url); a bare URL → (None, url).

    >>> split_named_url("pager=https://h/x?a=b")
    ('webhook-pager', 'https://h/x?a=b')
    >>> split_named_url("https://h/x?a=b")
    (None, 'https://h/x?a=b')
    """
    head, sep, rest = entry.partition("=")
    if sep and head and all(c.isalnum() or c in "-_" for c in head):
        return f"webhook-{head}", rest.strip()
    return None, entry


def sinks_from_env(environ: Optional[dict] = None) -> list[Sink]:
    """Every sink whose settings are present in the environment (docs/actions.md lists them)."""
    env = os.environ if environ is None else environ
    timeout = _float(env, "STORMGUARD_DELIVER_TIMEOUT", 10.0)
    sinks: list[Sink] = []

    managers = [u.strip() for u in (env.get("STORMGUARD_ALERTMANAGER_URLS") or "").split(",") if u.strip()]
    if managers:
        from stream_jobs.actions.sinks.alertmanager import AlertmanagerSink

        sinks.append(AlertmanagerSink(
            managers, app_id=env.get("STORMGUARD_APP_ID") or "stormguard",
            runbook_url=env.get("STORMGUARD_ALERTMANAGER_RUNBOOK_URL") or "",
            external_url=env.get("STORMGUARD_EXTERNAL_URL") or "",
            resend_interval=_float(env, "STORMGUARD_ALERTMANAGER_RESEND_INTERVAL", 60.0),
            alert_ttl=_float(env, "STORMGUARD_ALERTMANAGER_ALERT_TTL", 3600.0),
            username=env.get("STORMGUARD_ALERTMANAGER_USERNAME") or None,
            password=secret("STORMGUARD_ALERTMANAGER_PASSWORD", env),
            bearer_token=secret("STORMGUARD_ALERTMANAGER_BEARER_TOKEN", env),
            ca_file=env.get("STORMGUARD_ALERTMANAGER_CA_FILE") or None,
            cert_file=env.get("STORMGUARD_ALERTMANAGER_CERT_FILE") or None,
            key_file=env.get("STORMGUARD_ALERTMANAGER_KEY_FILE") or None, timeout=timeout))

    urls = [u.strip() for u in (env.get("STORMGUARD_WEBHOOK_URLS") or "").split(",") if u.strip()]
    if urls:
        from stream_jobs.actions.sinks.webhook import WebhookSink

        webhook_secret = secret("STORMGUARD_WEBHOOK_SECRET", env)
        if not webhook_secret:
            raise SettingsError("STORMGUARD_WEBHOOK_URLS is set but STORMGUARD_WEBHOOK_SECRET (or _FILE) is not: "
                                "webhooks are always signed")
        for entry in urls:
            name, url = split_named_url(entry)
            sinks.append(WebhookSink(url, webhook_secret, name=name, timeout=timeout,
                                     external_url=env.get("STORMGUARD_EXTERNAL_URL") or ""))

    if env.get("GRAFANA_URL"):
        from stream_jobs.actions.sinks.grafana import GrafanaSink

        sinks.append(GrafanaSink(env["GRAFANA_URL"], secret("GRAFANA_TOKEN", env),
                                 dashboard_uid=env.get("GRAFANA_DASHBOARD_UID") or None, timeout=timeout))

    if env.get("STORMGUARD_MAILMAN_URL"):
        from stream_jobs.actions.sinks.mailman import MailmanSink

        sinks.append(MailmanSink(env["STORMGUARD_MAILMAN_URL"], env.get("STORMGUARD_MAILMAN_USER") or "restadmin",
                                 secret("STORMGUARD_MAILMAN_PASSWORD", env), timeout=timeout))

    if env.get("STORMGUARD_HTTP_URL"):
        from stream_jobs.actions.sinks.http import HttpSink

        kinds = [k.strip() for k in (env.get("STORMGUARD_HTTP_KINDS") or "freeze,unfreeze").split(",") if k.strip()]
        sinks.append(HttpSink(env["STORMGUARD_HTTP_URL"], method=env.get("STORMGUARD_HTTP_METHOD") or "POST",
                              body_template=env.get("STORMGUARD_HTTP_BODY") or None, kinds=kinds,
                              token=secret("STORMGUARD_HTTP_TOKEN", env), timeout=timeout))

    names = [s.name for s in sinks]
    if len(set(names)) != len(names):
        raise SettingsError("two sinks have the same name (is a webhook URL listed twice?)")
    return sinks
