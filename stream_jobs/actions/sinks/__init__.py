"""Where Stormguard's actions go: one small class per kind of receiver.

A sink turns one :class:`~detectors.policy.Action` into one effect on one
receiver (an Alertmanager-style webhook, a Grafana annotation, a Mailman
list's emergency moderation, any HTTP endpoint). ``stormguard deliver``
(:mod:`stream_jobs.actions.deliver`) feeds every sink from the ``stormguard.actions``
outbox, each sink through its own consumer group, and owns retries: a sink
only says whether one attempt worked.

The contract of :meth:`Sink.deliver`:

* return normally: the receiver accepted the action (or it was already in
  effect: every sink is idempotent, because the outbox is at-least-once);
* raise :class:`Rejected`: the receiver refused this request as such (a 4xx
  that a retry will not change); the runner retries a few times, then
  dead-letters the action;
* raise anything else (connection refused, timeout, 5xx, 429): transient; the
  runner retries with exponential backoff and jitter for as long as it takes.

Sinks never log secrets: not tokens, passwords or webhook secrets, and not
URLs that might carry them (they log :attr:`Sink.name`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

from detectors.policy import Action
from stream_jobs.settings import SettingsError, secret

__all__ = ["Sink", "SinkError", "Rejected", "Skip", "describe", "retryable_status", "url_tag", "sinks_from_env"]

#: HTTP statuses worth retrying: the receiver is busy, down or misconfigured
#: in a way an operator fixes without Stormguard changing its request.
RETRYABLE_STATUSES = frozenset({401, 403, 404, 408, 425, 429})


class SinkError(Exception):
    """A transient failure whose message is safe to log (no secrets, no URLs)."""


class Rejected(SinkError):
    """The receiver refused this very request; retrying it will not help."""


class Skip(Exception):
    """Nothing to do for this action on this receiver (e.g. a list it does not manage)."""


def describe(exc: BaseException) -> str:
    """A log-safe one-liner for a delivery failure: never a URL, token or password."""
    import asyncio

    if isinstance(exc, (SinkError, Skip)):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


def retryable_status(status: int) -> bool:
    """Whether an HTTP error status is transient (5xx, timeouts, throttling, auth being fixed)."""
    return status >= 500 or status in RETRYABLE_STATUSES


def url_tag(url: str) -> str:
    """A short stable name for a receiver URL that reveals nothing of it (URLs may hold tokens)."""
    return hashlib.blake2b(url.encode(), digest_size=4).hexdigest()


class Sink:
    """One receiver. Subclasses set :attr:`kind` and implement :meth:`deliver`."""

    #: Kind of receiver: the ``sink`` label of ``stormguard_delivery_failures_total``.
    kind: str = "sink"

    def __init__(self, name: Optional[str] = None):
        #: Unique, stable, secret-free name: the consumer group is ``<prefix>.<name>``.
        self.name = name or self.kind

    def accepts(self, action: Action) -> bool:
        """Whether this sink has anything to do for ``action`` (others are skipped and committed)."""
        return True

    async def start(self) -> None:
        """Open connections; called once before the first :meth:`deliver`."""

    async def deliver(self, action: Action) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


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

    urls = [u.strip() for u in (env.get("STORMGUARD_WEBHOOK_URLS") or "").split(",") if u.strip()]
    if urls:
        from stream_jobs.actions.sinks.alertmanager import WebhookSink

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
