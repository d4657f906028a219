"""Faust settings and transport changes that faust-streaming 0.15 does not expose, in one place.

Measured by ``make bench`` (docs/performance.md):

* :class:`BatchConsumer` (issue 19) hands each fetch's records of a batch topic
  (``mail.events`` and the by-list topic) straight to its handler, declared with
  :meth:`StormguardApp.batch_agent`: :class:`RecordEvent` objects in the scheduler's
  order, up to ``max_records`` a call, each handled chunk acked in one step into
  Faust's own ack bookkeeping, so Faust's commit rule (contiguous offsets only)
  is unchanged. Stock Faust builds a ``Message`` and an ``Event``, runs the
  conductor, a queue, a stream step with a ``sleep(0)`` and an ack under a lock
  for every record: a no-op agent on this consumer did about 20 times the records
  a second of one on stock Faust, side by side (about 8 µs of CPU a record);
* records of other topics go through :class:`BatchDrainConsumer`'s delivery: each
  fetched batch in one task instead of four tasks per record (Faust wraps every
  record's delivery in ``Service.wait_first``: a task for the delivery and one each
  for the flow, stop and crash events). Records, their order, offsets, gap tracking
  and commits are handled exactly as Faust's own loop does; a rebalance still
  abandons the rest of a fetched batch, and the partitions are re-read from their
  committed offsets;
* an offset commit every :data:`COMMIT_EVERY` records at most, besides Faust's
  commit interval;
* the consumer's fetch long-poll, which Faust hard-codes to 1.5 s, is capped
  (:func:`shorten_fetch_long_poll`).

:class:`StormguardApp` is ``faust.App`` with that consumer on ``kafka://`` and
``aiokafka://`` brokers (``fast_drain=False`` gives stock Faust back).

With ``STORMGUARD_EXACTLY_ONCE`` (Faust's ``processing_guarantee="exactly_once"``),
:class:`SourceTransactions` puts everything written while a record is processed into the
transaction of that record's partition, and a commit neither overlaps a batch being scored nor
misses a table write still in Faust's producer buffer (see the class).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, NamedTuple, Optional, cast

import faust
import msgspec
from aiokafka.consumer.fetcher import PartitionRecords
from faust.exceptions import ProducerSendError
from faust.streams import current_event
from faust.transport.consumer import CONSUMER_FETCHING, TransactionManager
from faust.transport.drivers import aiokafka as _faust_aiokafka
from mode import Service
from mode.utils.futures import notify

#: Records acked between two offset commits at most (besides Faust's commit every 2.8 s). Faust's 10,000
#: made a worker catching up commit several times a second, and every commit first writes every changed
#: list model (the worker's commit sensor): measured, a fifth of the worker's time (docs/performance.md).
COMMIT_EVERY = 100_000

_original = _faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer
_fetch_max_wait_ms: int | None = None
_consumer_record = PartitionRecords._consumer_record
#: Topics whose records aiokafka hands over as its own record objects, set by :func:`read_raw_records`.
_raw_topics: frozenset = frozenset()
#: :meth:`BatchConsumer._route`'s answer for a partition of a topic that Faust delivers, record by record
_FAUSTS = object()
_UNROUTED = object()


def _lean_consumer_record(self, tp, record):
    """aiokafka's ``PartitionRecords._consumer_record``, which returns the batch's record itself for the topics
    of :func:`read_raw_records`: it has ``offset``, ``timestamp`` (ms), ``key``, ``value`` and ``headers``,
    which is all :class:`BatchConsumer` reads, and the ``ConsumerRecord`` of eleven fields built from it was
    1.3 µs of the consumer thread's time per record (measured, aiokafka 0.14, a 1,000-record batch)."""
    if tp.topic in _raw_topics and self._key_deserializer is None and self._value_deserializer is None:
        return record
    return _consumer_record(self, tp, record)


def read_raw_records(topics) -> None:
    """Have this process's aiokafka consumers skip the ``ConsumerRecord`` of ``topics``' records.

    Only :class:`BatchConsumer` may read such topics (it takes a record's topic and partition from
    its ``tp``); Faust's own delivery needs ``ConsumerRecord``, and every other topic still gets one.
    """
    global _raw_topics
    _raw_topics = frozenset(topics)
    PartitionRecords._consumer_record = _lean_consumer_record


def _create_worker_consumer(self, transport):
    consumer = _original(self, transport)
    if _fetch_max_wait_ms is not None:
        consumer._fetch_max_wait_ms = _fetch_max_wait_ms
    # Faust reads uncommitted records unless it runs exactly-once itself; a gateway's aborted
    # transaction is one it will send again, and scoring it twice would count its reply-alls twice.
    consumer._isolation_level = "read_committed"
    return consumer


def shorten_fetch_long_poll(fetch_max_wait_ms: int) -> None:
    """Cap the consumer's fetch long-poll (Faust hard-codes 1.5 s).

    A broker that does not answer a long poll early when data arrives (Tansu)
    would otherwise delay every freeze by up to that; a short long-poll costs a
    few idle fetches a second.
    """
    global _fetch_max_wait_ms
    _fetch_max_wait_ms = fetch_max_wait_ms
    _faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer


