"""Event-time order across partitions: the partition whose next record is oldest goes first.

One worker reads several partitions of ``mail.events`` (and of the by-list
topic), and Kafka hands them over unevenly: catching up after an outage, one
partition's fetch can cover half an hour of mail while another's covers a
minute. Scored in that order, a list whose posts arrive on several partitions
(events keyed by sender, or not at all) would see its newest posts first and
dead-letter the rest as late. :class:`EventTimeScheduler` is Faust's consumer
scheduler (``ConsumerScheduler``) with a merge instead of a round robin, as
Kafka Streams picks the partition with the oldest head record:

* records of the ordered topics are held per partition and released oldest
  event first (the payload's own ``timestamp``, not the record's);
* a partition that has run dry but still has records in the broker (its
  position is behind its high-water mark) holds back every record newer than
  the last one it gave, until its next fetch arrives (one that has given
  nothing yet holds back everything); a partition that is
  caught up holds nothing back, so live traffic is not delayed;
* so that nothing can stall for good, the merge waits at most ``max_wait``
  seconds, and holds at most ``max_held`` records; past either it lets the
  oldest through (counted in ``released_early``). So that a partition slow to
  arrive does not see the others fill ``max_held``, the worker's consumer
  fetches no more of a partition of which ``max_held_per_partition`` records
  are held (:meth:`EventTimeScheduler.full`): they wait in the Kafka client's
  buffer, as in Kafka Streams' ``buffered.records.per.partition``.

Order within a partition is never changed, so offsets, gaps and commits are
Faust's as before; held records are not acked, so a crash re-reads them.

>>> from collections import namedtuple
>>> TP, Rec = namedtuple("TP", "topic partition"), namedtuple("Rec", "offset value")
>>> ev = lambda t: b'{"timestamp": %d}' % t
>>> s = EventTimeScheduler(ordered_topics={"mail.events"})
>>> fetch = {TP("mail.events", 0): [Rec(0, ev(5)), Rec(1, ev(9))], TP("mail.events", 1): [Rec(0, ev(7))]}
>>> [(tp.partition, json.loads(r.value)["timestamp"]) for tp, r in s.iterate(fetch)]
[(0, 5), (1, 7), (0, 9)]
"""

from __future__ import annotations

import heapq
import json  # noqa: F401  (the doctest)
import math
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import msgspec
from faust.transport.utils import DefaultSchedulingStrategy

from detectors.events import Rfc3339
from stream_jobs.settings import ORDER_MAX_HELD


class _When(msgspec.Struct):
    timestamp: Union[float, Rfc3339]


_when = msgspec.json.Decoder(_When)


def event_time_of(raw: Any) -> float:
    """The event time of a raw record, or -inf when it has none (it is released at once and dead-lettered).

    >>> event_time_of(b'{"timestamp": "2016-11-14T08:30:00Z", "x": 1}'), event_time_of(b"junk")
    (1479112200.0, -inf)
    """
    try:
        ts = _when.decode(raw).timestamp
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, UnicodeDecodeError):
        return -math.inf
    return ts if type(ts) is float else ts.timestamp()


