"""Alert webhooks in the Prometheus Alertmanager webhook format (version "4"), signed.

Every action becomes one POST whose body is what Alertmanager's
``webhook_config`` sends, so any existing Alertmanager receiver (PagerDuty
bridges, chat bots, ticketing) works unchanged. The request is signed per the
Standard Webhooks specification with the ``standardwebhooks`` package:
``webhook-id`` is the action's ``action_id`` (stable across redeliveries, so
receivers drop duplicates), ``webhook-timestamp`` is the time of this attempt
and ``webhook-signature`` is ``v1,<base64 HMAC-SHA256>`` over
``id.timestamp.body``.

Mapping:

* ``status``: ``firing`` for alert and freeze, ``resolved`` for unfreeze.
* ``labels``: ``alertname`` (``FanoutAnomaly`` for the fan-out detector,
  ``ReplyAllStorm`` for everything about reply-alls, freezes and unfreezes),
  ``list`` and ``sender`` when known, ``severity`` (``critical`` for freezes and
  their unfreezes, ``warning`` for alerts).
* ``fingerprint``: 16 hex digits of a hash of the incident's identity:
  alertname and list (or sender, for an alert about no list). A freeze and the
  unfreeze that ends it share it; like Alertmanager's own fingerprint (a hash
  of the label set) it recurs if the same list storms again later. The
  ``sender`` label is left out of it on purpose: the unfreeze names a
  different sender (or none) than the freeze.
* ``startsAt``: the triggering event's time; for an unfreeze, the time of the
  freeze when this process delivered it, else the unfreeze's own time.
  ``endsAt``: the unfreeze's time when resolved, else ``0001-01-01T00:00:00Z``
  (open-ended, as Alertmanager sends for firing alerts).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Optional

from detectors.policy import Action
from stream_jobs.actions.sinks.base import Rejected, Sink, SinkError, retryable_status, url_tag

#: Alertmanager's "zero time" for an alert that has not ended.
ZERO_TIME = "0001-01-01T00:00:00Z"
RECEIVER = "stormguard"


def rfc3339(epoch: float) -> str:
    """Epoch seconds as RFC 3339 UTC with milliseconds.

    >>> rfc3339(1479376800.5)
    '2016-11-17T10:00:00.500Z'
    """
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alertname(action: Action) -> str:
    return "FanoutAnomaly" if action.detector == "fanout" else "ReplyAllStorm"


def incident_labels(action: Action) -> dict[str, str]:
    """The labels that identify one incident (the ``groupLabels``)."""
    labels = {"alertname": alertname(action)}
    if action.list:
        labels["list"] = action.list
    elif action.sender:
        labels["sender"] = action.sender
    return labels


def fingerprint(action: Action) -> str:
    """Stable per incident: a freeze and its unfreeze share it.

    >>> from detectors.policy import Action
    >>> f = Action(kind="freeze", list="all@nhs.net", sender="a@nhs.net", event_time=1.0, detector="reply_velocity",
    ...            score=9.0, message_id="m1", reason="r")
    >>> u = Action(kind="unfreeze", list="all@nhs.net", sender=None, event_time=9.0, detector="operator",
    ...            score=0.0, message_id=None, reason="done", actor="ops")
    >>> fingerprint(f) == fingerprint(u), len(fingerprint(f))
    (True, 16)
    """
    ident = "\x00".join(f"{k}={v}" for k, v in sorted(incident_labels(action).items()))
    return hashlib.blake2b(ident.encode(), digest_size=8).hexdigest()


def group_key(labels: dict[str, str]) -> str:
    inner = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(labels.items()))
    return "{}:{" + inner + "}"


def _summary(action: Action) -> str:
    where = action.list or action.sender or "?"
    if action.kind == "freeze":
        if not action.enforced:
            return f"Reply-all storm on {where}: Stormguard would freeze the list (shadow mode: nothing held)"
        return f"Reply-all storm on {where}: list frozen (posts held for moderators)"
    if action.kind == "unfreeze":
        if not action.enforced:
            return f"Reply-all storm on {where} over: Stormguard would release the list (shadow mode)"
        return f"Reply-all storm on {where} over: list released"
    if alertname(action) == "FanoutAnomaly":
        target = f" to {action.list}" if action.list else ""
        return f"Unusual fan-out from {action.sender or '?'}{target}"
    return f"Possible reply-all storm on {where}"


def alertmanager_payload(action: Action, starts_at: Optional[float] = None, external_url: str = "") -> dict:
    """The Alertmanager webhook (version 4) body for one action."""
    status = "resolved" if action.kind == "unfreeze" else "firing"
    labels = {"alertname": alertname(action)}
    if action.list:
        labels["list"] = action.list
    if action.sender:
        labels["sender"] = action.sender
    labels["severity"] = "warning" if action.kind == "alert" else "critical"
    description = (f"{action.reason} (action {action.kind} by {action.actor}; detector {action.detector}, "
                   f"score {action.score:g}" + (f", message {action.message_id}" if action.message_id else "") + ")")
    annotations = {
        "summary": _summary(action),
        "description": description,
        "action": action.kind,
        "action_id": action.action_id,
        "detector": action.detector,
        "score": f"{action.score:g}",
        "actor": action.actor,
        "enforced": "true" if action.enforced else "false",
    }
    if action.message_id:
        annotations["message_id"] = action.message_id
    if action.kind == "unfreeze":
        starts, ends = rfc3339(starts_at if starts_at is not None else action.event_time), rfc3339(action.event_time)
    else:
        starts, ends = rfc3339(action.event_time), ZERO_TIME
    alert = {
        "status": status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": starts,
        "endsAt": ends,
        "generatorURL": external_url,
        "fingerprint": fingerprint(action),
    }
    group = incident_labels(action)
    return {
        "version": "4",
        "groupKey": group_key(group),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": RECEIVER,
        "groupLabels": group,
        "commonLabels": dict(labels),
        "commonAnnotations": dict(annotations),
        "externalURL": external_url,
        "alerts": [alert],
    }


class WebhookSink(Sink):
    """POST every action, Alertmanager-v4 shaped and Standard-Webhooks signed, to one URL."""

    kind = "webhook"
    #: Freeze start times remembered for the ``startsAt`` of their unfreeze (bounded).
    MAX_REMEMBERED = 10_000

    def __init__(self, url: str, secret: str, name: Optional[str] = None, timeout: float = 10.0,
                 external_url: str = ""):
        from standardwebhooks import Webhook

        super().__init__(name or f"webhook-{url_tag(url)}")
        self.url = url
        self.timeout = timeout
        self.external_url = external_url
        try:
            self._signer = Webhook(secret)
        except Exception:
            # Never echo the secret itself.
            from stream_jobs.settings import SettingsError

            raise SettingsError("STORMGUARD_WEBHOOK_SECRET is not a valid whsec_<base64> secret") from None
        self._session = None
        self._started: OrderedDict[str, float] = OrderedDict()

    async def start(self) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "stormguard-deliver"})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _starts_at(self, action: Action) -> Optional[float]:
        fp = fingerprint(action)
        if action.kind == "freeze":
            self._started[fp] = action.event_time
            self._started.move_to_end(fp)
            while len(self._started) > self.MAX_REMEMBERED:
                self._started.popitem(last=False)
            return None
        if action.kind == "unfreeze":
            return self._started.get(fp)
        return None

    def render(self, action: Action) -> bytes:
        payload = alertmanager_payload(action, self._starts_at(action), self.external_url)
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()

    def sign(self, action_id: str, body: bytes, now: Optional[datetime] = None) -> dict[str, str]:
        """Standard Webhooks headers for ``body``, timestamped now (each retry is signed afresh)."""
        now = now or datetime.now(timezone.utc)
        return {
            "webhook-id": action_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signer.sign(action_id, now, body.decode()),
            "Content-Type": "application/json",
        }

    async def deliver(self, action: Action) -> None:
        await self.start()
        body = self.render(action)
        async with self._session.post(self.url, data=body, headers=self.sign(action.action_id, body)) as resp:
            if 200 <= resp.status < 300:
                return
            if retryable_status(resp.status):
                raise SinkError(f"HTTP {resp.status}")
            raise Rejected(f"HTTP {resp.status}")
