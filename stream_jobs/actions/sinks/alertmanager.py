"""Prometheus Alertmanager: every action becomes an alert ``POST``ed to ``/api/v2/alerts``.

Operators already route alerts through Alertmanager (grouping, silences,
inhibition, on-call receivers); Stormguard pushes its alerts there as
Prometheus does. ``STORMGUARD_ALERTMANAGER_URLS`` is one Alertmanager or an
HA set: each alert goes to every URL (the peers share silences and
notifications, not alerts). An attempt succeeds when at least one accepts it,
as for Prometheus; the others catch up at the next re-send.

One alert per incident
----------------------
* ``labels`` (the alert's identity in Alertmanager): ``alertname``
  (``ReplyAllStorm``, or ``FanoutAnomaly`` for the fan-out detector),
  ``list`` (else ``sender``, for an alert about no list), ``severity``
  (``critical`` for a freeze and for a freeze the hourly cap refused,
  ``warning`` for an alert, ``info`` for anything decided in shadow mode),
  ``detector``, ``enforced`` (``"false"`` in shadow mode) and ``app_id``
  (``STORMGUARD_APP_ID``: which Stormguard said it).
* ``annotations``: ``summary`` ("list frozen", or "would freeze" in shadow
  mode), ``description`` (reason, detector, score, message, who), and
  ``runbook_url`` (``STORMGUARD_ALERTMANAGER_RUNBOOK_URL``), plus ``action_id``,
  ``message_id``, ``sender``, ``actor``, ``score``.
* ``startsAt``: the triggering event's time; ``generatorURL``:
  ``STORMGUARD_EXTERNAL_URL`` (``{list}`` in either URL is the list, encoded).

How long an alert lasts
-----------------------
* **freeze**: firing until its unfreeze. Alertmanager forgets an alert at its
  ``endsAt``, so, as Prometheus does, every firing freeze is posted with
  ``endsAt`` = now + 4 × ``STORMGUARD_ALERTMANAGER_RESEND_INTERVAL`` and re-posted
  every interval while the freeze lasts (whatever Alertmanager's
  ``resolve_timeout``). Should this process stop, the alerts end by
  themselves within those 4 intervals rather than fire for ever.
* **unfreeze**: the freeze's alert (same labels) is posted again with
  ``endsAt`` = the unfreeze's time: resolved. The list's open warnings end with it.
* **alert**: a moment, not a state: posted once with ``endsAt`` = now +
  ``STORMGUARD_ALERTMANAGER_ALERT_TTL`` (1 h), not re-sent.

After a restart
---------------
The firing alerts are kept in memory. When ``stormguard deliver`` starts, the
runner reads ``stormguard.actions`` from its beginning up to this sink's
committed offsets (what it had delivered) before it delivers anything, and
hands those actions to :meth:`AlertmanagerSink.recover`: a freeze without a
later unfreeze is firing (shadow ones too, which ``stormguard.list-state`` never
shows), and is re-posted at once. The rest is delivered in order, as always. A freeze
older than the topic's retention is not found that way; its unfreeze then asks
Alertmanager itself (``GET /api/v2/alerts``) for the list's Stormguard alerts and
resolves those.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import quote

from detectors.engine import FREEZE_CAP_MARK
from detectors.policy import Action
from stream_jobs.actions.sinks.base import Rejected, Sink, SinkError, Skip, describe, retryable_status
from stream_jobs.actions.sinks.webhook import _summary, alertname, rfc3339
from stream_jobs.settings import SettingsError

log = logging.getLogger("stormguard.deliver")

API_PATH = "/api/v2/alerts"
#: An alert posted while firing is valid for this many re-send intervals (Prometheus uses 4).
VALID_INTERVALS = 4
#: Ended incidents remembered, so a redelivered unfreeze resolves the same labels again (bounded).
MAX_ENDED = 10_000


def api_base(url: str) -> str:
    """An Alertmanager's root, whether given with or without ``/api/v2/alerts``.

    >>> api_base("http://am:9093/"), api_base("https://ops.example/alertmanager/api/v2/alerts")
    ('http://am:9093', 'https://ops.example/alertmanager')
    """
    url = url.strip().rstrip("/")
    if url.endswith(API_PATH):
        url = url[: -len(API_PATH)]
    if not url.startswith(("http://", "https://")):
        raise SettingsError("STORMGUARD_ALERTMANAGER_URLS: each URL must start with http:// or https://")
    return url


def incident(action: Action) -> str:
    """What one storm is about: its list, else its sender."""
    return action.list or f"sender:{action.sender or '?'}"


def fill(template: str, action: Action) -> str:
    """``{list}`` and ``{alertname}`` in a URL template, percent-encoded.

    >>> from detectors.policy import Action
    >>> a = Action(kind="freeze", list="all+staff@nhs.net", sender=None, event_time=1.0, detector="d", score=1.0,
    ...            message_id=None, reason="r")
    >>> fill("https://wiki/storms#{alertname}?list={list}", a)
    'https://wiki/storms#ReplyAllStorm?list=all%2Bstaff%40nhs.net'
    """
    return template.replace("{list}", quote(action.list or "", safe="")).replace("{alertname}", alertname(action))


def severity(action: Action) -> str:
    if not action.enforced:
        return "info"  # shadow mode: nothing was held, nobody needs paging
    if action.kind != "alert" or FREEZE_CAP_MARK in action.reason:
        return "critical"  # a freeze, or a storm the hourly cap left running
    return "warning"


def labels_of(action: Action, app_id: str) -> dict[str, str]:
    labels = {"alertname": alertname(action)}
    if action.list:
        labels["list"] = action.list
    elif action.sender:
        labels["sender"] = action.sender
    labels.update(severity=severity(action), detector=action.detector,
                  enforced="true" if action.enforced else "false", app_id=app_id)
    return labels


def annotations_of(action: Action, runbook_url: str = "") -> dict[str, str]:
    when = rfc3339(action.event_time)
    if action.kind == "alert" and FREEZE_CAP_MARK in action.reason:
        summary = f"Reply-all storm on {action.list or '?'} NOT frozen: the freezes-per-hour cap was reached"
    else:
        summary = _summary(action)
    description = (f"{action.reason}. Detector {action.detector}, score {action.score:g}, at {when}"
                   + (f", message {action.message_id}" if action.message_id else "")
                   + (f", sender {action.sender}" if action.sender else "") + f"; decided by {action.actor}"
                   + ("" if action.enforced else "; shadow mode (STORMGUARD_ENFORCE=false): nothing was held") + ".")
    out = {"summary": summary, "description": description, "action_id": action.action_id,
           "score": f"{action.score:g}", "actor": action.actor}
    if action.message_id:
        out["message_id"] = action.message_id
    if action.sender:
        out["sender"] = action.sender
    if runbook_url:
        out["runbook_url"] = fill(runbook_url, action)
    return out


@dataclass
class Firing:
    """One alert this sink keeps alive (a freeze) or may end early (a warning)."""

    labels: dict
    annotations: dict
    starts_at: float
    generator_url: str = ""
    #: Wall-clock end of a warning (posted once); None for a freeze (re-sent until its unfreeze).
    until: Optional[float] = None

    def body(self, ends_at: float) -> dict:
        alert = {"labels": self.labels, "annotations": self.annotations, "startsAt": rfc3339(self.starts_at),
                 "endsAt": rfc3339(max(ends_at, self.starts_at))}
        if self.generator_url:
            alert["generatorURL"] = self.generator_url
        return alert


def _key(labels: dict) -> tuple:
    return tuple(sorted(labels.items()))


class AlertmanagerSink(Sink):
    """POST alerts to one Alertmanager or an HA set of them; keep the firing ones alive."""

    kind = "alertmanager"
    recovers = True

    def __init__(self, urls: Iterable[str], app_id: str = "stormguard", runbook_url: str = "",
                 external_url: str = "", resend_interval: float = 60.0, alert_ttl: float = 3600.0,
                 username: Optional[str] = None, password: Optional[str] = None,
                 bearer_token: Optional[str] = None, ca_file: Optional[str] = None,
                 cert_file: Optional[str] = None, key_file: Optional[str] = None, timeout: float = 10.0,
                 name: Optional[str] = None):
        super().__init__(name or "alertmanager")
        self.urls = [api_base(u) for u in urls]
        if not self.urls:
            raise SettingsError("STORMGUARD_ALERTMANAGER_URLS is empty")
        if len(set(self.urls)) != len(self.urls):
            raise SettingsError("STORMGUARD_ALERTMANAGER_URLS lists one Alertmanager twice")
        if bearer_token and (username or password):
            raise SettingsError("STORMGUARD_ALERTMANAGER_BEARER_TOKEN and basic auth (_USERNAME/_PASSWORD) "
                                "exclude each other")
        if bool(username) != bool(password):
            raise SettingsError("STORMGUARD_ALERTMANAGER_USERNAME and STORMGUARD_ALERTMANAGER_PASSWORD (or _FILE) "
                                "go together")
        if bool(cert_file) != bool(key_file):
            raise SettingsError("STORMGUARD_ALERTMANAGER_CERT_FILE and STORMGUARD_ALERTMANAGER_KEY_FILE go together")
        if not resend_interval > 0 or not alert_ttl > 0:
            raise SettingsError("STORMGUARD_ALERTMANAGER_RESEND_INTERVAL and _ALERT_TTL must be > 0")
        self.app_id = app_id
        self.runbook_url = runbook_url
        self.external_url = external_url
        self.resend_interval = resend_interval
        self.alert_ttl = alert_ttl
        self.timeout = timeout
        self._auth = (username, password) if username else None
        self._bearer = bearer_token
        self._ssl = self._ssl_context(ca_file, cert_file, key_file)
        self._session = None
        self._resender: Optional[asyncio.Task] = None
        #: incident (list, or "sender:…") -> {label key: Firing}
        self.active: dict[str, dict[tuple, Firing]] = {}
        #: incidents that ended -> their alerts, for a redelivered unfreeze (bounded, oldest forgotten)
        self._ended: OrderedDict[str, dict[tuple, Firing]] = OrderedDict()
        self.resends = 0

    @staticmethod
    def _ssl_context(ca_file, cert_file, key_file):
        if not (ca_file or cert_file):
            return None
        try:
            ctx = ssl.create_default_context(cafile=ca_file or None)
            if cert_file:
                ctx.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"STORMGUARD_ALERTMANAGER_CA_FILE/_CERT_FILE/_KEY_FILE: cannot load "
                                f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
        return ctx

    @property
    def _tls(self):
        return self._ssl if self._ssl is not None else True

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        import aiohttp

        if self._session is None:
            headers = {"User-Agent": "stormguard-deliver", "Content-Type": "application/json"}
            if self._bearer:
                headers["Authorization"] = f"Bearer {self._bearer}"
            elif self._auth:
                token = base64.b64encode(f"{self._auth[0]}:{self._auth[1]}".encode()).decode()
                headers["Authorization"] = f"Basic {token}"
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                  headers=headers)
        if self._resender is None:
            # Recovered freezes are re-posted at once; otherwise the first re-send is one interval away.
            first = 0.0 if self.firing() else self.resend_interval
            self._resender = asyncio.create_task(self._resend_forever(first), name=f"{self.name}:resend")

    async def close(self) -> None:
        if self._resender is not None:
            self._resender.cancel()
            try:
                await self._resender
            except (asyncio.CancelledError, Exception):
                pass
            self._resender = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- what is firing -----------------------------------------------------------------------------------
    def firing_for(self, action: Action, now: float) -> Firing:
        return Firing(labels=labels_of(action, self.app_id), annotations=annotations_of(action, self.runbook_url),
                      starts_at=min(action.event_time, now),
                      generator_url=fill(self.external_url, action) if self.external_url else "",
                      until=None if action.kind == "freeze" else now + self.alert_ttl)

    def _note(self, action: Action, now: float) -> tuple[str, list[Firing]]:
        """Update what is firing for ``action``; the alerts to post now (each with its endsAt)."""
        key = incident(action)
        if action.kind in ("freeze", "alert"):
            alert = self.firing_for(action, now)
            alerts = self.active.setdefault(key, {})
            known = alerts.get(_key(alert.labels))
            if known is not None and known.until is None:
                alert = known  # a redelivered freeze keeps its first startsAt
            alerts[_key(alert.labels)] = alert
            self._ended.pop(key, None)
            return key, [alert]
        ended = self.active.pop(key, None) or self._ended.get(key) or {}
        if ended:
            self._ended[key] = ended
            self._ended.move_to_end(key)
            while len(self._ended) > MAX_ENDED:
                self._ended.popitem(last=False)
        return key, list(ended.values())

    def recover(self, actions: Iterable[Action]) -> None:
        """Rebuild the firing freezes from the outbox's history, without posting anything."""
        now = time.time()
        for action in actions:
            if action.kind == "alert":
                continue  # posted with their own endsAt: Alertmanager ends them by itself
            self._note(action, now)
        count = sum(1 for alerts in self.active.values() for a in alerts.values() if a.until is None)
        if count:
            log.warning("%s: %d freeze(s) still firing in %s's history; re-posting them", self.name, count,
                        "stormguard.actions")

    def firing(self) -> list[Firing]:
        """Every alert kept alive now (freezes; warnings until their end)."""
        now = time.time()
        out = []
        for key in list(self.active):
            alerts = self.active[key]
            for label_key in [k for k, a in alerts.items() if a.until is not None and a.until <= now]:
                del alerts[label_key]  # a warning that ended by itself
            if not alerts:
                del self.active[key]
            out.extend(a for a in alerts.values() if a.until is None)
        return out

    # -- delivery -----------------------------------------------------------------------------------------
    async def deliver(self, action: Action) -> None:
        await self.start()
        now = time.time()
        key, alerts = self._note(action, now)
        if action.kind == "unfreeze":
            if not alerts:
                alerts = await self._ask_alertmanager(action)
            if not alerts:
                raise Skip("no Stormguard alert is firing for this list")
            over = annotations_of(action, self.runbook_url)
            bodies = []
            for alert in alerts:
                notes = dict(alert.annotations, summary=over["summary"],
                             resolution=f"{action.reason} (by {action.actor}, at {rfc3339(action.event_time)})")
                bodies.append(Firing(alert.labels, notes, alert.starts_at, alert.generator_url)
                              .body(min(action.event_time, now)))
            await self.post(bodies)
            return
        (alert,) = alerts
        ends = alert.until if alert.until is not None else now + VALID_INTERVALS * self.resend_interval
        await self.post([alert.body(ends)])

    async def _ask_alertmanager(self, action: Action) -> list[Firing]:
        """The list's Stormguard alerts Alertmanager holds (a freeze this process does not remember)."""
        filters = [f'list="{action.list}"', f'app_id="{self.app_id}"']
        found: dict[tuple, Firing] = {}
        from datetime import datetime

        for url in self.urls:
            try:
                async with self._session.get(url + API_PATH, ssl=self._tls,
                                             params=[("filter", f) for f in filters] + [("active", "true")]) as resp:
                    if resp.status != 200:
                        continue
                    for alert in await resp.json():
                        labels = dict(alert.get("labels") or {})
                        starts = datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00")).timestamp()
                        found[_key(labels)] = Firing(labels, dict(alert.get("annotations") or {}), starts,
                                                     alert.get("generatorURL") or "")
            except Exception as exc:  # one peer down: another may know
                log.info("%s: cannot ask an Alertmanager for open alerts (%s)", self.name, describe(exc))
        return list(found.values())

    async def post(self, alerts: list[dict]) -> None:
        """POST ``alerts`` to every Alertmanager; success when at least one accepted them."""
        body = json.dumps(alerts, ensure_ascii=False, separators=(",", ":")).encode()
        results = await asyncio.gather(*(self._post_one(url, body) for url in self.urls), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) < len(results):
            for exc in errors:  # the peer catches up at the next re-send
                log.warning("%s: one Alertmanager of %d did not take the alert (%s)", self.name, len(self.urls),
                            describe(exc))
            return
        if all(isinstance(e, Rejected) for e in errors):
            raise errors[0]
        transient = [e for e in errors if not isinstance(e, Rejected)]
        raise SinkError(f"no Alertmanager took the alert ({describe(transient[0])})")

    async def _post_one(self, url: str, body: bytes) -> None:
        async with self._session.post(url + API_PATH, data=body, ssl=self._tls) as resp:
            if 200 <= resp.status < 300:
                return
            detail = (await resp.text())[:200].strip().replace("\n", " ")
            if retryable_status(resp.status):
                raise SinkError(f"Alertmanager answered HTTP {resp.status}")
            raise Rejected(f"Alertmanager answered HTTP {resp.status}: {detail}")

    async def resend(self) -> int:
        """Post every firing freeze again, valid for another 4 intervals; how many."""
        alerts = self.firing()
        if not alerts:
            return 0
        ends = time.time() + VALID_INTERVALS * self.resend_interval
        await self.post([a.body(ends) for a in alerts])
        self.resends += 1
        return len(alerts)

    async def _resend_forever(self, first: float) -> None:
        from stream_jobs import metrics

        await asyncio.sleep(first)
        while True:
            try:
                await self.resend()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.DELIVERY_FAILURES.labels(sink=self.kind).inc()
                log.warning("%s: re-sending the firing freezes failed (%s); next try in %.0f s", self.name,
                            describe(exc), self.resend_interval)
            await asyncio.sleep(self.resend_interval)