def true_end_offsets(servers: list[str], security: dict, ends: dict) -> dict:
    """``ends`` (partition -> end offset as the broker reports it), each raised to one past the last
    record that a fetch from the reported end's last record returns.

    The embedded broker (Tansu 0.6) reports a partition's end as the base offset of its last batch
    plus one: when that batch holds several records, the others lie past the "end". Faust recovers a
    table's changelog up to the end, so a restarted worker lost the tail of every changelog partition
    whose last write was batched (its newest list models). On Apache Kafka the fetch returns that
    very last record and nothing changes; a partition that ends in a transaction marker (which a
    fetch does not return) keeps the reported end.
    """
    from kafka import KafkaConsumer, TopicPartition

    todo = {TopicPartition(tp.topic, tp.partition): (tp, end) for tp, end in ends.items() if end}
    if not todo:
        return dict(ends)
    out = dict(ends)
    consumer = KafkaConsumer(bootstrap_servers=servers, group_id=None, enable_auto_commit=False,
                             isolation_level="read_committed", **security)
    try:
        consumer.assign(list(todo))
        for ktp, (_, end) in todo.items():
            consumer.seek(ktp, end - 1)
        pending, deadline = set(todo), time.monotonic() + 5.0
        while pending and time.monotonic() < deadline:
            for ktp, records in consumer.poll(timeout_ms=200).items():
                tp, end = todo[ktp]
                out[tp] = max(out[tp], records[-1].offset + 1)
                pending.discard(ktp)
            for ktp in list(pending):
                if consumer.position(ktp) >= todo[ktp][1]:  # read past it: nothing more there
                    pending.discard(ktp)
    finally:
        consumer.close()
    return out


