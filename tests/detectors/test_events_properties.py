"""Property tests of the event parser: valid events always parse; broken ones always raise InvalidEvent."""

from __future__ import annotations

import datetime as _dt
import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.events import MAX_EVENT_BYTES, InvalidEvent, MailEvent, encode_event, parse_event

address = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() or True)
epoch = st.floats(min_value=0, max_value=4_102_444_800.0, allow_nan=False, allow_infinity=False)
count = st.integers(min_value=0, max_value=100_000_000)


@st.composite
def valid_events(draw) -> dict:
    recipients = draw(st.lists(address, min_size=1, max_size=8))
    ev = {"message_id": draw(st.text(min_size=1, max_size=60)), "sender": draw(address),
          "recipients": recipients,
          "timestamp": draw(st.one_of(epoch, st.integers(min_value=0, max_value=4_102_444_800),
                                      st.datetimes(min_value=_dt.datetime(1970, 1, 2), max_value=_dt.datetime(2099, 12, 31),
                                                   timezones=st.just(_dt.timezone.utc)).map(lambda d: d.isoformat())))}
    if draw(st.booleans()):
        ev["lists"] = draw(st.dictionaries(address, count, max_size=3))
    if draw(st.booleans()):
        ev["delivered_count"] = draw(count)
    if draw(st.booleans()):
        ev["in_reply_to"] = draw(st.one_of(st.none(), st.text(max_size=60)))
    if draw(st.booleans()):
        ev["subject"] = draw(st.text(max_size=80))
    return ev


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(valid_events())
def test_valid_events_always_parse_and_round_trip(ev):
    raw = json.dumps(ev).encode()
    parsed = parse_event(raw)
    assert isinstance(parsed, MailEvent)
    assert parsed.message_id == ev["message_id"] and parsed.recipients == ev["recipients"]
    assert math.isfinite(parsed.event_time) and parsed.event_time >= 0
    assert parsed.deliveries >= 0
    assert parse_event(encode_event(parsed)) == parsed


#: Per field, values that break the contract whatever the rest of the record holds.
BAD = {
    "message_id": st.one_of(st.just(""), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2)),
    "sender": st.one_of(st.just(""), st.none(), st.integers(), st.booleans()),
    "recipients": st.one_of(st.just([]), st.none(), st.text(max_size=5), st.integers(),
                            st.lists(st.one_of(st.integers(), st.none(), st.just("")), min_size=1, max_size=3)),
    "timestamp": st.one_of(st.none(), st.booleans(), st.floats(max_value=-1e-3), st.floats(min_value=4.2e9),
                           st.integers(max_value=-1), st.integers(min_value=4_102_444_801),
                           st.sampled_from(["yesterday", "", "2016-13-45T00:00:00Z", "14/11/2016 08:30",
                                            "2016-11-14T08:30:00"]),  # the last has no time zone
                           st.just(float("nan")), st.just(float("inf"))),
    "lists": st.one_of(st.lists(st.text(max_size=3), min_size=1, max_size=2), st.text(max_size=3),
                       st.dictionaries(address, st.integers(max_value=-1), min_size=1, max_size=2),
                       st.dictionaries(address, st.text(max_size=3), min_size=1, max_size=2)),
    "delivered_count": st.one_of(st.integers(max_value=-1), st.floats(min_value=0.1, max_value=1e6).filter(
        lambda f: f != int(f)), st.text(max_size=4), st.integers(min_value=100_000_001)),
    "in_reply_to": st.one_of(st.integers(), st.lists(st.text(max_size=2), max_size=2)),
}
REQUIRED = ["message_id", "timestamp", "sender", "recipients"]


@st.composite
def invalid_records(draw) -> bytes:
    ev = dict(draw(valid_events()))
    if draw(st.booleans()):
        ev.pop(draw(st.sampled_from(REQUIRED)))
    else:
        field = draw(st.sampled_from(sorted(BAD)))
        ev[field] = draw(BAD[field])
    return json.dumps(ev, allow_nan=True).encode()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(invalid_records())
def test_mutated_events_always_raise_invalid_event_with_a_reason(raw):
    try:
        parse_event(raw)
    except InvalidEvent as exc:
        assert str(exc)
    else:
        raise AssertionError(f"accepted an invalid record: {raw[:300]!r}")


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_invalid_event(raw):
    try:
        parse_event(raw)
    except InvalidEvent as exc:
        assert str(exc)


@settings(max_examples=100)
@given(valid_events(), st.integers(min_value=1, max_value=40), st.binary(min_size=1, max_size=3))
def test_truncated_or_corrupted_records_raise_invalid_event(ev, cut, junk):
    raw = json.dumps(ev).encode()
    for broken in (raw[:-cut] if cut < len(raw) else b"{", raw + junk, junk + raw):
        try:
            parse_event(broken)
        except InvalidEvent as exc:
            assert str(exc)


def test_oversize_records_are_refused_before_decoding():
    raw = json.dumps({"message_id": "m", "timestamp": 1, "sender": "a", "recipients": ["b"],
                      "subject": "x" * MAX_EVENT_BYTES}).encode()
    try:
        parse_event(raw)
    except InvalidEvent as exc:
        assert "limit" in str(exc)
    else:
        raise AssertionError("an oversize record was accepted")
