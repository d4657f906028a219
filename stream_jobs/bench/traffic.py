"""The bench's traffic: realistic events (lists, threads, storms), their encoding and their keys.

The same generator fills the throughput topic, the latency phase's history, and the background
that :mod:`stream_jobs.bench.load` sends from its own process.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from typing import Callable, Iterator, Optional

import msgspec


# -- realistic events ---------------------------------------------------------------------------
_SUBJECTS = ["Rota for next week", "Clinic cancelled", "IT maintenance tonight", "Minutes of Tuesday's meeting",
             "Audit deadline", "Parking permits", "Training day", "Flu jabs", "Lunch?", "Updated policy",
             "Patient transport", "Ward 7 handover", "Budget 2017/18", "Fire drill", "Leaving do"]
_REPLY_SUBJECTS = ["RE: {}", "Re: {}", "RE: RE: {}"]
_STORM_REPLIES = ["please remove me from this list", "STOP REPLYING TO ALL", "why am I getting this?",
                  "unsubscribe", "me too"]


class _ListSpec:
    __slots__ = ("address", "members", "owners", "discussion", "recent")

    def __init__(self, address: str, members: int, owners: list[str], discussion: bool):
        self.address, self.members, self.owners, self.discussion = address, members, owners, discussion
        self.recent: deque = deque(maxlen=8)  # (message_id, subject) of recent posts


def realistic_events(n: int, seed: int = 2016, end_time: Optional[float] = None, span: float = 6 * 3600.0,
                     people: int = 20_000, storms: Optional[int] = None) -> Iterator[dict]:
    """``n`` events of an NHS-like organisation, in event-time order, as contract dicts.

    Senders are skewed (a few people send most mail), direct fan-out is heavy-tailed
    (most mail to one person, a tail past a hundred), a third of direct mail answers
    an earlier message; ~7% of events are list posts (bulletins from their owners,
    discussion lists where several people post and reply), ~3% are reply-alls to lists
    (lively on discussion lists, a stray "thanks" on bulletins); ``storms`` reply-all
    storms on big lists (about one per 30,000 events unless given) add bursts of
    100-300 reply-alls. Deterministic per ``seed`` and ``end_time``, in any process.
    """
    rng = random.Random(seed)
    end = time.time() if end_time is None else end_time
    t = end - span
    step = span / max(n, 1)
    domain = "bench.nhs.net"

    def person() -> str:
        return f"p{int(people * rng.random() ** 2.5)}@{domain}"

    lists: list[_ListSpec] = [_ListSpec(f"all-staff@{domain}", 840_000, [f"comms@{domain}"], False),
                              _ListSpec(f"trust-all@{domain}", 120_000, [f"ceo-office@{domain}"], False)]
    for i in range(400):
        discussion = rng.random() < 0.3
        members = int(math.exp(rng.uniform(math.log(15), math.log(300 if discussion else 30_000))))
        owners = [person() for _ in range(rng.randint(1, 2))]
        lists.append(_ListSpec(f"list{i}@{domain}", members, owners, discussion))
    discussions = [ls for ls in lists if ls.discussion]
    bulletins = [ls for ls in lists if not ls.discussion]
    big = [ls for ls in bulletins if ls.members >= 5_000]
    n_storms = max(1, n // 30_000) if storms is None else storms
    storm_starts = {int(n * (k + 0.5) / n_storms) for k in range(n_storms)} if n_storms else set()
    active: list[list] = []  # [list spec, root id, subject, replies left]
    recent_direct: deque = deque(maxlen=2000)

    for i in range(n):
        t += step * rng.uniform(0.2, 1.8)
        mid = f"<{seed}.{i}@{domain}>"
        ev: dict = {"message_id": mid, "timestamp": round(t, 3)}
        if i in storm_starts and big:
            ls = rng.choice(big)
            subject = "test"
            ev.update(sender=person(), recipients=[ls.address], lists={ls.address: ls.members}, subject=subject)
            active.append([ls, mid, subject, rng.randint(100, 300)])
            yield ev
            continue
        if active and rng.random() < 0.3:
            storm = active[0]
            ls, root, subject = storm[0], storm[1], storm[2]
            storm[3] -= 1
            if storm[3] <= 0:
                active.pop(0)
            ev.update(sender=person(), recipients=[ls.address], lists={ls.address: ls.members},
                      in_reply_to=root, subject=f"RE: {subject} - {rng.choice(_STORM_REPLIES)}")
            yield ev
            continue
        r = rng.random()
        if r < 0.07:  # a root post to a list
            ls = rng.choice(discussions) if rng.random() < 0.5 else rng.choice(bulletins)
            sender = person() if ls.discussion else rng.choice(ls.owners)
            subject = rng.choice(_SUBJECTS)
            ls.recent.append((mid, subject))
            ev.update(sender=sender, recipients=[ls.address], lists={ls.address: ls.members}, subject=subject)
        elif r < 0.10:  # a reply-all to a list: lively on discussion lists, stray on bulletins
            ls = rng.choice(discussions) if rng.random() < 0.85 else rng.choice(bulletins)
            if not ls.recent:
                ls.recent.append((f"<old.{i}@{domain}>", rng.choice(_SUBJECTS)))
            parent, subject = rng.choice(list(ls.recent))
            sender = person()
            ev.update(sender=sender, recipients=[ls.address, rng.choice(ls.owners)],
                      lists={ls.address: ls.members}, in_reply_to=parent,
                      subject=rng.choice(_REPLY_SUBJECTS).format(subject))
        else:  # direct mail
            sender = person()
            k = min(int(rng.paretovariate(1.6)), 120)
            # dict, not set: a set's order of strings changes with each process's hash seed
            recipients = list(dict.fromkeys(person() for _ in range(k))) or [person()]
            ev.update(sender=sender, recipients=recipients)
            if recent_direct and rng.random() < 0.33:
                parent, subject = rng.choice(recent_direct)
                ev.update(in_reply_to=parent, subject=f"RE: {subject}")
            else:
                subject = rng.choice(_SUBJECTS)
                ev["subject"] = subject
                recent_direct.append((mid, subject))
        yield ev


def encode_all(events: Iterator[dict]) -> list[bytes]:
    enc = msgspec.json.Encoder()
    return [enc.encode(ev) for ev in events]


def describe_events(records: list[bytes]) -> dict:
    dec = msgspec.json.Decoder()
    list_posts = replies = 0
    for raw in records:
        ev = dec.decode(raw)
        if ev.get("lists"):
            list_posts += 1
            if ev.get("in_reply_to"):
                replies += 1
    total = sum(len(r) for r in records)
    return {"count": len(records), "bytes": total, "mean_bytes": total / max(len(records), 1),
            "list_posts": list_posts, "list_replies": replies}


class _Sender(msgspec.Struct):
    sender: str = ""


_sender_decoder = msgspec.json.Decoder(_Sender)


def sender_key(raw: bytes) -> Optional[bytes]:
    """A record keyed as a gateway that knows nothing of lists keys it: its sender's bytes (else none)."""
    try:
        sender = _sender_decoder.decode(raw).sender
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return sender.encode() if sender else None


def by_list_shares(records: list[bytes], key: Callable[[bytes], Optional[bytes]], partitions: int) -> int:
    """Shares the worker routes through the by-list topic when ``records`` are keyed by ``key``.

    As :meth:`stream_jobs.worker.app.StormguardWorker.score_here` decides, with Kafka's default (murmur2) partitioner:
    a post to one list keyed by that list is scored where it lands; every other list post sends one
    share per list. Each share is one more record the worker consumes (and counts on ``/healthz``).
    """
    if partitions == 1:
        return 0
    dec = msgspec.json.Decoder()
    shares = 0
    for raw in records:
        lists = dec.decode(raw).get("lists") or {}
        if len(lists) == 1 and key(raw) == next(iter(lists)).encode():
            continue
        shares += len(lists)
    return shares


# -- helpers ------------------------------------------------------------------------------------