class TrueEndConsumer(_faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, with end offsets a table's recovery can trust (:func:`true_end_offsets`),
    and no fetch delivered across a seek (:meth:`_wait_next_records`)."""

    #: Bumped when a seek back to the committed offsets begins and when it ends: a fetch that saw it change
    #: may hold records read from before the seek (:meth:`_wait_next_records`). The event-time merge
    #: drops what it holds when it changes, as on a rebalance.
    seek_epoch: int = 0
    _fetch_in_flight: Optional[asyncio.Future] = None
    _fetch_epoch: int = 0
    #: the last seek back to the committed offsets begun (:meth:`_seek_committed`), until a later one begins
    _seek_task: Optional[asyncio.Future] = None

    async def _getmany(self, active_partitions, timeout: float):
        """Faust's, without the partitions the scheduler holds enough of (its ``full()``, if it has one):
        their records stay in aiokafka's buffer, and aiokafka fetches no more of them meanwhile. Every
        consumption path (batch, exactly-once, stock Faust) merges by event time, so each has the cap:
        without it the merge relies on ``max_held`` alone and lets records through out of order past it."""
        full = getattr(self.scheduler, "full", None)
        if full is not None and active_partitions:
            held = full()
            if held:
                active_partitions = set(active_partitions) - held
                if not active_partitions:  # every partition held: let the merge move first
                    return {}
        return await super()._getmany(active_partitions, timeout)

    async def highwaters(self, *partitions):  # pragma: no cover - runs in the worker
        ends = dict(await super().highwaters(*partitions))
        from stream_jobs.kafka.replay import kafka_security

        servers = [f"{u.host}:{u.port or 9092}" for u in self.app.conf.broker]
        try:
            return await asyncio.to_thread(true_end_offsets, servers, kafka_security(), ends)
        except Exception as exc:  # the broker's own answer is still an answer
            self.log.warning("could not check the end offsets the broker reported (%r)", exc)
            return ends


    async def perform_seek(self) -> None:
        """Faust's seek back to the committed offsets, with the flow stopped until the recovery resumes it.

        Faust's recovery resumes the consumer's flow when the tables are restored, then seeks the stream
        partitions back to their committed offsets, resets its read offsets, and only then clears the
        channel queues (``flow_control.resume``). A fetch delivered between the seek and that clear was
        thrown away with its read offsets kept: its records, fetched again, were dropped as already read,
        and with no committed offset yet (Faust then skips its contiguous-offset check) the first commit
        went past them. Seen on Apache Kafka under exactly-once (whose stream agent reads those queues):
        a worker still finishing a rebalance when traffic began lost exactly the first produced batch of
        each of its partitions (39 + 44 records), committed at their ends, never scored. With the flow
        stopped here nothing is delivered until both recovery paths that call this resume it, right after
        the clear; what a stopped fetch dropped is before the seek and is fetched again."""
        self.stop_flow()
        await self._seek_committed()

    def verify_event_path(self, now: float, tp) -> None:
        """Faust's check that a partition's records are flowing, skipped while aiokafka has no position for it.

        A partition rewound to its beginning (:meth:`seek_to_committed`) has none until the broker answers
        the offset reset; Faust's check reads it anyway, and aiokafka's assertion crashed the worker (seen
        on Apache Kafka right after a restart under exactly-once, once seeks after a fetch that spanned
        one had made that window more frequent). The next check, a few seconds on, looks again.
        """
        try:
            assignment = self._thread._ensure_consumer()._fetcher._subscriptions.subscription.assignment
            state = assignment.state_value(_faust_aiokafka.ensure_aiokafka_TP(tp)) if assignment else None
        except Exception:  # no consumer or no assignment yet: Faust's own check copes with that
            state = None
        if state is not None and not state.has_valid_position:
            return None
        return super().verify_event_path(now, tp)

    async def _seek_committed(self) -> None:
        """Seek back to the committed offsets, one seek at a time, finished even if the caller stops waiting.

        The exactly-once drain awaits its fetch, and the seeks a fetch can lead to, inside Faust's
        ``wait_first`` with the flow's suspension, and the recovery stops the flow to seek: that cancelled
        a seek half made. aiokafka's own seek (partitions with a committed offset) was done, the rewind of
        those without one (:meth:`seek_to_committed`) was not, and their positions stayed past records a
        fetch had just dropped. Seen on Apache Kafka under exactly-once: a survivor took over the
        partitions of a worker killed before its first commit, dropped their records in the fetch the
        rebalance stopped, and was ready with nothing to score, for good (a freeze never published).
        """
        before = self._seek_task
        task = self._seek_task = asyncio.ensure_future(self._seek_after(before))
        # a failure is its awaiting caller's to report; one that gave up was stopped by a rebalance or a stop,
        # and the next assignment seeks again
        task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    async def _seek_after(self, before: Optional[asyncio.Future]) -> None:
        await _ended(before)
        self.seek_epoch += 1
        try:
            await super().perform_seek()
        finally:
            self.seek_epoch += 1

    async def _wait_next_records(self, timeout: float):
        """Faust's fetch, never lost to a cancelled wait, and with what it got from before a seek dropped.

        * A fetch runs in the consumer's thread and advances aiokafka's positions when it returns. The
          drain awaits it inside ``wait_first`` with the flow's suspension, so a rebalance beginning
          cancelled the wait and not the fetch: what it returned later was thrown away, past the
          seek that should have brought it back. Seen on Apache Kafka under exactly-once: the first
          49 records of a partition never scored, the commits at its end. The fetch is shielded
          here; a wait cancelled before it ends leaves it to the next call, which takes its records.
        * The recovery, on the event loop, seeks the partitions back to their committed offsets and
          resumes the flow while a fetch is awaited in the thread. Records that fetch returns after
          that may have been read from the old positions: delivered, they were taken for records
          after the seek. Seen on Apache Kafka with two workers starting together on a full topic:
          the survivor of the first rebalance was handed records 4,046 onwards of a partition just
          rewound to 0, scored them, then dropped 0 to 4,045 as already read; its commits went past
          them (or stuck below them), and ``/healthz`` said ok with a quarter of the topic never
          scored. Which records of such a fetch came before the seek is not known, so none of the
          stream's are delivered: the seek is made again (they are fetched again from the committed
          offsets, at-least-once as on any rebalance). A table's changelog records go on as fetched:
          the recovery positions those itself.
        """
        task = self._fetch_in_flight
        if task is None:
            await _ended(self._seek_task)  # a fetch begun during a seek would be dropped: begin after it
            epoch = self.seek_epoch
            task = asyncio.ensure_future(super()._wait_next_records(timeout))
            task.add_done_callback(_retrieve)
            self._fetch_in_flight, self._fetch_epoch = task, epoch
        else:
            epoch = self._fetch_epoch
        try:
            records, active = await asyncio.shield(task)
        except asyncio.CancelledError:
            # A fetch that ended in the step its wait was given up in is the next call's too: dropped here,
            # its records were lost past aiokafka's positions (seen on Apache Kafka: a survivor's whole
            # takeover fetch, then nothing left to fetch). A stop ends it.
            if self.should_stop or task.cancelled():
                task.cancel()
                self._fetch_in_flight = None
            raise
        except BaseException:
            self._fetch_in_flight = None
            raise
        self._fetch_in_flight = None
        if not records or self.seek_epoch == epoch:
            return records, active
        changelog = self._is_changelog_tp
        kept = {tp: batch for tp, batch in records.items() if changelog(tp)}
        if len(kept) < len(records):
            self.log.info("a fetch spanned a seek to the committed offsets: its records are fetched again")
            try:
                await self._seek_committed()
            except Exception as exc:  # a partition moved away meanwhile: the next assignment seeks
                self.log.warning("exception seeking again after a fetch spanned a seek %r", exc)
        return kept, active

    async def seek_to_committed(self):
        """Faust's seek back to the committed offsets, which also rewinds partitions that have none.

        When a rebalance begins, Faust drops what it fetched and has not handled (a fetch that returns after
        the flow stopped, the rest of a fetch, what the event-time merge holds) and seeks back to the
        committed offsets to read it again. aiokafka seeks only partitions with a committed offset above 0;
        one with none kept its position, past the dropped records, which were never scored. Seen on Apache
        Kafka: a survivor taking over partitions its peer died before committing drained them to their end
        in the fetch that was waiting when the rebalance began (Faust hands that fetch its set of active
        partitions, which the new assignment fills before pausing it), dropped them, and was ready with
        nothing to score. Such a partition goes back where a consumer without an offset starts
        (``auto_offset_reset``, ``earliest`` for the worker): at-least-once, as for a committed one.
        Changelogs are left to the table recovery, which positions them itself.
        """
        committed = await super().seek_to_committed()
        rewind = [tp for tp, offset in committed.items() if not offset and not self._is_changelog_tp(tp)]
        if rewind and self.app.conf.consumer_auto_offset_reset == "earliest":
            thread = self._thread
            await thread.call_thread(_seek_to_beginning, thread._ensure_consumer(), rewind)
        return committed

    async def force_commit(self, topics=None, start_new_transaction: bool = True) -> bool:
        """Under exactly-once, never while a batch is being scored (:attr:`StormguardApp.scoring`)."""
        scoring = getattr(self.app, "scoring", None)
        if not self.in_transaction or scoring is None:
            return await super().force_commit(topics, start_new_transaction=start_new_transaction)
        async with scoring:
            return await super().force_commit(topics, start_new_transaction=start_new_transaction)


async def _ended(task: Optional[asyncio.Future]) -> None:
    """Wait until ``task`` (if any) has ended, however it ends, without cancelling it if this wait is."""
    if task is not None and not task.done():
        await asyncio.wait([task])


def _retrieve(task: asyncio.Future) -> None:
    """A fetch or a seek nobody awaited any more (a rebalance or a stop): its error, if any, is not news."""
    if not task.cancelled():
        task.exception()


async def _seek_to_beginning(consumer, tps: list) -> None:
    """In the consumer's thread: aiokafka's seek to the first offset each partition still has, for those
    still assigned (another rebalance may have begun since their committed offsets were read)."""
    assigned = consumer.assignment()
    tps = [tp for tp in tps if tp in assigned]
    if tps:  # no await between the check and aiokafka's own, which raises for a partition not assigned
        await consumer.seek_to_beginning(*tps)


#: Longest wait, before a commit, for table writes still in Faust's producer buffer (seconds).
UNSENT_WAIT_S = 30.0


class SourceTransactions(TransactionManager):
    """Faust's exactly-once transaction manager, with each write in its source record's transaction.

    Faust keeps one transactional producer per assigned partition and commits a partition's
    offsets in its transaction; but it picks a write's transaction by the partition the write goes
    *to*. That is right for a table's changelog (written to the partition of the record that changed
    it), and wrong for the worker's other writes: an action keyed by list, a dead letter keyed as
    its record was, a list's share routed to the partition that owns the list may land on any
    partition, often one of another worker (Faust then fails the send), or in a transaction that
    commits with other offsets. Here a write made while a record is processed (Faust's current
    event, which the worker sets for every record it scores) joins the transaction of that record's
    partition, so it commits exactly when that record's offset does, together with the list models
    the record changed. A write with no record behind it (an operator's command from the web view)
    needs no transaction and goes through the plain producer.

    Before a commit it waits for the table writes still in Faust's producer buffer (``send_soon``:
    a table's ``__setitem__`` cannot await), which Faust's exactly-once commit does not do: a list
    model saved just before the commit would otherwise land in the next transaction.
    """

    async def send(self, topic, key, value, partition, timestamp, headers, *, transactional_id=None):
        event = current_event()
        partition = self.consumer.key_partition(topic, key, partition)
        if event is not None:
            source = event.message
            group = self.app.assignor.group_for_topic(source.topic)
            transactional_id = f"{self.app.conf.id}-{group}-{source.partition}"
        elif topic in self.app.tables.changelog_topics and partition is not None:
            group = self.app.assignor.group_for_topic(topic)
            transactional_id = f"{self.app.conf.id}-{group}-{partition}"
        else:
            transactional_id = None
        if transactional_id is not None and transactional_id not in self.producer._transaction_producers:
            # The partition moved to another worker in a rebalance: its transaction is gone (the new
            # owner's producer fenced it) and the new owner redoes the work from the committed offsets.
            # A failed write, not an exception: Faust's producer buffer task would die of one.
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(ProducerSendError(f"partition moved away: no transaction {transactional_id}"))
            return failed
        return await self.producer.send(topic, key, value, partition, timestamp, headers,
                                        transactional_id=transactional_id)

    #: The transactional ids this worker holds producers for (those of its active partitions).
    held: frozenset = frozenset()

    async def on_rebalance(self, assigned, revoked, newly_assigned) -> None:
        """Stop the producers of every partition this worker no longer holds, and start fresh ones for those
        it gains. Faust stops only those of ``revoked``, which misses partitions that moved away here: their
        producers stayed, were fenced by the new owner, and were reused when the partitions came back (after
        the other worker died), so nothing this worker wrote for them ever committed."""
        now = frozenset(self._tps_to_transactional_ids(assigned))
        gone, new = self.held - now, now - self.held
        if gone:
            self.log.info("Stopping %r transactional producer(s) of partitions moved away", len(gone))
            await self._stop_transactions(sorted(gone))
        if new:
            self.log.info("Starting %r transactional producer(s) for %r assigned partitions", len(new),
                          len(assigned))
            await self._stop_transactions(sorted(new))  # a stale producer for this id was fenced: drop it
            await self._start_transactions(sorted(new))
        self.held = now

    async def commit(self, offsets, start_new_transaction: bool = True) -> bool:
        unsent = getattr(self.app, "unsent", None)
        if unsent:
            _, late = await asyncio.wait(list(unsent), timeout=UNSENT_WAIT_S)
            if late:
                self.log.warning("committing with %d table write(s) not yet acknowledged after %.0f s",
                                 len(late), UNSENT_WAIT_S)
        return await super().commit(offsets, start_new_transaction=start_new_transaction)


class TrueEndTransport(_faust_aiokafka.Transport):
    Consumer = TrueEndConsumer
    TransactionManager = SourceTransactions


class BatchDrainConsumer(TrueEndConsumer):
    """Faust's aiokafka consumer, delivering each fetched batch in one task.

    Mirrors ``faust.transport.consumer.Consumer._drain_messages`` (0.15.x)
    line for line, except that the per-record ``wait_first`` is hoisted around
    the whole batch.
    """

    #: Records delivered between two yields to the event loop (Faust's own figure).
    yield_every = 100

    async def _drain_messages(self, fetcher: Service) -> None:  # pragma: no cover - runs in the worker
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                ait = cast(AsyncIterator, getmany(timeout=1.0))
                # Sleeping because sometimes getmany is called in a loop never releasing to the event loop.
                await self.sleep(0)
                if not self.should_stop:
                    await self.wait_first(self._deliver(ait), self.suspend_flow.wait())
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _deliver(self, ait: AsyncIterator) -> None:
        callback = self.callback
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        yield_every = self.yield_every
        since_yield = 0
        sleep = asyncio.sleep
        async for tp, message in ait:
            since_yield += 1
            if since_yield > yield_every:
                await sleep(0)
                since_yield = 0
            offset = message.offset
            r_offset = get_read_offset(tp)
            if r_offset is None or offset >= r_offset:
                gap = offset - (r_offset or 0)
                if gap > 1 and r_offset and acks_enabled_for(message.topic):
                    await self._add_gap(tp, r_offset + 1, offset)
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
                await callback(message)
                set_read_offset(tp, offset)
            else:
                self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key, message.value)


class BatchDrainTransport(_faust_aiokafka.Transport):
    Consumer = BatchDrainConsumer
    TransactionManager = SourceTransactions


class RecordEvent(msgspec.Struct, eq=False, weakref=True):
    """One record of a batch topic, as a batch handler gets it: what the worker and Faust's tables read
    of a Faust ``Event`` (``key``, ``value``, ``headers`` and ``message``: ``topic``, ``partition``,
    ``offset``, ``timestamp`` in seconds, ``tp``), in one small object.

    A table write made while a record is the current event (``faust.streams._current_event``, a weak
    reference to it) goes to the changelog partition of the record's partition, as from an agent.
    A msgspec Struct (compared by identity, as an object is) because one is made for every record
    consumed: its ``__init__`` is msgspec's, in C.

    >>> ev = RecordEvent("mail.events", 3, 41, 1479112200.5, b"k", b"{}", (), None)
    >>> ev.message.partition, ev.message is ev, ev.decoded
    (3, True, None)
    """

    topic: str
    partition: int
    offset: int
    timestamp: Optional[float]
    key: Any
    value: Any
    headers: Any
    tp: Any
    #: what the consumer's scheduler decoded of ``value`` while merging (its ``decode``), else None
    decoded: Any = None

    @property
    def message(self) -> "RecordEvent":
        return self


class BatchHandler(NamedTuple):
    """What :meth:`StormguardApp.batch_agent` registered for one topic."""

    name: str
    handle: Callable[[list], Awaitable[None]]
    max_records: int


class BatchConsumer(BatchDrainConsumer):
    """Faust's aiokafka consumer that hands the records of batch topics to their handler a batch at a time.

    Faust delivers every record on its own: a ``Message``, a sensor call, the conductor, the topic's
    queue, the stream's ``Event``, a ``sleep(0)``, an ack under a lock. For a topic registered with
    :meth:`StormguardApp.batch_agent`, this consumer instead takes each fetch in the scheduler's order
    (:class:`~stream_jobs.worker.event_order.EventTimeScheduler` still merges partitions oldest event
    first), makes each record a :class:`RecordEvent`, and awaits the handler once per
    ``max_records`` of them. When the handler returns, the chunk is acked in one step: every offset of
    it goes to Faust's own acked lists (``_acked``), so Faust's commit rule (only offsets contiguous
    from the committed one, gaps of compaction and transaction markers filled by ``_add_gap``) decides
    what is committed, as before. So:

    * per-partition order is the fetch's order, and a record is acked only after the handler has
      finished with it and every record before it;
    * table writes the handler makes are produced before the commit that covers their records
      (Faust flushes its producer, or commits the transaction, before it commits offsets);
    * a chunk in the handler when a rebalance or a stop begins is finished first (:meth:`wait_empty`);
      the rest of the fetch is dropped unread and fetched again from the committed offsets;
    * a handler that raises stops this consumer's deliveries (nothing more is scored, nothing of that
      chunk is acked): the worker's handler has already said why and will exit.

    Records of other topics (operators' commands, table changelogs being recovered) go through
    Faust's own delivery, as with :class:`BatchDrainConsumer`.
    """

    _in_flight: Optional[asyncio.Future] = None
    #: the chunk of :attr:`_in_flight`, until it is acked (by :meth:`_handle` or a revocation)
    _in_flight_chunk: Optional[list] = None
    _handler_failed: Optional[BaseException] = None

    async def _drain_messages(self, fetcher: Service) -> None:  # pragma: no cover - runs in the worker
        handlers: dict[str, BatchHandler] = getattr(self.app, "batch_handlers", {})
        read_raw_records(handlers)
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        try:
            while not (consumer_should_stop() or fetcher_should_stop()) and self._handler_failed is None:
                set_flag(CONSUMER_FETCHING)
                records, active = await self._wait_next_records(1.0)
                await self.sleep(0)
                # An empty fetch too, as Faust's getmany: the scheduler may release records it held back.
                if records is not None and not self.should_stop:
                    if not self.flow_active:
                        await self._seek_back()
                    else:
                        await self._deliver_fetch(records, active, handlers)
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    async def _seek_back(self) -> None:
        """As Faust's getmany when a fetch returns after the flow stopped: re-read from the committed offsets.
        A rebalance that moves a partition away meanwhile makes aiokafka refuse the seek; as in Faust, that is
        a warning (the next assignment seeks again), not the end of this consumer's deliveries."""
        try:
            await self.perform_seek()
        except Exception as exc:
            self.log.warning("exception performing seek when flow not active %r", exc)

    async def _deliver_fetch(self, records: Mapping, active: Optional[set], handlers: dict) -> None:
        generation, epoch = self.app.consumer_generation_id, self.seek_epoch
        buffered = self._buffered_partitions
        pending: dict[BatchHandler, list] = {}
        others: list = []
        # tp -> [its handler's records, the offset before its next record (read offset, then this fetch's)],
        # _FAUSTS (a topic without a batch handler) or None (a partition no longer active): one lookup a record
        route: dict = {}
        gaps: list = []
        scheduler = self.scheduler
        iterate = getattr(scheduler, "iterate_decoded", None)
        pairs = iterate(records) if iterate is not None else ((tp, r, None) for tp, r in scheduler.iterate(records))
        for tp, record, decoded in pairs:
            to = route.get(tp, _UNROUTED)
            if to is _UNROUTED:
                to = route[tp] = self._route(tp, active, buffered, handlers, pending)
            if to is None:
                continue
            if to is _FAUSTS:
                others.append((tp, record))
                continue
            offset = record.offset
            before = to[1]
            if before is not None:
                if offset < before:
                    continue  # read already (Faust's "dropped message"; its test, its read offsets)
                if offset - before > 1:
                    gaps.append((tp, before + 1, offset - 1))
            to[1] = offset
            ts = record.timestamp
            to[0].append(RecordEvent(tp.topic, tp.partition, offset, None if ts is None else ts / 1000.0,
                                     record.key, record.value, record.headers, tp, decoded))
        if others:
            await self.wait_first(self._deliver(self._as_messages(others)), self.suspend_flow.wait())
        if not pending or not self.flow_active or generation != self.app.consumer_generation_id \
                or epoch != self.seek_epoch:
            return  # a rebalance began: these are fetched again from the committed offsets
        for tp, start, end in gaps:
            if self.app.topics.acks_enabled_for(tp.topic):
                await self._add_gap(tp, start, end)
        for handler, batch in pending.items():
            step = handler.max_records
            for i in range(0, len(batch), step):
                if not self.flow_active or generation != self.app.consumer_generation_id \
                        or epoch != self.seek_epoch or self._handler_failed is not None:
                    return
                await self._handle(handler, batch[i:i + step])

    def _route(self, tp: Any, active: Optional[set], buffered: set, handlers: dict, pending: dict) -> Any:
        """Where :meth:`_deliver_fetch` puts the records of ``tp``: its handler's list and the partition's read
        offset; :data:`_FAUSTS` for a topic without a batch handler (Faust delivers it); None for a partition
        no longer active (dropped)."""
        if active is not None and tp not in active and tp not in buffered:
            return None
        handler = handlers.get(tp.topic)
        if handler is None:
            return _FAUSTS
        batch = pending.get(handler)
        if batch is None:
            batch = pending[handler] = []
        return [batch, self._read_offset[tp]]

    async def _as_messages(self, pairs: list) -> AsyncIterator:
        to_message = self._to_message
        for tp, record in pairs:
            yield tp, to_message(tp, record)

    async def _handle(self, handler: BatchHandler, chunk: list) -> None:
        # Shielded: a stop cancels the fetcher, not a chunk half scored (wait_empty waits for it).
        task = self._in_flight = asyncio.ensure_future(handler.handle(chunk))
        self._in_flight_chunk = chunk
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._handler_failed = exc
            self._in_flight_chunk = None
            self.log.error("batch agent %s raised %r: its records are no longer delivered", handler.name, exc)
            return
        finally:
            if task.done():
                self._in_flight = None
        if not self._ack_in_flight(chunk):
            return  # acked by a revocation that waited for it (on_partitions_revoked)
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()

    def _ack_chunk(self, chunk: list) -> None:
        """Ack a handled chunk: its offsets per partition, in one step each (module doc)."""
        offsets: dict = {}
        for ev in chunk:
            got = offsets.get(ev.tp)
            if got is None:
                offsets[ev.tp] = [ev.offset]
            else:
                got.append(ev.offset)
        acks_enabled_for = self.app.topics.acks_enabled_for
        monitor = self.app.monitor
        now = time.monotonic()
        for tp, offs in offsets.items():
            self._read_offset[tp] = offs[-1]
            if monitor is not None:
                monitor.tp_read_offsets[tp] = offs[-1]
                monitor.stream_inbound_time[tp] = now
                monitor.messages_received_total += len(offs)
                monitor.events_total += len(offs)
            if not acks_enabled_for(tp.topic):
                continue
            committed = self._committed_offset[tp]
            if committed is not None and offs[0] < committed:
                offs = [o for o in offs if o >= committed]
            index = self._acked_index[tp]
            if index and not index.isdisjoint(offs):
                # Acked already, as Faust's own ack refuses: a chunk finished while a rebalance began acks
                # after Faust cleared the partition's bookkeeping, and the partition, kept, is read again
                # from its committed offset. Twice in Faust's list, an offset breaks every run of
                # consecutive offsets there, and each commit moved one record on (seen on Apache Kafka).
                offs = [o for o in offs if o not in index]
            self._acked[tp].extend(offs)
            index.update(offs)
            self._n_acked += len(offs)
        notify(self._waiting_for_ack)

    async def on_partitions_revoked(self, revoked: set) -> None:
        """Faust's, after what was scored here is committed (at-least-once).

        Faust forgets a revoked partition's acks first, and then commits nothing of it: every record
        scored since the last commit was read again by the partition's next owner, and an eager
        rebalance revokes every partition, this worker's own included. The detector ignores a list post
        it has counted, but a re-read one older than its list's model by more than
        ``STORMGUARD_MAX_LATENESS`` was dead-lettered as late: hundreds of copies a rebalance. So the
        chunk being scored is finished and acked, and the acks are committed, while the group still
        accepts this member's commits, as Kafka's own consumers do in their revocation callback. Under
        exactly-once the revoked partitions' transaction decides, as in Faust. A commit that fails is a
        warning: the next owner re-reads from the last commit, as before.
        """
        if revoked and not self.in_transaction and not self.app.should_stop:
            # Faust stops the flow only after this: meanwhile the drain went on scoring (a whole backlog,
            # seen on Apache Kafka), and every record of it was read again by the next owners.
            self.stop_flow()
            await self._finish_in_flight()
            try:
                await self.maybe_wait_for_commit_to_finish()  # a commit under way has not got the last acks
                await self.commit()
            except Exception as exc:
                self.log.warning("commit before a revocation failed (%r): the partitions' next owner "
                                 "re-reads the records scored since the last commit", exc)
        await super().on_partitions_revoked(revoked)

    async def _finish_in_flight(self) -> None:
        """Wait for the chunk being scored, and ack it if it was scored (its :meth:`_handle` may resume later)."""
        task, chunk = self._in_flight, self._in_flight_chunk
        if task is None or chunk is None:
            return
        try:
            await asyncio.shield(task)
        except Exception:  # reported by _handle
            return
        self._ack_in_flight(chunk)

    def _ack_in_flight(self, chunk: list) -> bool:
        """Ack ``chunk`` if it is the scored chunk nobody has acked yet: :meth:`_handle` and a revocation
        may both reach it, and an offset acked twice would count twice in Faust's monitor."""
        if self._in_flight_chunk is not chunk:
            return False
        self._in_flight_chunk = None
        self._ack_chunk(chunk)
        return True

    async def wait_empty(self) -> None:
        """Faust's, after the chunk in a batch handler (if any) is finished and acked."""
        await self._finish_in_flight()
        await super().wait_empty()


class BatchTransport(_faust_aiokafka.Transport):
    Consumer = BatchConsumer
    TransactionManager = SourceTransactions


def _cheap_ebb_check(buffer) -> None:
    """Faust waits for the producer buffer to ebb before each record; ask its queue length directly.

    ``ProducerBuffer.wait_until_ebb`` computes ``size`` through ``app.conf`` (a registry lookup)
    for every record; this answers the common case, a buffer below ``max_messages``, from the
    queue itself and leaves the rest to Faust's own method.
    """
    full_wait = buffer.wait_until_ebb
    pending = buffer.pending
    limit = buffer.max_messages

    async def wait_until_ebb() -> None:
        if pending.qsize() > limit:
            await full_wait()

    buffer.wait_until_ebb = wait_until_ebb


def _track_unsent(buffer, unsent: set) -> None:
    """Remember every write put in Faust's producer buffer until the broker has it (or refused it)."""
    put = buffer.put

    def tracked_put(fut) -> None:
        unsent.add(fut)
        fut.add_done_callback(unsent.discard)
        put(fut)

    buffer.put = tracked_put


class StormguardApp(faust.App):
    """``faust.App`` whose Kafka consumer delivers fetched batches in one task (see the module doc).

    With ``fast_drain`` it also checks the producer buffer, which Faust does
    before every record, without reading two settings through Faust's settings
    registry each time (:func:`_cheap_ebb_check`).
    """

    #: Under exactly-once: held while a batch is scored and while offsets are committed, so that a
    #: transaction holds all of a batch's writes or none (None: at-least-once).
    scoring: "asyncio.Lock | None" = None
    #: Under exactly-once: writes queued in Faust's producer buffer and not yet acknowledged by the broker.
    unsent: "set | None" = None

    def __init__(self, *args: Any, fast_drain: bool = True, **kwargs: Any) -> None:
        self.fast_drain = fast_drain
        #: topic name -> its batch agent (:meth:`batch_agent`)
        self.batch_handlers: dict[str, BatchHandler] = {}
        super().__init__(*args, **kwargs)
        if self.conf.processing_guarantee.value == "exactly_once":
            self.scoring = asyncio.Lock()
            self.unsent = set()

    def batch_agent(self, topic: faust.TopicT, *, name: str, max_records: int = 500) -> Callable:
        """Declare ``handle(records)``, awaited with up to ``max_records`` :class:`RecordEvent` of ``topic``
        (every topic it names) at a time, in the consumer's order; a record is acked once its chunk is
        handled (:class:`BatchConsumer`). Needs ``fast_drain``: on stock Faust, declare an agent instead.

        >>> app = StormguardApp("doc-batch-agent", broker="kafka://127.0.0.1:1")
        >>> @app.batch_agent(app.topic("t1", "t2"), name="count")
        ... async def count(records): ...
        >>> sorted(app.batch_handlers), app.batch_handlers["t1"].max_records
        (['t1', 't2'], 500)
        """
        if not self.fast_drain:
            raise ValueError("a batch agent needs the worker's consumer (fast_drain); stock Faust has agents")
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, not {max_records}")

        def register(handle: Callable[[list], Awaitable[None]]) -> Callable[[list], Awaitable[None]]:
            handler = BatchHandler(name, handle, max_records)
            for topic_name in topic.topics:
                if topic_name in self.batch_handlers:
                    raise ValueError(f"{topic_name} already has a batch agent ({self.batch_handlers[topic_name].name})")
                self.batch_handlers[topic_name] = handler
            self.topics.add(topic)  # subscribed, and acked, as an agent's topic is
            return handle

        return register

    @classmethod
    def from_settings(cls, settings, **options: Any) -> "StormguardApp":
        """The app as the worker runs it, from :class:`stream_jobs.settings.WorkerSettings`
        (the bench's no-op agent is built the same way, so like is compared with like)."""
        shorten_fetch_long_poll(settings.fetch_max_wait_ms)
        if settings.fast_drain:
            options.setdefault("broker_commit_every", COMMIT_EVERY)
        return cls(settings.app_id, fast_drain=settings.fast_drain, **settings.faust_app_options(), **options)

    def _new_producer(self):
        producer = super()._new_producer()
        if self.fast_drain and not self.conf.producer_threaded:
            _cheap_ebb_check(producer.buffer)
        if self.unsent is not None:
            _track_unsent(producer.buffer, self.unsent)
        return producer

    def _new_transport(self):
        url = self.conf.broker_consumer[0]
        if self.fast_drain and url.scheme in ("kafka", "aiokafka"):
            if self.scoring is not None:
                # exactly-once keeps the batched stream agent and its commit lock (app.scoring, tested
                # with kill -9 on Apache Kafka); the batch path has no such lock yet
                return BatchDrainTransport(self.conf.broker_consumer, self)
            return BatchTransport(self.conf.broker_consumer, self)
        if url.scheme in ("kafka", "aiokafka"):
            return TrueEndTransport(self.conf.broker_consumer, self)
        return super()._new_transport()


class RawSchema(faust.Schema):
    """Records exactly as on the wire: bytes key, bytes value, headers; nothing decoded.

    The detectors decode the value themselves (msgspec, :func:`detectors.events.parse_event`),
    so Faust's serializer registry, which for ``raw`` only copies the bytes, is skipped on the
    hot path. Encoding (``send``) is unchanged: ``raw`` both ways.

    >>> RawSchema().key_serializer, RawSchema().value_serializer
    ('raw', 'raw')
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("key_type", bytes)
        kwargs.setdefault("value_type", bytes)
        kwargs.setdefault("key_serializer", "raw")
        kwargs.setdefault("value_serializer", "raw")
        super().__init__(**kwargs)

    def compile(self, app, *, on_key_decode_error=None, on_value_decode_error=None, default_propagate=False):
        event_class = app.conf.Event  # what app.create_event looks up in the settings for every record

        async def decode(message, *, propagate: bool = default_propagate):
            return event_class(app, message.key, message.value, message.headers, message)

        return decode
