"""Grafana annotations: a storm shows on dashboards as a region from freeze to unfreeze.

With ``grafana-client``'s async API (:class:`grafana_client.AsyncGrafanaApi`):

* freeze: ``POST /api/annotations`` with ``time`` (epoch ms of the triggering
  event), ``tags`` = ``stormguard``, ``freeze`` and the list address, ``text``,
  and ``dashboardUID`` when ``GRAFANA_DASHBOARD_UID`` is set (otherwise an
  organisation annotation, shown by any dashboard that queries those tags);
* unfreeze: ``PATCH /api/annotations/:id`` with ``timeEnd`` (and the same
  tags: Grafana's PATCH replaces tags with whatever list it is sent).

Which annotation to close is found in Grafana itself, not in local state:
``GET /api/annotations?tags=stormguard&tags=freeze&tags=<list>`` returns the
list's freeze annotations, and the *open* one is the one whose ``timeEnd`` is
not after its ``time`` (Grafana stores a point annotation with
``timeEnd == time``). So the delivery process can restart, move or run twice
and still close the right annotation, and both steps are idempotent: a
redelivered freeze finds the open annotation and adds none; a redelivered
unfreeze finds nothing open and does nothing.
"""

from __future__ import annotations

from typing import Optional
from urllib.parse import quote, urlsplit, urlunsplit

from detectors.policy import Action
from stream_jobs.actions.sinks.base import Rejected, Sink, SinkError, Skip, retryable_status

TAGS = ("stormguard", "freeze")
#: A shadow-mode decision is its own region, so a dashboard can show what would have been frozen.
SHADOW_TAGS = ("stormguard", "would-freeze")
#: Most freeze annotations of one list looked at when searching for the open one.
SEARCH_LIMIT = 100


def normalize_url(url: str) -> str:
    """grafana-client joins ``<path>api``: a sub-path must end in ``/``.

    >>> normalize_url("https://ops.example/grafana"), normalize_url("http://127.0.0.1:3000")
    ('https://ops.example/grafana/', 'http://127.0.0.1:3000')
    """
    parts = urlsplit(url)
    path = parts.path
    if path and path != "/" and not path.endswith("/"):
        path += "/"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def _ms(epoch: float) -> int:
    return int(round(epoch * 1000))


def is_open(annotation: dict) -> bool:
    """A freeze annotation not yet closed by an unfreeze (a point, not a region)."""
    start = annotation.get("time") or 0
    end = annotation.get("timeEnd") or 0
    return end <= start


class GrafanaSink(Sink):
    kind = "grafana"

    def __init__(self, url: str, token: Optional[str], dashboard_uid: Optional[str] = None, timeout: float = 10.0,
                 name: Optional[str] = None):
        super().__init__(name or "grafana")
        self.url = normalize_url(url)
        self.token = token
        self.dashboard_uid = dashboard_uid
        self.timeout = timeout
        self._api = None

    def accepts(self, action: Action) -> bool:
        return action.kind in ("freeze", "unfreeze") and bool(action.list)

    async def start(self) -> None:
        if self._api is None:
            from grafana_client import AsyncGrafanaApi

            # The token goes to GRAFANA_URL's host and nowhere else.
            self._api = AsyncGrafanaApi.from_url(self.url, credential=self.token, timeout=self.timeout)

    async def close(self) -> None:
        if self._api is not None:
            session = getattr(self._api.client, "s", None)
            if session is not None:
                await session.close()
            self._api = None

    def tags(self, address: str, enforced: bool = True) -> list[str]:
        return [*(TAGS if enforced else SHADOW_TAGS), address]

    async def open_annotations(self, address: str, enforced: bool = True) -> list[dict]:
        """The list's freeze (or, shadow, would-freeze) annotations that have no end yet (normally at most one)."""
        # grafana-client puts tags into the query string as they are: quote them ('+' in addresses).
        found = await self._call(self._api.annotations.find_annotations(
            tags=[quote(t, safe="@") for t in self.tags(address, enforced)], ann_type="annotation",
            dashboard_uid=self.dashboard_uid, limit=SEARCH_LIMIT))
        tags = set(self.tags(address, enforced))
        return [a for a in (found or []) if isinstance(a, dict) and tags <= set(a.get("tags") or ())
                and is_open(a)]

    async def deliver(self, action: Action) -> None:
        await self.start()
        address = action.list
        open_ = await self.open_annotations(address, action.enforced)
        if action.kind == "freeze":
            if open_:
                return  # already marked (a redelivery, or a freeze of a frozen list)
            text = (f"Stormguard froze {address}: {action.reason}" if action.enforced else
                    f"Stormguard would freeze {address} (shadow mode, nothing held): {action.reason}")
            if action.actor != "stormguard":
                text += f" (by {action.actor})"
            await self._call(self._api.annotations.add_annotation(
                dashboard_uid=self.dashboard_uid, time_from=_ms(action.event_time),
                tags=self.tags(address, action.enforced), text=text))
            return
        if not open_:
            raise Skip("no open freeze annotation for this list")
        end = _ms(action.event_time)
        for annotation in open_:
            start = annotation.get("time") or 0
            await self._call(self._api.annotations.partial_update_annotation(
                annotation["id"], time_to=max(end, start + 1),
                tags=list(annotation.get("tags") or self.tags(address, action.enforced))))

    async def _call(self, coro):
        from grafana_client.client import GrafanaClientError, GrafanaException

        try:
            return await coro
        except GrafanaClientError as exc:
            code = getattr(exc, "status_code", 0) or 0
            if retryable_status(code):
                raise SinkError(f"Grafana answered HTTP {code}") from None
            raise Rejected(f"Grafana answered HTTP {code}") from None
        except GrafanaException as exc:
            code = getattr(exc, "status_code", 0) or 0
            raise SinkError(f"Grafana answered HTTP {code}" if code else "Grafana request failed") from None
