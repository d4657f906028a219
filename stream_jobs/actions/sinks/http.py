"""Generic HTTP actuator: one configurable request per action, for any other list manager.

* ``STORMGUARD_HTTP_URL``: a URL template, e.g.
  ``https://lists.example/api/lists/{list}/{kind}``; placeholders are the
  action's fields (``{kind}``, ``{list}``, ``{sender}``, ``{event_time}``,
  ``{detector}``, ``{score}``, ``{message_id}``, ``{reason}``, ``{actor}``,
  ``{action_id}``) plus ``{frozen}`` (``true`` for freeze, ``false`` for
  unfreeze, empty for alerts); values are percent-encoded in the URL.
* ``STORMGUARD_HTTP_METHOD``: default ``POST``.
* ``STORMGUARD_HTTP_BODY``: a JSON template. A string that is exactly one
  placeholder (``"{score}"``) becomes the field's JSON value (number, null,
  boolean); placeholders inside longer strings are replaced by text. Default:
  the whole action as JSON. ``GET``/``DELETE`` send no body.
* ``STORMGUARD_HTTP_KINDS``: which kinds to send, default ``freeze,unfreeze``.
* ``STORMGUARD_HTTP_TOKEN`` (or ``_FILE``): sent as ``Authorization: Bearer``.

Every request carries ``Idempotency-Key: <action_id>`` (the same on every
retry), so the receiver can drop duplicates from the at-least-once outbox.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional
from urllib.parse import quote

from detectors.policy import Action
from stream_jobs.settings import SettingsError
from stream_jobs.actions.sinks.base import Rejected, Sink, SinkError, retryable_status, url_tag

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
FIELDS = ("kind", "list", "sender", "event_time", "detector", "score", "message_id", "reason", "actor", "action_id",
          "frozen")
KINDS = ("alert", "freeze", "unfreeze", "release", "discard")


def action_fields(action: Action) -> dict[str, Any]:
    values = {name: getattr(action, name) for name in FIELDS if name != "frozen"}
    values["frozen"] = {"freeze": True, "unfreeze": False}.get(action.kind)
    return values


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check(template: str, what: str) -> None:
    for name in _PLACEHOLDER.findall(template):
        if name not in FIELDS:
            raise SettingsError(f"{what}: unknown placeholder {{{name}}} (known: {', '.join(FIELDS)})")


def render_url(template: str, action: Action) -> str:
    """>>> from detectors.policy import Action
    >>> a = Action(kind="freeze", list="all+staff@nhs.net", sender=None, event_time=1.0, detector="d", score=1.0,
    ...            message_id=None, reason="r")
    >>> render_url("http://gw/lists/{list}/{kind}?frozen={frozen}", a)
    'http://gw/lists/all%2Bstaff@nhs.net/freeze?frozen=true'
    """
    values = action_fields(action)
    return _PLACEHOLDER.sub(lambda m: quote(_text(values[m.group(1)]), safe="@"), template)


def render_body(template: Any, action: Action) -> Any:
    """Fill a parsed JSON template.

    >>> from detectors.policy import Action
    >>> a = Action(kind="unfreeze", list="l@x", sender=None, event_time=2.5, detector="operator", score=0.0,
    ...            message_id=None, reason="ok", actor="ops")
    >>> render_body({"list": "{list}", "on": "{frozen}", "at": "{event_time}", "note": "{actor}: {reason}",
    ...              "tags": ["{kind}"]}, a)
    {'list': 'l@x', 'on': False, 'at': 2.5, 'note': 'ops: ok', 'tags': ['unfreeze']}
    """
    values = action_fields(action)
    if isinstance(template, str):
        whole = _PLACEHOLDER.fullmatch(template)
        if whole:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: _text(values[m.group(1)]), template)
    if isinstance(template, list):
        return [render_body(v, action) for v in template]
    if isinstance(template, dict):
        return {render_body(k, action) if isinstance(k, str) else k: render_body(v, action)
                for k, v in template.items()}
    return template


class HttpSink(Sink):
    kind = "http"

    def __init__(self, url_template: str, method: str = "POST", body_template: Optional[str] = None,
                 kinds=("freeze", "unfreeze"), token: Optional[str] = None, timeout: float = 10.0,
                 name: Optional[str] = None):
        super().__init__(name or f"http-{url_tag(url_template)}")
        _check(url_template, "STORMGUARD_HTTP_URL")
        self.url_template = url_template
        self.method = method.upper()
        if self.method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise SettingsError(f"STORMGUARD_HTTP_METHOD={method!r}: use GET, POST, PUT, PATCH or DELETE")
        self.body_template = None
        if body_template:
            _check(body_template, "STORMGUARD_HTTP_BODY")
            try:
                self.body_template = json.loads(body_template)
            except ValueError as exc:
                raise SettingsError(f"STORMGUARD_HTTP_BODY is not valid JSON: {exc}") from None
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise SettingsError(f"STORMGUARD_HTTP_KINDS: {', '.join(bad) or 'empty'}; use {', '.join(KINDS)}")
        self.kinds = frozenset(kinds)
        self.token = token
        self.timeout = timeout
        self._session = None

    def accepts(self, action: Action) -> bool:
        return action.kind in self.kinds and action.enforced  # a shadow-mode decision holds nothing

    async def start(self) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                  headers={"User-Agent": "stormguard-deliver"})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def request(self, action: Action) -> tuple[str, str, Optional[bytes], dict[str, str]]:
        """(method, url, body, headers) for one action."""
        from detectors.policy import encode_action

        headers = {"Idempotency-Key": action.action_id}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        body = None
        if self.method not in ("GET", "DELETE"):
            if self.body_template is None:
                body = encode_action(action)
            else:
                body = json.dumps(render_body(self.body_template, action), ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        return self.method, render_url(self.url_template, action), body, headers

    async def deliver(self, action: Action) -> None:
        await self.start()
        method, url, body, headers = self.request(action)
        async with self._session.request(method, url, data=body, headers=headers) as resp:
            if 200 <= resp.status < 300:
                return
            if retryable_status(resp.status):
                raise SinkError(f"HTTP {resp.status}")
            raise Rejected(f"HTTP {resp.status}")
