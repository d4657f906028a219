"""The real traces of ``../shared/data`` as events, with or without an injected storm.

A trace line is ``sender recipient unix_time``; one message is every line with
the same sender and the same second. The traces have no lists, subjects or
reply headers, so every message becomes a direct message to its recipients.
``email-eu-core-temporal`` counts seconds from 0: it is shifted to start on
Monday 6 October 2003 00:00 UTC (the SNAP data were collected from October
2003), so the working-day rhythm lands on real weekdays.

With ``storm=True`` a storm is injected on an all-members list
(``all@<domain>``, one member per person of the trace), first posted by a
person of the trace who has sent mail before and never posts to lists, at
10:07 on the first working day after 60% of the trace's messages on which
(and on the day before which) the organisation sent mail.

>>> import io
>>> evs = list(trace_events(io.StringIO("1 2 0\\n1 3 0\\n2 1 60\\n"), "x.example", shift=100.0))
>>> [(e.sender, e.recipients, e.event_time) for e in evs]
[('p1@x.example', ['p2@x.example', 'p3@x.example'], 100.0), ('p2@x.example', ['p1@x.example'], 160.0)]
"""

from __future__ import annotations

import datetime as _dt
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, TextIO, Union

from detectors.events import MailEvent
from stream_jobs.evaluation.simulate import Org, Scenario, StormSpec, epoch


@dataclass(frozen=True)
class TraceInfo:
    file: str
    domain: str
    #: Seconds added to every timestamp (eu-core starts at 0).
    shift: float


TRACES: dict[str, TraceInfo] = {
    "eu-core": TraceInfo("email-eu-core-temporal.txt", "eu-core.example", epoch("2003-10-06T00:00:00Z")),
    "dnc": TraceInfo("dnc-temporal.txt", "dnc.example", 0.0),
}


def trace_events(source: Union[str, Path, TextIO], domain: str, shift: float = 0.0) -> Iterator[MailEvent]:
    """One event per message of the trace, in time order."""
    fh = open(source, encoding="ascii") if isinstance(source, (str, Path)) else source
    try:
        msgs: dict[tuple[str, int], list[str]] = {}
        for line in fh:
            parts = line.split()
            if len(parts) != 3:
                continue
            s, r, t = parts
            msgs.setdefault((s, int(t)), []).append(r)
    finally:
        if isinstance(source, (str, Path)):
            fh.close()
    for n, ((s, t), rcpts) in enumerate(sorted(msgs.items(), key=lambda kv: (kv[0][1], int(kv[0][0])))):
        yield MailEvent(message_id=f"<{domain}.{n}@trace>", timestamp=float(t) + shift, sender=f"p{s}@{domain}",
                        recipients=[f"p{x}@{domain}" for x in rcpts])


def trace_scenario(name: str, path: Union[str, Path], seed: int = 0, storm: bool = False) -> Scenario:
    """A :class:`Scenario` whose background is a real trace (``storm``: with a storm injected)."""
    info = TRACES[name]
    events = list(trace_events(path, info.domain, info.shift))
    people = sorted({e.sender for e in events} | {r for e in events for r in e.recipients})
    start, end = events[0].event_time, events[-1].event_time
    spec = None
    if storm:
        # a working morning 60% of the way through the trace
        # the first working day after 60% of the trace's messages on which the organisation sent mail
        busy = {_dt.datetime.fromtimestamp(e.event_time, _dt.timezone.utc).date() for e in events}
        day = _dt.datetime.fromtimestamp(events[int(0.6 * len(events))].event_time, _dt.timezone.utc).date()
        while day.weekday() >= 5 or day not in busy or (day - _dt.timedelta(days=1)) not in busy:
            day += _dt.timedelta(days=1)
        at = _dt.datetime(day.year, day.month, day.day, 10, 7, tzinfo=_dt.timezone.utc).timestamp()
        before = [e for e in events if e.event_time < at]
        counts: dict[str, int] = {}
        for e in before:
            counts[e.sender] = counts.get(e.sender, 0) + 1
        # a person of the trace with a modest, ordinary history
        candidates = sorted((c, s) for s, c in counts.items() if 3 <= c)
        sender = candidates[(seed * 7919) % len(candidates)][1] if candidates else people[0]
        members = len(people)
        # all@ is seen for the first time with the storm: a list with no history, whose limit is a
        # cold start's (issue 14: 5). At 816 or 1,891 members, three different people answering its
        # first post within minutes is also how a lively discussion list's first thread looks.
        spec = StormSpec(list_address=f"all@{info.domain}", members=members, sender=sender, at=at,
                         subject="Please update your contact details", root_replies=max(20, members // 12),
                         root_delay_min=20.0, branching=0.8, reply_delay_min=6.0, duration_min=120.0,
                         domain=info.domain, anomalous_root=True, max_replies=5)
    org = Org(domain=info.domain, people=len(people))
    sc = Scenario(f"{name}-trace" + ("+storm" if storm else ""),
                  f"the real {info.file} trace ({len(events):,} messages, {len(people):,} people)"
                  + (f", with a storm injected on an all-members list of {len(people):,}" if storm else ""),
                  seed, org, start, end + 1, spec)
    sc.background = lambda: iter(events)
    return sc
