"""Mailman 3: a freeze puts the list into emergency moderation; an unfreeze lifts it.

Emergency moderation (the list setting ``emergency``) holds every post for
the list's moderators instead of distributing it: nothing is lost, the storm
just stops reaching 840,000 mailboxes. Through Mailman's REST API with
``mailmanclient`` (its synchronous client, in a worker thread: the async one
is read-only). Setting the flag is idempotent, so redeliveries are harmless.
A list this Mailman does not know (REST 404) is skipped: the address may
belong to another list manager (see the generic HTTP sink).
"""

from __future__ import annotations

import asyncio
from typing import Optional
from urllib.error import HTTPError

from detectors.policy import Action
from stream_jobs.actions.sinks.base import Rejected, Sink, SinkError, Skip, retryable_status


def rest_base(url: str) -> str:
    """Mailman's REST root with its API version: ``http://h:8001`` → ``http://h:8001/3.1``.

    >>> rest_base("http://127.0.0.1:8001"), rest_base("http://127.0.0.1:8001/3.0/")
    ('http://127.0.0.1:8001/3.1', 'http://127.0.0.1:8001/3.0')
    """
    url = url.rstrip("/")
    last = url.rsplit("/", 1)[-1]
    if last.startswith("3.") and last[2:].isdigit():
        return url
    return url + "/3.1"


class MailmanSink(Sink):
    kind = "mailman"

    def __init__(self, url: str, user: str, password: Optional[str], timeout: float = 10.0,
                 name: Optional[str] = None):
        super().__init__(name or "mailman")
        self.base = rest_base(url)
        self.user = user
        self.password = password
        self.timeout = timeout
        self._client = None

    def accepts(self, action: Action) -> bool:
        # a shadow-mode decision holds nothing
        return action.kind in ("freeze", "unfreeze") and bool(action.list) and action.enforced

    def _connect(self):
        if self._client is None:
            from mailmanclient import Client

            timeout = self.timeout

            def with_timeout(params: dict) -> dict:
                # mailmanclient calls requests without a timeout; a hung Mailman must not hang delivery.
                params["timeout"] = timeout
                return params

            self._client = Client(self.base, self.user, self.password, request_hooks=[with_timeout])
        return self._client

    def set_emergency(self, address: str, on: bool) -> bool:
        """Blocking: set the flag; True if it changed, False if it already had that value."""
        from mailmanclient import MailmanConnectionError

        client = self._connect()
        try:
            mlist = client.get_list(address)
            settings = mlist.settings
            if bool(settings["emergency"]) == on:
                return False
            settings["emergency"] = on
            settings.save()
            return True
        except HTTPError as exc:
            if exc.code == 404:
                raise Skip("Mailman does not manage this list") from None
            if retryable_status(exc.code):
                raise SinkError(f"Mailman REST answered HTTP {exc.code}") from None
            raise Rejected(f"Mailman REST answered HTTP {exc.code}") from None
        except MailmanConnectionError:
            raise SinkError("cannot connect to Mailman REST API") from None

    def emergency(self, address: str) -> bool:
        """Blocking: the list's current emergency flag."""
        return bool(self._connect().get_list(address).settings["emergency"])

    async def deliver(self, action: Action) -> None:
        await asyncio.to_thread(self.set_emergency, action.list, action.kind == "freeze")
