"""The milter's decision per message (``stormguard milter``): build the contract event, look the message up.

Measured in-process over the bench's realistic events, each turned into what the milter collects
from Postfix (envelope, recipients, Message-ID, In-Reply-To, References, Subject), against a
:class:`~detectors.holds.HoldBook` as a busy day leaves it: a thousand held threads (one of them
every storm's) and twenty frozen lists. The protocol round trip is not in it: that is Postfix's
and the loopback's.
"""

from __future__ import annotations

import time

import msgspec

from detectors.events import parse_event
from detectors.holds import HoldBook
from detectors.policy import ThreadHold


def milter_decisions(records: list[bytes], held_threads: int = 1_000, frozen_lists: int = 20) -> dict:
    """p50/p99/max of one decision in milliseconds, decisions per second and per CPU-second, and how many held."""
    from stream_jobs.postfix.milter import MessageSeen, MilterDecider

    events = [parse_event(r) for r in records]
    lists: dict[str, int] = {}
    for e in events:
        lists.update(e.lists)
    book = HoldBook()
    now = max(e.event_time for e in events)
    roots = [e.message_id for e in events if e.lists and not e.is_reply][:held_threads]
    by_id = {e.message_id: e for e in events}
    for root in roots:  # an anomalous post's hold, still running
        book.hold_thread(min(by_id[root].lists), ThreadHold(root=root, ids=[root], until=now + 3600.0))
    for address in sorted(lists, key=lists.get, reverse=True)[:frozen_lists]:
        book.freeze(address)
    decider = MilterDecider(book, lists, clock=lambda: now)
    seen = [MessageSeen(queue_id=f"Q{i}", sender=e.sender, recipients=list(e.recipients),
                        headers={k: v for k, v in (("message-id", e.message_id), ("in-reply-to", e.in_reply_to),
                                                    ("references", e.in_reply_to), ("subject", e.subject)) if v})
            for i, e in enumerate(events)]
    timings = []
    held = 0
    cpu = time.process_time()
    started = time.perf_counter()
    for s in seen:
        t0 = time.perf_counter()
        _, hold = decider.decide(s)
        timings.append(time.perf_counter() - t0)
        held += hold is not None
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    timings.sort()

    def q(p: float) -> float:
        return timings[min(len(timings) - 1, int(p * len(timings)))] * 1000.0

    return {"events": len(seen), "seconds": seconds, "events_per_s": len(seen) / seconds, "cpu_s": cpu,
            "events_per_cpu_s": len(seen) / cpu if cpu > 0 else float("nan"), "p50_ms": q(0.50), "p99_ms": q(0.99),
            "max_ms": timings[-1] * 1000.0, "held": held, "held_threads": len(roots), "frozen_lists": frozen_lists,
            "includes": "MessageSeen -> contract event (msgspec) and HoldBook lookup; not the protocol round trip"}


if __name__ == "__main__":  # python -m stream_jobs.bench.milter: the figure alone, on 20,000 events
    from stream_jobs.bench.traffic import encode_all, realistic_events

    print(msgspec.json.encode(milter_decisions(encode_all(realistic_events(20_000, seed=2016)))).decode())