class EventTimeScheduler(DefaultSchedulingStrategy):
    """Faust's ``ConsumerScheduler``: ordered topics merged by event time (module doc)."""

    #: Set by the worker: topics whose records are merged; everything else goes round robin at once.
    ordered_topics: frozenset = frozenset()
    #: Set by the worker: ``tp -> bool``, whether the broker holds records of ``tp`` not fetched yet.
    has_backlog: Optional[Callable[[Any], bool]] = None
    #: Set by the worker: the partitions assigned to this worker. One that has not given a record yet holds
    #: back the others as one run dry does (the first fetch rarely brings every partition at once).
    assigned: Optional[Callable[[], Iterable[Any]]] = None
    #: Set by the worker: a number that changes on every rebalance (held records are dropped then:
    #: Faust seeks back to the committed offsets and fetches them again).
    generation: Callable[[], Any] = staticmethod(lambda: None)
    max_wait: float = 2.0
    #: Records held in all, past which the oldest go through (about 1 KB each, decoded: 200 MB at most). It
    #: must exceed what the fetches made before a late partition's first can hand over: the per-partition
    #: cap below stops fetching a partition only between fetches, and one fetch of a backlog partition
    #: brings up to the partition's fetch size (1 MiB, about 4,500 records of mail.events, on Apache Kafka;
    #: Tansu sends more, 22,000 seen). At 50,000, seven partitions' first fetches overran it while the
    #: eighth had given nothing: records out of order in 5 of 18 catch-ups of 200,000 sender-keyed events
    #: on 8 partitions of Tansu, up to 317 of them dead-lettered as late; 0 of 10 at 200,000.
    max_held: int = ORDER_MAX_HELD
    #: Records held of one partition past which the consumer fetches no more of it (:meth:`full`) until
    #: the merge has let them through: one partition slow to give its first records must not see the
    #: others fill ``max_held`` (which lets the oldest through out of order).
    max_held_per_partition: int = 1_000
    #: Set by the worker: ``raw -> (event time, decoded)`` for records of ordered topics, where decoded is
    #: handed on with the record (:meth:`iterate_decoded`); None: only the event time is read.
    decode: Optional[Callable[[Any], tuple[float, Any]]] = None

    def __init__(self, ordered_topics: Optional[Iterable[str]] = None, clock: Callable[[], float] = time.monotonic):
        if ordered_topics is not None:
            self.ordered_topics = frozenset(ordered_topics)
        self._clock = clock
        self._held: dict[Any, deque] = {}
        self._last_time: dict[Any, float] = {}
        self._n_held = 0
        self._generation: Any = None
        self._stuck_since: Optional[float] = None
        #: Records let through out of order because the merge waited too long or held too many.
        self.released_early = 0

    @property
    def held(self) -> int:
        return self._n_held

    def iterate(self, records: Mapping[Any, list]) -> Iterator[tuple[Any, Any]]:
        for tp, record, _ in self.iterate_decoded(records):
            yield tp, record

    def iterate_decoded(self, records: Mapping[Any, list]) -> Iterator[tuple[Any, Any, Any]]:
        """:meth:`iterate`, each record with what :attr:`decode` made of it (None for unordered topics).

        The merge must read every ordered record's event time anyway; with a :attr:`decode` that
        parses the whole event, the consumer hands that on, and the record is decoded once.
        """
        generation = self.generation()
        if generation != self._generation:
            self._generation = generation
            self._held.clear()
            self._last_time.clear()
            self._n_held = 0
        others = {}
        ordered = self.ordered_topics
        decode = self.decode
        for tp, batch in records.items():
            if tp.topic not in ordered:
                others[tp] = batch
                continue
            buf = self._held.get(tp)
            if buf is None:
                buf = self._held[tp] = deque()
            if decode is None:
                for record in batch:
                    buf.append((event_time_of(record.value), None, record))
            else:
                for record in batch:
                    buf.append((*decode(record.value), record))
            self._n_held += len(batch)
        if others:
            for tp, record in super().iterate(others):
                yield tp, record, None
        if self._n_held:
            yield from self._merge()

    def _merge(self) -> Iterator[tuple[Any, Any, Any]]:
        held, last_time = self._held, self._last_time
        # (time of the partition's oldest held record, the partition, the newest time it has released)
        heap = [(buf[0][0], tp, last_time.get(tp, -math.inf)) for tp, buf in held.items() if buf]
        heapq.heapify(heap)
        # records newer than this wait: some partition ran dry, or has given nothing yet, while the broker
        # still has more of it
        dry = [tp for tp, buf in held.items() if not buf]
        dry.extend(tp for tp in self._assigned() if tp not in held)
        limit = min((last_time.get(tp, -math.inf) for tp in dry if self._behind(tp)), default=math.inf)
        released = False
        try:
            while heap:
                t, tp, newest = heap[0]
                if t > limit:
                    if self._n_held <= self.max_held and self._may_wait(released):
                        return
                    self.released_early += 1
                buf = held[tp]
                entry = buf.popleft()
                self._n_held -= 1
                if t > newest:
                    newest = t
                released = True
                # the heap is brought up to date before the record is handed on, so that what the finally
                # clause saves is right wherever the caller stops
                if buf:
                    heapq.heapreplace(heap, (buf[0][0], tp, newest))
                else:
                    heapq.heappop(heap)
                    last_time[tp] = newest
                    if self._behind(tp):
                        limit = min(limit, newest)
                yield tp, entry[-1], entry[1]
            self._stuck_since = None
        finally:
            for _, tp, newest in heap:  # the newest times ride in the heap: no dict lookups per record
                last_time[tp] = newest

    def full(self) -> frozenset:
        """Partitions holding ``max_held_per_partition`` records or more: not to be fetched for now.

        >>> from collections import namedtuple
        >>> TP, Rec = namedtuple("TP", "topic partition"), namedtuple("Rec", "offset value")
        >>> s = EventTimeScheduler(ordered_topics={"t"}); s.max_held_per_partition = 2
        >>> s.assigned = lambda: [TP("t", 0), TP("t", 1)]
        >>> s.has_backlog = lambda tp: True  # partition 1 has given nothing yet: partition 0 is held
        >>> list(s.iterate({TP("t", 0): [Rec(i, b'{"timestamp": %d}' % i) for i in range(3)]}))
        []
        >>> sorted(tp.partition for tp in s.full())
        [0]
        """
        cap = self.max_held_per_partition
        return frozenset(tp for tp, buf in self._held.items() if len(buf) >= cap)

    def _assigned(self) -> Iterable[Any]:
        check = self.assigned
        if check is None:
            return ()
        try:
            return [tp for tp in check() if tp.topic in self.ordered_topics]
        except Exception:  # between rebalances: nothing known, nothing to wait for
            return ()

    def _behind(self, tp: Any) -> bool:
        check = self.has_backlog
        if check is None:
            return False
        try:
            return bool(check(tp))
        except Exception:  # between rebalances: nothing known, nothing to wait for
            return False

    def _may_wait(self, released: bool) -> bool:
        now = self._clock()
        if self._stuck_since is None or released:
            # a wait starts when the merge stops moving: one that moved on since the last wait is a new wait
            # (a wait timed from the first ever, when records keep trickling in, let everything through early)
            self._stuck_since = now
        return now - self._stuck_since < self.max_wait

    def forget(self, tps: Iterable[Any]) -> None:
        """Drop what is held of partitions this worker no longer owns."""
        for tp in tps:
            buf = self._held.pop(tp, None)
            if buf:
                self._n_held -= len(buf)
            self._last_time.pop(tp, None)
