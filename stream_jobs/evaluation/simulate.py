"""``stormguard simulate``: benign organisational mail and named reply-all storms.

Everything here is deterministic per ``seed``: the same seed gives the same
events, byte for byte. Nothing is held per recipient: people are indices
(``p123@org``), list members are counts (``lists={address: members}``), so an
organisation of 1.2 million people costs no more memory than one of 800.

Benign traffic
--------------
* Direct mail follows a working-day rhythm (:func:`hour_weight`); who sends
  is skewed (a few people send much of the mail) and fan-out per message
  follows the histogram of the two real traces in ``../shared/data``
  (:data:`TRACE_FANOUT`: 78% of messages have one recipient, the tail reaches
  123). About a third of direct mail answers an earlier message
  (``in_reply_to``), to its sender or to all its recipients.
* Lists of many sizes: *bulletins* posted on a schedule by their usual owner,
  which now and then get a stray reply-all ("thanks!"); *discussion lists*
  where reply-all is the norm (threads with several replies each).
* ``sample`` thins direct mail (not lists) so a big organisation's week can be
  simulated on a laptop; recipients are still drawn from everyone.

Storms (closed loop)
--------------------
A storm is a branching (Hawkes) process on one list. The first post reaches
``members`` people; ``root_replies`` of them reply-all to it, over a delay
distribution. Every reply-all that is *delivered* provokes ``branching``
further reply-alls on average ("stop replying to all!"). A reply that the
gateway *holds* reaches nobody and provokes nothing: that is how the storm
falls off once the list is frozen. Each message draws its children from its
own random stream (seeded by the seed and its message id), so a run with a
gateway is exactly the unstopped run pruned at the held messages, and
"deliveries prevented" is a like-for-like difference.

>>> sc = scenario("small-org", seed=3, background_days=1.0)
>>> run = run_scenario(sc)             # no gateway: nothing is held
>>> run.storm_messages > 50, run.held == 0
(True, True)
>>> run_scenario(scenario("small-org", seed=3, background_days=1.0)).digest == run.digest
True
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import heapq
import math
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from detectors.events import MailEvent, encode_event
from stream_jobs.evaluation.gateways import Gateway, OpenGateway

#: Messages per fan-out (recipients per message), both real traces together
#: (email-eu-core-temporal: 53,633 messages; dnc-temporal: 19,534).
TRACE_FANOUT: dict[int, int] = {
    1: 57533, 2: 7948, 3: 2860, 4: 1741, 5: 880, 6: 659, 7: 299, 8: 158, 9: 135, 10: 84, 11: 63, 12: 90,
    13: 63, 14: 146, 15: 54, 16: 73, 17: 63, 18: 61, 19: 32, 20: 21, 21: 11, 22: 5, 23: 10, 24: 8, 25: 4,
    26: 4, 27: 6, 28: 33, 29: 12, 30: 16, 33: 4, 34: 3, 36: 15, 37: 5, 38: 2, 40: 3, 45: 1, 53: 2, 58: 1,
    62: 3, 66: 8, 69: 4, 72: 3, 74: 1, 75: 3, 78: 1, 93: 3, 106: 12, 108: 1, 111: 2, 114: 9, 117: 7, 120: 1,
    123: 1,
}
_FANOUT_K = np.array(sorted(TRACE_FANOUT), dtype=np.int64)
_FANOUT_P = np.array([TRACE_FANOUT[k] for k in sorted(TRACE_FANOUT)], dtype=float)
_FANOUT_P /= _FANOUT_P.sum()

#: Relative mail volume per hour of a working day (0..23, UTC); weekends are
#: ``WEEKEND_FACTOR`` of this.
_WORKDAY = [0.02, 0.01, 0.01, 0.01, 0.02, 0.04, 0.1, 0.35, 0.8, 1.0, 1.0, 0.95,
            0.6, 0.85, 1.0, 0.95, 0.85, 0.6, 0.3, 0.15, 0.12, 0.1, 0.06, 0.03]
WEEKEND_FACTOR = 0.07
_WORKDAY_SUM = sum(_WORKDAY)


def hour_weight(t: float) -> float:
    """Share of a working day's mail sent in the hour containing ``t``, times ``24/sum``.

    >>> monday_10 = _dt.datetime(2016, 11, 14, 10, tzinfo=_dt.timezone.utc).timestamp()
    >>> hour_weight(monday_10) > 10 * hour_weight(monday_10 - 8 * 3600) > 0
    True
    """
    d = _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    w = _WORKDAY[d.hour] / _WORKDAY_SUM
    return w * (WEEKEND_FACTOR if d.weekday() >= 5 else 1.0)


def _rng(*parts) -> np.random.Generator:
    """An independent random stream for the given key (seed, names, ids)."""
    key = "\x1f".join(str(p) for p in parts).encode()
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


def epoch(iso: str) -> float:
    return _dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# -- the organisation ------------------------------------------------------------------
@dataclass(frozen=True)
class ListSpec:
    """One mailing list of the benign organisation."""

    address: str
    members: int
    kind: str  # "bulletin" | "discussion" | "lively"
    owner: str = ""
    #: bulletin: weekdays it posts on (0=Mon) and the hour; discussion: threads per working hour.
    days: tuple[int, ...] = (0, 1, 2, 3, 4)
    hour: float = 9.0
    threads_per_hour: float = 0.0
    #: bulletin: chance a post gets a stray reply-all; discussion: mean replies per thread.
    replies: float = 0.0
    #: lively: epoch seconds of the list's first thread (it does not exist before).
    since: float = 0.0


@dataclass(frozen=True)
class Org:
    """A benign organisation: people, their direct mail and their lists."""

    domain: str = "example.org"
    people: int = 50_000
    #: Direct messages each person sends on an average working day.
    msgs_per_day: float = 2.0
    #: Fraction of direct mail generated (lists are always complete).
    sample: float = 1.0
    bulletins: int = 0
    discussions: int = 0
    all_staff: bool = True
    #: *Lively* discussion lists, the shape of issue 14: 200 to 3,000 members, about
    #: ``LIVELY_ACTIVE`` of them active, threads of 4 to 15 reply-alls a few minutes apart.
    lively: int = 0
    #: Epoch seconds from which the lively lists exist (0: from the start of the traffic).
    lively_since: float = 0.0

    def person(self, i: int) -> str:
        return f"p{int(i)}@{self.domain}"

    def lists(self, seed: int) -> list[ListSpec]:
        """The organisation's lists, deterministic per seed."""
        rng = _rng(seed, self.domain, "lists")
        n = self.people
        out: list[ListSpec] = []
        if self.all_staff:
            out.append(ListSpec(f"all-staff@{self.domain}", n, "bulletin", owner=f"comms@{self.domain}",
                                days=(0,), hour=9.5, replies=0.1))
        nb = self.bulletins or max(2, min(40, n // 5000))
        for i in range(nb):
            size = int(min(n, math.exp(rng.uniform(math.log(min(500, n)), math.log(max(501, n // 2))))))
            weekly = rng.random() < 0.5
            days = (int(rng.integers(0, 5)),) if weekly else (0, 1, 2, 3, 4)
            owner = self.person(rng.integers(0, n)) if rng.random() < 0.6 else f"news{i}@{self.domain}"
            out.append(ListSpec(f"bulletin{i}@{self.domain}", max(size, 2), "bulletin", owner=owner, days=days,
                                hour=float(rng.uniform(7.5, 16.0)), replies=float(rng.uniform(0.03, 0.2))))
        nd = self.discussions or max(3, min(150, n // 500))
        for i in range(nd):
            size = int(math.exp(rng.uniform(math.log(8), math.log(min(n, 400)))))
            out.append(ListSpec(f"talk{i}@{self.domain}", max(size, 3), "discussion",
                                threads_per_hour=float(rng.uniform(0.05, 1.0)),
                                replies=float(rng.uniform(1.0, 6.0))))
        # their own random stream, so that an organisation without them is unchanged byte for byte
        lrng = _rng(seed, self.domain, "lively")
        for i in range(self.lively):
            size = int(math.exp(lrng.uniform(math.log(200), math.log(3000))))
            out.append(ListSpec(f"forum{i}@{self.domain}", min(size, n), "lively",
                                threads_per_hour=float(lrng.uniform(0.4, 1.2)), since=self.lively_since))
        return out


class _Heap:
    """Events waiting for their time, in (time, sequence) order."""

    def __init__(self) -> None:
        self.items: list = []
        self.seq = 0

    def push(self, t: float, item) -> None:
        heapq.heappush(self.items, (t, self.seq, item))
        self.seq += 1

    def pop_until(self, t: float) -> Iterator:
        while self.items and self.items[0][0] < t:
            yield heapq.heappop(self.items)[2]

    def __len__(self) -> int:
        return len(self.items)


def benign_events(org: Org, start: float, end: float, seed: int) -> Iterator[MailEvent]:
    """Benign traffic of ``org`` from ``start`` to ``end`` (epoch s), in time order."""
    lists = org.lists(seed)
    rng = _rng(seed, org.domain, "mail")
    n = org.people
    pending = _Heap()
    recent: list[tuple[str, str, tuple[str, ...]]] = []  # (message_id, sender, recipients)
    seq = 0
    hour0 = math.floor(start / 3600) * 3600
    for h in range(int(hour0), int(math.ceil(end)), 3600):
        w = hour_weight(h)
        day = _dt.datetime.fromtimestamp(h, _dt.timezone.utc)
        weekday, hour = day.weekday(), day.hour
        # direct mail
        rate = n * org.msgs_per_day * org.sample * w
        count = int(rng.poisson(rate))
        times = np.sort(h + rng.random(count) * 3600)
        senders = np.floor(n * rng.random(count) ** 2.5).astype(np.int64)  # a few people send much of the mail
        ks = rng.choice(_FANOUT_K, size=count, p=_FANOUT_P)
        is_reply = rng.random(count) < 0.33
        for t, s, k, r in zip(times.tolist(), senders.tolist(), ks.tolist(), is_reply.tolist()):
            seq += 1
            mid = f"<d{seq}.{seed}@{org.domain}>"
            if r and recent:
                orig_id, orig_sender, orig_rcpts = recent[int(rng.integers(0, len(recent)))]
                sender = orig_rcpts[0]
                rcpts = (orig_sender,) + tuple(x for x in orig_rcpts if x != sender) if rng.random() < 0.3 \
                    else (orig_sender,)
                pending.push(t, MailEvent(message_id=mid, timestamp=round(t, 3), sender=sender,
                                          recipients=list(rcpts), in_reply_to=orig_id))
            else:
                sender = org.person(s)
                rcpts = tuple(org.person(x) for x in rng.integers(0, n, size=min(k, n)).tolist())
                pending.push(t, MailEvent(message_id=mid, timestamp=round(t, 3), sender=sender,
                                          recipients=list(rcpts)))
            recent.append((mid, sender, rcpts))
            if len(recent) > 4000:
                del recent[:2000]
        # lists
        for spec in lists:
            if spec.kind == "bulletin":
                if weekday in spec.days and hour == int(spec.hour):
                    t = h + (spec.hour % 1) * 3600 + float(rng.uniform(0, 600))
                    seq += 1
                    root = f"<b{seq}.{seed}@{org.domain}>"
                    subject = f"{spec.address.split('@')[0]} news {day.date().isoformat()}"
                    pending.push(t, MailEvent(message_id=root, timestamp=round(t, 3), sender=spec.owner,
                                              recipients=[spec.address], lists={spec.address: spec.members},
                                              subject=subject))
                    n_stray = int(rng.random() < spec.replies) + int(rng.random() < spec.replies / 4)
                    for _ in range(n_stray):
                        seq += 1
                        ts = t + float(rng.exponential(2 * 3600))
                        pending.push(ts, MailEvent(message_id=f"<s{seq}.{seed}@{org.domain}>", timestamp=round(ts, 3),
                                                   sender=org.person(rng.integers(0, n)),
                                                   recipients=[spec.address, spec.owner],
                                                   lists={spec.address: spec.members}, in_reply_to=root,
                                                   subject="RE: " + subject))
            elif spec.kind == "discussion":
                nthreads = int(rng.poisson(spec.threads_per_hour * w * _WORKDAY_SUM))
                for _ in range(nthreads):
                    t = h + float(rng.random()) * 3600
                    seq += 1
                    root = f"<t{seq}.{seed}@{org.domain}>"
                    subject = f"topic {seq}"
                    # a conversation: the poster and a few others answer each other
                    people = [org.person(x) for x in rng.integers(0, n, size=int(rng.integers(2, 6))).tolist()]
                    pending.push(t, MailEvent(message_id=root, timestamp=round(t, 3), sender=people[0],
                                              recipients=[spec.address], lists={spec.address: spec.members},
                                              subject=subject))
                    parent, tr, last = root, t, people[0]
                    for _ in range(int(rng.poisson(spec.replies))):
                        seq += 1
                        tr = tr + float(rng.exponential(25 * 60))
                        who = people[int(rng.integers(0, len(people)))]
                        who = who if who != last else people[(people.index(who) + 1) % len(people)]
                        mid = f"<r{seq}.{seed}@{org.domain}>"
                        pending.push(tr, MailEvent(message_id=mid, timestamp=round(tr, 3), sender=who,
                                                   recipients=[spec.address], lists={spec.address: spec.members},
                                                   in_reply_to=parent, subject="RE: " + subject))
                        parent, last = mid, who
            elif h + 3600 > spec.since:  # lively
                for ev in lively_threads(org, spec, h, seed):
                    pending.push(ev.event_time, ev)
        for ev in pending.pop_until(min(h + 3600, end)):
            if ev.event_time >= start:
                yield ev
        if h + 3600 >= end:
            break


#: Active members of a lively discussion list (issue 14: "about 60 active members each").
LIVELY_ACTIVE = 60


def lively_threads(org: Org, spec: ListSpec, hour: int, seed: int) -> list[MailEvent]:
    """The threads a lively discussion list starts in one hour (issue 14's shape), with all their replies.

    About ``LIVELY_ACTIVE`` people write to the list. A thread draws 4 to 15 reply-alls, the first a few
    minutes after the post (mean 4 min), the next ones a few minutes apart (mean 3 min; gamma-distributed
    with shape 2, so a gap of under 30 s happens one time in twenty). The first answers come from
    different people answering the post; later on people answer each other (and the poster answers
    back) more and more. Each list and hour has its own random stream.
    """
    if spec.kind != "lively":
        raise ValueError(f"{spec.address} is not a lively list")
    pool_rng = _rng(seed, spec.address, "pool")
    pool = [int(x) for x in dict.fromkeys(pool_rng.integers(0, org.people, size=LIVELY_ACTIVE * 2).tolist())]
    pool = pool[:LIVELY_ACTIVE]
    rng = _rng(seed, spec.address, hour)
    w = hour_weight(hour)
    out: list[MailEvent] = []
    for k in range(int(rng.poisson(spec.threads_per_hour * w * _WORKDAY_SUM))):
        t = max(hour + float(rng.random()) * 3600, spec.since)
        if t >= hour + 3600:
            continue
        tag = f"{spec.address.split('@')[0]}.{hour // 3600}.{k}.{seed}@{org.domain}"
        root, subject = f"<f{tag}>", f"{spec.address.split('@')[0]} question {hour // 3600}.{k}"
        poster = pool[int(rng.integers(0, len(pool)))]
        out.append(MailEvent(message_id=root, timestamp=round(t, 3), sender=org.person(poster),
                             recipients=[spec.address], lists={spec.address: spec.members}, subject=subject))
        messages = [(root, poster)]
        talking = [poster]
        tr = t + float(rng.gamma(2.0, 120.0))
        for j in range(int(rng.integers(4, 16))):
            if j:
                tr += float(rng.gamma(2.0, 90.0))
            # the first answers are to the post; later ones more and more to each other
            parent_id, parent_author = messages[0] if j == 0 or rng.random() < 0.35 else \
                messages[max(1, len(messages) - 1 - int(rng.integers(0, 3)))]
            back = [p for p in talking if p != parent_author]
            if back and rng.random() < min(0.75, 0.15 * j):
                who = back[int(rng.integers(0, len(back)))]
            else:
                fresh = [p for p in pool if p not in talking]
                who = fresh[int(rng.integers(0, len(fresh)))] if fresh else back[0]
                talking.append(who)
            mid = f"<f{tag}.{j}>"
            out.append(MailEvent(message_id=mid, timestamp=round(tr, 3), sender=org.person(who),
                                 recipients=[spec.address], lists={spec.address: spec.members},
                                 in_reply_to=parent_id, subject="RE: " + subject))
            messages.append((mid, who))
    return out


# -- storms -------------------------------------------------------------------------------
@dataclass(frozen=True)
class StormSpec:
    """A reply-all storm on one list (see the module docstring for the model)."""

    list_address: str
    members: int
    sender: str
    at: float
    subject: str = "Test"
    #: People who reply-all to the first post (a fixed count: who they are is random).
    root_replies: int = 300
    #: Mean minutes until someone reacts to the first post.
    root_delay_min: float = 30.0
    #: Reply-alls each delivered reply-all provokes, on average.
    branching: float = 0.4
    #: Mean minutes until a delivered reply-all provokes its replies.
    reply_delay_min: float = 8.0
    #: Minutes after the first post when the list is shut by hand regardless (nhsmail: 75).
    duration_min: float = 75.0
    #: Who reply-alls: people of this domain (indices drawn up to ``members``).
    domain: str = "example.org"
    #: Whether the first post itself is anomalous (a storm Stormguard should stop after 1 reply-all).
    anomalous_root: bool = True
    #: Overrides the criterion that follows from ``anomalous_root`` (1, else 3).
    max_replies: Optional[int] = None
    max_messages: int = 20_000


@dataclass
class Scenario:
    """A named scenario: an organisation's benign background and, usually, a storm."""

    name: str
    description: str
    seed: int
    org: Org
    start: float
    end: float
    storm: Optional[StormSpec] = None
    #: Direct mail the storm's first poster sent before it (so the detector knows them).
    sender_history: int = 0
    #: Replaces the simulated organisation's traffic (the real traces use it).
    background: Optional[Callable[[], Iterable[MailEvent]]] = None
    #: A cold start: the detector starts with no history on the storm's day (issue 14).
    cold: bool = False

    @property
    def criterion(self) -> Optional[int]:
        """Most reply-alls that may be delivered before the freeze (issue 2's 'Done when'; issue 14 at a
        cold start: 1 for an anomalous first post, else 5)."""
        if self.storm is None:
            return None
        if self.storm.max_replies is not None:
            return self.storm.max_replies
        return 1 if self.storm.anomalous_root else 5 if self.cold else 3


def _storm_message(spec: StormSpec, mid: str, t: float, sender: str, parent: Optional[str]) -> MailEvent:
    return MailEvent(message_id=mid, timestamp=round(t, 3), sender=sender, recipients=[spec.list_address],
                     lists={spec.list_address: spec.members}, in_reply_to=parent,
                     subject=spec.subject if parent is None else "RE: " + spec.subject)


class StormProcess:
    """The branching storm, driven by what the gateway delivers."""

    def __init__(self, spec: StormSpec, seed: int):
        self.spec, self.seed = spec, seed
        self.heap = _Heap()
        self.root_id = f"<storm.{seed}@{spec.list_address}>"
        self.end = spec.at + spec.duration_min * 60
        self.count = 0
        self.heap.push(spec.at, (self.root_id, spec.sender, None))

    def _mid(self, parent: str, k: int) -> str:
        return f"{parent[:-1]}.{k}>" if parent != self.root_id else f"<storm.{self.seed}.{k}@{self.spec.list_address}>"

    def next_time(self) -> float:
        return self.heap.items[0][0] if self.heap.items else math.inf

    def pop(self) -> MailEvent:
        t, _, (mid, sender, parent) = heapq.heappop(self.heap.items)
        self.count += 1
        return _storm_message(self.spec, mid, t, sender, parent)

    def delivered(self, event: MailEvent) -> None:
        """A storm message reached the list: schedule the reply-alls it provokes."""
        spec = self.spec
        rng = _rng(self.seed, event.message_id)
        if event.in_reply_to is None:
            n = spec.root_replies
            delays = rng.exponential(spec.root_delay_min * 60, size=n)
        else:
            n = int(rng.poisson(spec.branching))
            delays = rng.exponential(spec.reply_delay_min * 60, size=n)
        repliers = rng.integers(0, max(1, spec.members), size=n)
        for k, (d, who) in enumerate(zip(delays.tolist(), repliers.tolist())):
            t = event.event_time + 1.0 + d
            if t < self.end and self.heap.seq < spec.max_messages:
                self.heap.push(t, (self._mid(event.message_id, k), f"p{who}@{spec.domain}", event.message_id))


@dataclass
class Run:
    """What happened in one scenario run: every submitted event and whether it was delivered."""

    scenario: Scenario
    #: Per storm message: (event time, deliveries, delivered?, is reply).
    storm_log: list[tuple[float, int, bool, bool]] = field(default_factory=list)
    events: int = 0
    held: int = 0
    deliveries: int = 0
    digest: str = ""

    @property
    def storm_messages(self) -> int:
        return len(self.storm_log)


def scenario_events(sc: Scenario, gateway: Optional[Gateway] = None,
                    sink: Optional[Callable[[MailEvent, bool], None]] = None) -> Run:
    """Run ``sc`` through ``gateway`` (default: deliver everything); ``sink`` sees every event."""
    gateway = gateway or OpenGateway()
    run = Run(sc)
    h = hashlib.blake2b(digest_size=12)
    storm = StormProcess(sc.storm, sc.seed) if sc.storm else None

    def emit(ev: MailEvent, in_storm: bool = False) -> bool:
        ok = gateway.submit(ev)
        run.events += 1
        h.update(encode_event(ev))
        if ok:
            run.deliveries += ev.deliveries
        else:
            run.held += 1
        if in_storm:
            run.storm_log.append((ev.event_time, ev.deliveries, ok, ev.is_reply))
        if sink is not None:
            sink(ev, ok)
        return ok

    history = _history(sc)
    background = sc.background() if sc.background is not None else benign_events(sc.org, sc.start, sc.end, sc.seed)
    for ev in _merge(background, history):
        while storm is not None and storm.next_time() <= ev.event_time:
            sev = storm.pop()
            if emit(sev, True):
                storm.delivered(sev)
        emit(ev)
    while storm is not None and storm.next_time() < math.inf:
        sev = storm.pop()
        if emit(sev, True):
            storm.delivered(sev)
    run.digest = h.hexdigest()
    return run


run_scenario = scenario_events


def _history(sc: Scenario) -> list[MailEvent]:
    """A few ordinary direct messages from the storm's first poster, before the storm."""
    if not sc.storm or not sc.sender_history:
        return []
    rng = _rng(sc.seed, "history")
    span = sc.storm.at - sc.start
    out = []
    for i in range(sc.sender_history):
        t = sc.start + span * (i + float(rng.random())) / (sc.sender_history + 1)
        k = int(rng.choice(_FANOUT_K, p=_FANOUT_P))
        out.append(MailEvent(message_id=f"<h{i}.{sc.seed}@{sc.org.domain}>", timestamp=round(t, 3),
                             sender=sc.storm.sender,
                             recipients=[sc.org.person(x) for x in rng.integers(0, sc.org.people, size=k).tolist()]))
    return sorted(out, key=lambda e: e.event_time)


def _merge(a: Iterable[MailEvent], b: list[MailEvent]) -> Iterator[MailEvent]:
    return heapq.merge(a, b, key=lambda e: e.event_time)


# -- the named scenarios ------------------------------------------------------------------------
NHSMAIL_AT = epoch("2016-11-14T08:45:00Z")  # Monday; the list was shut by 10:00


def _nhsmail(seed: int, days: float) -> Scenario:
    org = Org(domain="nhs.net", people=1_200_000, msgs_per_day=2.0, sample=0.0025, bulletins=30, discussions=120,
              all_staff=False)
    storm = StormSpec(list_address="allusers@nhs.net", members=840_000, sender="p4071337@nhs.net", at=NHSMAIL_AT,
                      subject="Test", root_replies=395, root_delay_min=30.0, branching=0.4, reply_delay_min=8.0,
                      duration_min=75.0, domain="nhs.net", anomalous_root=True)
    return Scenario("nhsmail", "NHSmail, 14 Nov 2016: a test message to a list of all 840,000 accounts, from a "
                    "consultant who never posts to lists; ~600 reply-alls in 75 min if nothing stops it",
                    seed, org, NHSMAIL_AT - days * 86400, NHSMAIL_AT + 2 * 3600, storm, sender_history=12)


def _bulletin_storm(seed: int, days: float) -> Scenario:
    org = Org(domain="bigtrust.example", people=50_000, msgs_per_day=2.0, sample=0.05)
    at = epoch("2016-11-14T09:41:00Z")  # Monday: comms@ posts the weekly all-staff bulletin at 09:30-09:40
    storm = StormSpec(list_address="all-staff@bigtrust.example", members=org.people, sender="comms@bigtrust.example",
                      at=at, subject="Staff bulletin: winter flu jabs", root_replies=120, root_delay_min=25.0,
                      branching=0.5, reply_delay_min=10.0, duration_min=120.0, domain=org.domain,
                      anomalous_root=False)
    return Scenario("bulletin-storm", f"the weekly all-staff bulletin from its usual owner to {org.people:,} members "
                    "turns into a storm: only the replies are anomalous", seed, org, at - days * 86400,
                    at + 3 * 3600, storm)


def _slow_burn(seed: int, days: float) -> Scenario:
    org = Org(domain="county.example", people=50_000, msgs_per_day=2.0, sample=0.05)
    lists = org.lists(seed)
    b = max((s for s in lists if s.kind == "bulletin" and s.address.startswith("bulletin")), key=lambda s: s.members)
    at = epoch("2016-11-16T00:00:00Z") + 10.25 * 3600
    storm = StormSpec(list_address=b.address, members=b.members, sender=b.owner, at=at, subject="Parking changes",
                      root_replies=5, root_delay_min=90.0, branching=1.1, reply_delay_min=15.0, duration_min=360.0,
                      domain=org.domain, anomalous_root=False, max_messages=1500)
    return Scenario("slow-burn", f"a post from the usual owner of a {b.members:,}-member list draws a few replies "
                    "over hours, then the replies accelerate", seed, org, at - days * 86400, at + 7 * 3600, storm)


def _small_org(seed: int, days: float) -> Scenario:
    org = Org(domain="smallco.example", people=816, msgs_per_day=4.0, sample=1.0, bulletins=2, discussions=6)
    at = epoch("2016-11-15T11:05:00Z")
    storm = StormSpec(list_address="all-staff@smallco.example", members=816, sender="comms@smallco.example", at=at,
                      subject="Fire drill on Thursday", root_replies=60, root_delay_min=20.0, branching=0.8,
                      reply_delay_min=6.0, duration_min=120.0, domain=org.domain, anomalous_root=False)
    return Scenario("small-org", "an all-staff announcement in an 816-person organisation (under Exchange's "
                    "recipient floor: 2,500 by default, 1,000 at its tightest) from its usual sender turns into a "
                    "storm", seed, org,
                    at - days * 86400, at + 3 * 3600, storm)


def _new_list(seed: int, days: float) -> Scenario:
    org = Org(domain="bigtrust.example", people=50_000, msgs_per_day=2.0, sample=0.05)
    at = epoch("2016-11-16T14:10:00Z")
    storm = StormSpec(list_address="dyn-allusers@bigtrust.example", members=61_800, sender="it-ops@bigtrust.example",
                      at=at, subject="Ignore: distribution group test", root_replies=150, root_delay_min=20.0,
                      branching=0.5, reply_delay_min=8.0, duration_min=120.0, domain=org.domain, anomalous_root=True)
    return Scenario("new-list", "a misconfigured dynamic group never seen before, holding every member of staff "
                    "and contractor (61,800), gets a test message from an address never seen before", seed, org, at - days * 86400,
                    at + 3 * 3600, storm)


def _benign_week(seed: int, days: float) -> Scenario:
    org = Org(domain="example.org", people=50_000, msgs_per_day=2.0, sample=1.0)
    start = epoch("2016-11-07T00:00:00Z")
    return Scenario("benign-week", "a week of a 50,000-person organisation: direct mail, bulletins with stray "
                    "replies, discussion lists; no storm", seed, org, start, start + max(days, 1.0) * 86400)


#: Lively discussion lists in the cold-start scenarios (issue 14: eight of them).
COLD_LIVELY_LISTS = 8
_LIVELY_START = epoch("2016-11-14T00:00:00Z")  # a Monday


def _lively_cold(seed: int, days: float) -> Scenario:
    org = Org(domain="newco.example", people=20_000, msgs_per_day=2.0, sample=0.2, lively=COLD_LIVELY_LISTS)
    return Scenario("lively-cold", f"a first deployment: no history at all, in a 20,000-person organisation whose "
                    f"{COLD_LIVELY_LISTS} lively discussion lists (200-3,000 members, ~{LIVELY_ACTIVE} active, threads of "
                    "4-15 reply-alls minutes apart) start on day one; no storm", seed, org, _LIVELY_START,
                    _LIVELY_START + max(days, 1.0) * 86400, cold=True)


def _lively_new(seed: int, days: float) -> Scenario:
    since = _LIVELY_START + 3 * 86400
    org = Org(domain="newco.example", people=20_000, msgs_per_day=2.0, sample=0.2, lively=COLD_LIVELY_LISTS,
              lively_since=since)
    return Scenario("lively-new", f"steady state: {COLD_LIVELY_LISTS} lively discussion lists are created after "
                    "three days of an organisation's ordinary traffic; no storm", seed, org, _LIVELY_START,
                    since + max(days, 1.0) * 86400)


def _cold(name: str, build: Callable[[int, float], Scenario]) -> Callable[[int, Optional[float]], Scenario]:
    """``build``'s storm at a cold start: the traffic (and the detector) start at midnight of the storm's day,
    or ``days`` before the storm, with the organisation's lively discussion lists in it."""
    def cold(seed: int, days: Optional[float]) -> Scenario:
        sc = build(seed, 0.0)
        assert sc.storm is not None
        at = sc.storm.at
        sc.start = at - days * 86400 if days is not None else math.floor(at / 86400) * 86400
        sc.name, sc.cold = name, True
        sc.org = replace(sc.org, lively=COLD_LIVELY_LISTS)
        sc.description = (f"{sc.description}; at a cold start (no history before "
                          f"{_dt.datetime.fromtimestamp(sc.start, _dt.timezone.utc):%a %H:%M}, "
                          f"{COLD_LIVELY_LISTS} lively discussion lists in the background)")
        return sc
    return cold


#: name -> (builder(seed, background_days), default background days; None: since midnight of the storm's day)
SCENARIOS: dict[str, tuple[Callable[[int, float], Scenario], Optional[float]]] = {
    "nhsmail": (_nhsmail, 3.4),
    "bulletin-storm": (_bulletin_storm, 7.5),
    "slow-burn": (_slow_burn, 7.0),
    "small-org": (_small_org, 7.0),
    "new-list": (_new_list, 2.0),
    "benign-week": (_benign_week, 7.0),
    "nhsmail-cold": (_cold("nhsmail-cold", _nhsmail), None),
    "bulletin-storm-cold": (_cold("bulletin-storm-cold", _bulletin_storm), None),
    "slow-burn-cold": (_cold("slow-burn-cold", _slow_burn), None),
    "small-org-cold": (_cold("small-org-cold", _small_org), None),
    "new-list-cold": (_cold("new-list-cold", _new_list), None),
    "lively-cold": (_lively_cold, 3.0),
    "lively-new": (_lively_new, 2.0),
}
#: Scenarios without a storm (benign traffic: every freeze is a false one).
BENIGN_SCENARIOS = ["benign-week", "lively-cold", "lively-new"]
STORM_SCENARIOS = [n for n in SCENARIOS if n not in BENIGN_SCENARIOS]
#: The scenarios of issue 2 (with history), as before issue 14.
WARM_SCENARIOS = ["nhsmail", "bulletin-storm", "slow-burn", "small-org", "new-list", "benign-week"]


def scenario(name: str, seed: int = 0, background_days: Optional[float] = None, people: Optional[int] = None,
             sample: Optional[float] = None) -> Scenario:
    """Build the named scenario (see :data:`SCENARIOS`)."""
    try:
        build, default_days = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}") from None
    sc = build(seed, default_days if background_days is None else background_days)
    if people is not None or sample is not None:
        sc.org = replace(sc.org, **{k: v for k, v in (("people", people), ("sample", sample)) if v is not None})
    return sc


# -- CLI --------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write simulated mail events (benign traffic and named storms) as JSON lines")
    p.add_argument("--scenario", default="nhsmail", choices=list(SCENARIOS),
                   help="scenario to simulate (default nhsmail)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same events (default 0)")
    p.add_argument("--days", type=float, help="days of benign background before the storm (default per scenario)")
    p.add_argument("--people", type=int, help="override the organisation's head count")
    p.add_argument("--sample", type=float, help="fraction of direct mail to generate (lists are always complete)")
    p.add_argument("-o", "--output", default="-", help="events file (default - : stdout)")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--closed-loop", action="store_true",
                      help="act as the gateway with the detectors in-process: hold posts to frozen lists")
    loop.add_argument("--broker", help="act as the gateway live: produce to mail.events on this broker and hold "
                                       "posts to lists that stormguard.actions froze (needs a running worker)")
    p.add_argument("--worker-url", help="with --broker: the worker's HTTP address (http://HOST:PORT), so the "
                                        "gateway waits for its decision before each post to the storm list")
    p.add_argument("--speed", type=float, default=0.0,
                   help="with --broker: event-time seconds per wall second for the storm (default 0: no pacing)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.set_defaults(func=_simulate)


def _simulate(args) -> int:
    if args.list:
        for name in SCENARIOS:
            print(f"{name:15} {scenario(name, 0).description}")
        return 0
    sc = scenario(args.scenario, args.seed, args.days, args.people, args.sample)
    out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")
    gateway: Gateway
    live = None
    if args.broker:
        from stream_jobs.evaluation.gateways import LiveGateway

        live = gateway = LiveGateway(args.broker, args.worker_url, speed=args.speed,
                                     watch=[sc.storm.list_address] if sc.storm else [])
    elif args.closed_loop:
        from stream_jobs.evaluation.gateways import StormguardGateway

        gateway = StormguardGateway()
    else:
        gateway = OpenGateway()
    try:
        run = scenario_events(sc, gateway, sink=lambda ev, ok: out.write(encode_event(ev) + b"\n"))
    finally:
        if live is not None:
            live.close()
        if out is not sys.stdout.buffer:
            out.close()
        else:
            out.flush()
    delivered = sum(1 for _, _, ok, _ in run.storm_log if ok)
    storm_deliveries = sum(d for _, d, ok, _ in run.storm_log if ok)
    print(f"stormguard simulate: {sc.name} seed {sc.seed}: {run.events} events, {run.held} held; storm list: "
          f"{run.storm_messages} messages, {delivered} delivered, {storm_deliveries:,} deliveries",
          file=sys.stderr)
    return 0
