"""The event contract: one record per submitted message on ``mail.events``.

Validation is done by a msgspec schema, not by hand: the decoder rejects wrong
types, missing fields, NaN/inf, negative counts and empty recipient lists in
one pass, and every rejection carries a reason that lands in the dead-letter
topic beside the raw bytes.

>>> ev = parse_event(b'{"message_id": "m1", "timestamp": "2016-11-14T08:30:00Z",'
...                  b' "sender": "a@nhs.net", "recipients": ["all@nhs.net"],'
...                  b' "lists": {"all@nhs.net": 840000}}')
>>> ev.event_time, ev.deliveries, ev.is_reply
(1479112200.0, 840000, False)
>>> parse_event(b'{"message_id": "m2"}')
Traceback (most recent call last):
...
detectors.events.InvalidEvent: Object missing required field `timestamp`
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from typing import Annotated, Optional, Union

import msgspec

#: Records larger than this are refused before decoding (a storm of 10 MB
#: records must not cost 10 MB of parsing each).
MAX_EVENT_BYTES = 256 * 1024
#: More recipients than any MTA accepts on one envelope (Postfix's default
#: smtpd_recipient_limit is 1000; Exchange Online's is 1000 per message).
MAX_RECIPIENTS = 10_000
#: Member counts above this are not plausible for one list on Earth.
MAX_MEMBERS = 100_000_000
#: Epoch seconds after 2100-01-01 are a unit error (milliseconds, say).
MAX_EPOCH_SECONDS = 4_102_444_800.0

Address = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_MEMBERS)]
EpochSeconds = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_EPOCH_SECONDS)]
Rfc3339 = Annotated[_dt.datetime, msgspec.Meta(tz=True)]

_REPLY_PREFIX = re.compile(r"^\s*((re|aw|sv|vs|antw|r|rif|odp|ynt)\s*(\[\d+\])?\s*:\s*)+", re.I)


class InvalidEvent(ValueError):
    """A record that does not follow the event contract; ``str()`` is the reason."""


class MailEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=False, cache_hash=False):
    """One submitted message, as the mail gateway saw it."""

    message_id: Annotated[str, msgspec.Meta(min_length=1, max_length=998)]
    timestamp: Union[EpochSeconds, Rfc3339]
    sender: Address
    recipients: Annotated[list[Address], msgspec.Meta(min_length=1, max_length=MAX_RECIPIENTS)]
    lists: dict[Address, Count] = {}
    delivered_count: Optional[Count] = None
    in_reply_to: Optional[Annotated[str, msgspec.Meta(max_length=998)]] = None
    subject: Optional[Annotated[str, msgspec.Meta(max_length=4096)]] = None

    @property
    def event_time(self) -> float:
        """Epoch seconds, whichever form the producer used."""
        ts = self.timestamp
        if type(ts) is float:  # the common case, first: this runs for every event
            return ts
        return ts.timestamp() if isinstance(ts, _dt.datetime) else float(ts)

    @property
    def deliveries(self) -> int:
        """Mailboxes this message lands in after list expansion."""
        if self.delivered_count is not None:
            return self.delivered_count
        if not self.lists:  # most mail: person to person
            return len(self.recipients)
        direct = len(self.recipients) - sum(1 for r in self.recipients if r in self.lists)
        return direct + sum(self.lists.values())

    @property
    def is_reply(self) -> bool:
        """A reply carries In-Reply-To, or at least a reply prefix on its subject."""
        if self.in_reply_to:
            return True
        return bool(self.subject and _REPLY_PREFIX.match(self.subject))

    @property
    def thread(self) -> str:
        """A thread key that survives clients which drop In-Reply-To."""
        if self.subject:
            return "s:" + normalise_subject(self.subject)
        return "m:" + (self.in_reply_to or self.message_id)


def normalise_subject(subject: str) -> str:
    """Strip reply prefixes and case, so "RE: Re: Test" and "test" are one thread.

    >>> normalise_subject("RE: Re:  Test message ")
    'test message'
    """
    return " ".join(_REPLY_PREFIX.sub("", subject).split()).lower()


_decoder = msgspec.json.Decoder(MailEvent)
_encoder = msgspec.json.Encoder()


def parse_event(raw: bytes | str) -> MailEvent:
    """Decode and validate one record, or raise :class:`InvalidEvent` with the reason."""
    if type(raw) is not bytes and isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"record is {len(raw)} bytes, over the {MAX_EVENT_BYTES}-byte limit")
    try:
        event = _decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidEvent(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    if type(event.timestamp) is float:  # epoch seconds: the schema has checked the range already
        return event
    ts = event.event_time
    if not math.isfinite(ts) or not 0.0 <= ts <= MAX_EPOCH_SECONDS:
        raise InvalidEvent(f"timestamp {ts!r} is outside 1970..2100 (milliseconds sent as seconds?)")
    return event


def encode_event(event: MailEvent) -> bytes:
    """The wire form of an event (what ``simulate`` writes and ``replay`` produces)."""
    return _encoder.encode(event)
