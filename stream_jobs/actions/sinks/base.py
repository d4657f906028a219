"""What every sink is: :class:`Sink`, its errors, and the helpers the sinks share.

A sink turns one :class:`~detectors.policy.Action` into one effect on one
receiver (an alert in Alertmanager, a signed webhook, a Grafana annotation, a Mailman
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
from typing import Optional

from detectors.policy import Action

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
        return action.kind in ("alert", "freeze", "unfreeze")  # decisions: releases/discards stay on the topic

    #: Whether the runner hands this sink the outbox's history (:meth:`recover`) before it delivers.
    recovers = False

    def recover(self, actions) -> None:
        """Rebuild what the sink keeps in memory from every action still in the outbox, oldest first."""

    async def start(self) -> None:
        """Open connections; called once before the first :meth:`deliver`."""

    async def deliver(self, action: Action) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
