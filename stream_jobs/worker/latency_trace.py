"""Where a freeze's latency goes inside the worker: one log line per freeze (``STORMGUARD_LATENCY_TRACE``).

The bench's latency phase (``make bench``) turns it on and joins each line with what it saw outside
the worker (the storm message's ``send()`` and broker acknowledgement, the freeze's record timestamp
and the moment it read the freeze) into a per-stage breakdown (docs/performance.md). Each line is
``latency-trace {json}`` at WARNING (the worker's default level), with wall-clock seconds:

* ``fetched``: the consumer handed the fetch holding the record to the scheduler;
* ``released``: the event-time scheduler let the record through (it holds records while another
  partition it reads may still deliver older ones, :mod:`stream_jobs.worker.event_order`);
* ``batch_start``, ``batch_len``, ``index``: the scorer's call that held the record, its size and the
  record's place in it (records before it are scored first);
* ``scored``: the detector decided; ``published``: every write of the decision is with the producer;
* ``acked``: the broker acknowledged the freeze's record (the line is written then).

Off (the default), the worker runs none of this. On, it costs two dictionary writes per record of
``mail.events`` and the by-list topic, and keeps the times of the last :data:`KEEP` records.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator

log = logging.getLogger("stormguard.latency")

#: Records whose fetch and release times are kept (older ones are forgotten: a freeze is traced as it
#: is published, moments after its record was released).
KEEP = 50_000


class LatencyTrace:
    """Fetch and release times of recent records, and one log line per freeze (module doc)."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self.fetched: dict[tuple, float] = {}
        self.released: dict[tuple, float] = {}

    def _trim(self, d: dict) -> None:
        if len(d) > self.keep:
            for key in list(d)[: len(d) - self.keep // 2]:
                del d[key]

    def iterate(self, iterate, records, ordered: frozenset) -> Iterator[tuple]:
        """The scheduler's ``iterate(records)`` (or ``iterate_decoded``: each item starts with the partition and
        the record), noting when each record of ``ordered`` topics came and went."""
        now = time.time()
        fetched = self.fetched
        for tp, batch in records.items():
            if tp.topic in ordered:
                for record in batch:
                    fetched[(tp.topic, tp.partition, record.offset)] = now
        self._trim(fetched)
        released = self.released
        for item in iterate(records):
            tp, record = item[0], item[1]
            released[(tp.topic, tp.partition, record.offset)] = time.time()
            yield item
        self._trim(released)

    def freeze(self, event: Any, outcome: Any, index: int, batch_len: int, batch_start: float, scored: float,
               sent: Any = None) -> None:
        """Log the times of a record whose decision is a freeze, once the broker has the freeze (``sent``, the
        action record's delivery future; without one, at once)."""
        message = event.message
        key = (message.topic, message.partition, message.offset)
        line = {"message_id": getattr(outcome.event, "message_id", None), "topic": message.topic,
                "partition": message.partition, "offset": message.offset, "record_ts": message.timestamp,
                "fetched": self.fetched.get(key), "released": self.released.get(key), "batch_start": batch_start,
                "batch_len": batch_len, "index": index, "scored": scored, "published": time.time(), "acked": None}

        def write(fut: Any = None) -> None:
            if fut is not None and not fut.cancelled() and fut.exception() is None:
                line["acked"] = time.time()
            log.warning("latency-trace %s", json.dumps(line))

        if sent is not None and hasattr(sent, "add_done_callback"):
            sent.add_done_callback(write)
        else:
            write()
