"""The worker's batch consumer (issue 19): what it acks and when, and what Faust's own commit rule then commits.

These run the real Faust consumer object, not started: no broker is needed to hand it chunks and ask
which offset it would commit. The live tests (test_worker_live, test_faults_live) run it against a broker.
"""

from __future__ import annotations

import asyncio

import pytest

from stream_jobs.worker.faust_tuning import RecordEvent, StormguardApp


def _app(fail_on: int = -1):
    app = StormguardApp(f"test-batch-{fail_on}", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False)
    topic = app.topic("mail.events", partitions=2)
    handled: list[list[int]] = []

    @app.batch_agent(topic, name="score", max_records=3)
    async def score(records: list) -> None:
        if any(r.offset == fail_on for r in records):
            raise RuntimeError("drill")
        await asyncio.sleep(0)
        handled.append([r.offset for r in records])

    return app, handled


def _records(tp, offsets):
    return [RecordEvent(tp.topic, tp.partition, o, 1479112200.0, b"k", b"{}", (), tp) for o in offsets]


class Rec:
    """A record as aiokafka fetches it (the fields the batch consumer reads), of event time ``when``."""

    def __init__(self, tp, offset, when):
        self.topic, self.partition, self.offset, self.timestamp = tp.topic, tp.partition, offset, 1000
        self.key, self.headers = b"k", ()
        self.value = b'{"timestamp": %d}' % when


async def _consumer(app):
    await app.topics._update_indices()  # what Faust does when it subscribes: mail.events is an acked topic
    consumer = app.consumer
    tp = consumer._new_topicpartition("mail.events", 0)
    consumer._committed_offset[tp] = 0
    return consumer, tp, app.batch_handlers["mail.events"]


async def _two_partitions(app):
    """:func:`_consumer` with partition 1 assigned too, and the flow running: ready for a fetch."""
    consumer, tp, handler = await _consumer(app)
    tp1 = consumer._new_topicpartition("mail.events", 1)
    consumer._committed_offset[tp1] = 0
    consumer.flow_active = True
    return consumer, tp, tp1, handler


async def _flowing(app):
    """:func:`_consumer` with partition 0 the one active partition and the flow running, ready to fetch."""
    from faust.types import TP

    consumer, _, _ = await _consumer(app)
    tp = TP("mail.events", 0)
    consumer._active_partitions = {tp}
    consumer.flow_active = True
    return consumer, tp


def test_a_handled_chunk_is_acked_and_only_contiguous_offsets_are_committed():
    async def main():
        app, handled = _app()
        consumer, tp, handler = await _consumer(app)
        await consumer._handle(handler, _records(tp, [0, 1, 2]))
        assert handled == [[0, 1, 2]] and consumer._read_offset[tp] == 2
        assert consumer._new_offset(tp) == 3
        consumer._committed_offset[tp] = 3
        await consumer._handle(handler, _records(tp, [6, 7]))  # 4 and 5 neither handled nor known gaps
        assert consumer._new_offset(tp) is None
        await consumer._add_gap(tp, 4, 5)  # e.g. transaction markers: offsets with no record
        assert consumer._new_offset(tp) == 8

    asyncio.run(main())


def test_a_chunk_whose_handler_raises_is_not_acked_and_nothing_more_is_delivered():
    async def main():
        app, handled = _app(fail_on=4)
        consumer, tp, handler = await _consumer(app)
        await consumer._handle(handler, _records(tp, [0, 1, 2]))
        await consumer._handle(handler, _records(tp, [3, 4, 5]))
        assert handled == [[0, 1, 2]]
        assert isinstance(consumer._handler_failed, RuntimeError)
        assert consumer._new_offset(tp) == 3  # the failed chunk's records will be read again

    asyncio.run(main())


def test_a_fetch_reaches_the_handler_in_chunks_in_the_schedulers_order():
    async def main():
        app, handled = _app()
        consumer, tp, tp1, handler = await _two_partitions(app)

        fetch = {tp: [Rec(tp, 0, 5), Rec(tp, 1, 9)], tp1: [Rec(tp1, 0, 7), Rec(tp1, 1, 8)]}
        await consumer._deliver_fetch(fetch, None, app.batch_handlers)
        # Faust's round robin here (the worker sets the event-time scheduler): 3 records a chunk
        assert [len(c) for c in handled] == [3, 1] and sorted(sum(handled, [])) == [0, 0, 1, 1]
        assert consumer._new_offset(tp) == 2 and consumer._new_offset(tp1) == 2

    asyncio.run(main())


def test_a_fetch_skips_what_was_read_fills_gaps_and_drops_partitions_no_longer_active():
    """Per partition, as Faust's own getmany: a record at or before the read offset that it has seen is not
    delivered again, offsets a fetch skips (compaction, transaction markers) are gaps Faust's commit may
    step over, and a partition that is neither active nor buffered any more delivers nothing."""
    async def main():
        app, handled = _app()
        consumer, tp, tp1, handler = await _two_partitions(app)

        await consumer._handle(handler, _records(tp, [0, 1, 2]))
        handled.clear()
        # tp: 1 was read already, 3 follows 2, 6 skips 4 and 5; tp1 is no longer active
        fetch = {tp: [Rec(tp, o, 5) for o in (1, 3, 6)], tp1: [Rec(tp1, o, 5) for o in (0, 1)]}
        await consumer._deliver_fetch(fetch, {tp}, app.batch_handlers)
        assert sorted(sum(handled, [])) == [3, 6]
        assert consumer._new_offset(tp) == 7  # through the gap 4..5
        assert consumer._new_offset(tp1) is None

    asyncio.run(main())


def test_batch_topics_are_read_as_aiokafkas_own_records_and_reach_the_handler_whole():
    """No ``ConsumerRecord`` for the batch topics (read_raw_records): aiokafka's record of a real record
    batch goes to the handler with its partition, offset, time, key, value and headers; other topics,
    which Faust delivers itself, still get a ``ConsumerRecord``."""
    from aiokafka.consumer.fetcher import PartitionRecords
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.structs import ConsumerRecord, TopicPartition

    from stream_jobs.worker import faust_tuning

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for offset in range(3):
        builder.append(offset, timestamp=1479112200000 + offset, key=b"k%d" % offset,
                       value=b'{"timestamp": %d}' % offset, headers=[("trace", b"t%d" % offset)])
    batch = bytes(builder.build())

    def fetched(topic: str, partition: int) -> list:
        return list(PartitionRecords(TopicPartition(topic, partition), MemoryRecords(batch), [], 0, None, None,
                                     False, 0))

    async def main():
        app, handled = _app()
        consumer, tp, handler = await _consumer(app)
        consumer.flow_active = True
        got: list = []

        async def keep(records: list) -> None:
            got.extend(records)

        app.batch_handlers["mail.events"] = handler._replace(handle=keep)
        try:
            faust_tuning.read_raw_records(["mail.events"])
            raw, other = fetched("mail.events", 0), fetched("stormguard.commands", 0)
        finally:
            faust_tuning.read_raw_records([])
        assert not any(isinstance(r, ConsumerRecord) for r in raw)
        assert all(isinstance(r, ConsumerRecord) for r in other)
        assert isinstance(fetched("mail.events", 0)[0], ConsumerRecord)  # once the worker no longer asks
        await consumer._deliver_fetch({TopicPartition("mail.events", 0): raw}, None, app.batch_handlers)
        assert [(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in got] == [
            ("mail.events", 0, o, 1479112200.0 + o / 1000, b"k%d" % o, b'{"timestamp": %d}' % o,
             [("trace", b"t%d" % o)]) for o in range(3)]
        assert consumer._new_offset(tp) == 3

    asyncio.run(main())


def test_a_batch_agent_needs_the_workers_consumer():
    app = StormguardApp("test-batch-stock", broker="kafka://127.0.0.1:1", fast_drain=False)
    with pytest.raises(ValueError, match="fast_drain"):
        app.batch_agent(app.topic("mail.events"), name="score")


def test_records_the_scheduler_held_back_are_released_by_an_empty_fetch():
    """A partition that ran dry while the broker still had records of it holds back newer records of
    the others (event-time order); once it has nothing more to give, the next fetch, empty or not,
    releases them."""
    from stream_jobs.worker.event_order import EventTimeScheduler

    async def main():
        app, handled = _app()
        consumer, tp, handler = await _consumer(app)
        tp1 = consumer._new_topicpartition("mail.events", 1)
        backlog = {tp1: True}
        consumer.scheduler = EventTimeScheduler(ordered_topics={"mail.events"})
        consumer.scheduler.has_backlog = lambda t: backlog.get(t, False)
        consumer.flow_active = True

        await consumer._deliver_fetch({tp: [Rec(tp, 0, 5)], tp1: [Rec(tp1, 0, 3)]}, None, app.batch_handlers)
        assert handled == [[0]]  # tp1's record at 3; tp's at 5 waits: tp1 may still have older ones
        backlog[tp1] = False
        await consumer._deliver_fetch({}, None, app.batch_handlers)
        assert handled == [[0], [0]]

    asyncio.run(main())


def test_a_chunk_acked_again_after_a_rebalance_keeps_the_commits_moving():
    """A chunk finished while a rebalance began is acked after Faust cleared the partition's bookkeeping;
    the partition, kept and read again from the start, acks the same offsets again. Faust's ack refuses
    an offset it holds; twice in its list, each commit moved one record on (seen on Apache Kafka)."""
    async def main():
        app, handled = _app()
        consumer, tp, handler = await _consumer(app)
        consumer._committed_offset[tp] = None  # no commit yet, as after Faust's revoke
        await consumer._handle(handler, _records(tp, [0, 1, 2]))
        await consumer._handle(handler, _records(tp, [0, 1, 2]))
        await consumer._handle(handler, _records(tp, [3, 4]))
        assert sorted(consumer._acked[tp]) == [0, 1, 2, 3, 4]
        assert consumer._new_offset(tp) == 5

    asyncio.run(main())


def test_a_revocation_waits_for_the_chunk_being_scored_and_acks_it():
    """A revocation commits before Faust forgets the revoked partitions' acks, so it first waits for the
    chunk in the handler and acks it, even when the chunk's own delivery was cancelled (the fetcher is,
    on a stop) and will never ack it."""
    async def main():
        app = StormguardApp("test-batch-revoke", broker="kafka://127.0.0.1:1", store="memory://",
                            web_enabled=False)
        topic = app.topic("mail.events", partitions=2)
        gate = asyncio.Event()

        @app.batch_agent(topic, name="score", max_records=3)
        async def score(records: list) -> None:
            await gate.wait()

        consumer, tp, handler = await _consumer(app)
        delivery = asyncio.ensure_future(consumer._handle(handler, _records(tp, [0, 1, 2])))
        await asyncio.sleep(0)
        delivery.cancel()
        with pytest.raises(asyncio.CancelledError):
            await delivery
        revocation = asyncio.ensure_future(consumer._finish_in_flight())
        await asyncio.sleep(0)
        assert not revocation.done() and not consumer._acked[tp]  # still being scored
        gate.set()
        await revocation
        assert list(consumer._acked[tp]) == [0, 1, 2] and consumer._n_acked == 3
        assert consumer._new_offset(tp) == 3

    asyncio.run(main())


def test_a_fetch_that_spanned_a_seek_is_not_delivered_and_the_seek_is_made_again():
    """The recovery seeks back to the committed offsets while a fetch is awaited: what that fetch returns
    may come from the old positions, so the stream's records are dropped (fetched again after a second
    seek); a changelog's go on (the recovery positions those itself). A fetch with no seek is untouched."""
    async def main():
        app, _ = _app()
        app.Table("list_models", default=None, partitions=2)
        from faust.types import TP

        consumer, _, _ = await _consumer(app)
        tp, changelog = TP("mail.events", 0), TP(app.tables["list_models"].changelog_topic.get_topic_name(), 0)
        consumer._active_partitions = {tp, changelog}
        consumer.flow_active = True
        fetched = {tp: ["a record of mail.events"], changelog: ["a list model"]}
        seeks: list[int] = []

        async def seek_committed():
            seeks.append(consumer.seek_epoch)
            consumer.seek_epoch += 2

        consumer._seek_committed = seek_committed

        async def getmany_with_a_seek(active_partitions, timeout):
            consumer.seek_epoch += 1  # the recovery's seek begins while the fetch is awaited
            return dict(fetched)

        async def getmany(active_partitions, timeout):
            return dict(fetched)

        consumer._getmany = getmany
        records, _ = await consumer._wait_next_records(0.1)
        assert records == fetched and seeks == []
        consumer._getmany = getmany_with_a_seek
        records, _ = await consumer._wait_next_records(0.1)
        assert records == {changelog: ["a list model"]} and len(seeks) == 1

    asyncio.run(main())


def test_a_fetch_whose_wait_was_cancelled_is_handed_to_the_next_call():
    """A rebalance beginning cancels the drain's wait, not the fetch in the consumer's thread, which advances
    aiokafka's positions when it returns: its records go to the next call instead of nowhere."""
    async def main():
        consumer, tp = await _flowing(_app()[0])
        fetched = {tp: ["records 0 to 48"]}
        release, calls = asyncio.Event(), []

        async def getmany(active_partitions, timeout):
            calls.append(timeout)
            await release.wait()  # the broker answers after the wait was given up
            return dict(fetched)

        consumer._getmany = getmany
        waiting = asyncio.ensure_future(consumer._wait_next_records(1.0))
        for _ in range(3):
            await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        records, _ = await consumer._wait_next_records(1.0)
        assert records == fetched and len(calls) == 1

    asyncio.run(main())


def test_a_fetch_that_ended_in_the_step_its_wait_was_given_up_in_is_handed_to_the_next_call():
    """The broker's answer and the rebalance's cancellation in one step of the event loop: the fetch is done
    (aiokafka's positions past its records) but its waiter gets the cancellation. Its records go to the next
    call, not nowhere (a survivor's whole takeover fetch was lost so, with nothing left to fetch)."""
    async def main():
        consumer, tp = await _flowing(_app()[0])
        answers = [{tp: ["records 0 to 148"]}, {}]  # after the first, aiokafka has nothing more to hand over
        release = asyncio.Event()

        async def getmany(active_partitions, timeout):
            await release.wait()
            return answers.pop(0)

        consumer._getmany = getmany
        waiting = asyncio.ensure_future(consumer._wait_next_records(1.0))
        for _ in range(3):
            await asyncio.sleep(0)
        release.set()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert consumer._fetch_in_flight is not None and consumer._fetch_in_flight.done()
        records, _ = await consumer._wait_next_records(1.0)
        assert records == {tp: ["records 0 to 148"]} and len(answers) == 1

    asyncio.run(main())


def test_a_seek_whose_caller_gave_up_is_finished_before_the_next_fetch_begins():
    """The exactly-once drain awaits a seek inside ``wait_first`` with the flow's suspension; the recovery
    stopping the flow cancelled it half made (a partition without a committed offset left past records a
    fetch had dropped). The seek goes on without its caller, the next fetch waits for it, and a second
    seek asked meanwhile runs after the first, not beside it."""
    async def main():
        consumer, tp = await _flowing(_app()[0])
        answer, steps = asyncio.Event(), []

        async def seek_to_committed():  # the consumer's thread: aiokafka's seek, then the rewind
            steps.append("seek")
            await answer.wait()
            steps.append("rewound")
            return {tp: None}

        async def getmany(active_partitions, timeout):
            steps.append("fetch")
            return {}

        consumer.seek_to_committed, consumer._getmany = seek_to_committed, getmany
        caller = asyncio.ensure_future(consumer._seek_committed())
        for _ in range(3):
            await asyncio.sleep(0)
        caller.cancel()  # the flow stopped: wait_first gives up on the drain
        with pytest.raises(asyncio.CancelledError):
            await caller
        second = asyncio.ensure_future(consumer._seek_committed())
        fetch = asyncio.ensure_future(consumer._wait_next_records(0.1))
        for _ in range(3):
            await asyncio.sleep(0)
        assert steps == ["seek"] and consumer.seek_epoch == 1
        answer.set()
        await second
        await fetch
        assert steps == ["seek", "rewound", "seek", "rewound", "fetch"] and consumer.seek_epoch == 4

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["batch", "exactly_once", "stock"])
def test_no_path_fetches_a_partition_the_event_time_merge_holds_enough_of(mode):
    """Tansu answers one fetch of a backlog partition with up to 22,000 records; a partition whose merge queue is
    full is left out of the next fetch on every path (batch, exactly-once, stock Faust), so the merge is not pushed
    past ``max_held`` into releasing records out of order. With every partition full the merge moves first."""
    from collections import namedtuple
    from types import SimpleNamespace

    from faust.types import TP

    from stream_jobs.worker.event_order import EventTimeScheduler

    tp0, tp1 = TP("mail.events", 0), TP("mail.events", 1)

    class Merge(EventTimeScheduler):
        ordered_topics = frozenset({"mail.events"})
        max_held_per_partition = 2
        has_backlog = staticmethod(lambda tp: True)  # partition 1 has given nothing yet: 0 waits for it
        assigned = staticmethod(lambda: [tp0, tp1])

    async def main():
        app = StormguardApp(f"test-cap-{mode}", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False,
                            ConsumerScheduler=Merge, fast_drain=mode != "stock",
                            processing_guarantee="exactly_once" if mode == "exactly_once" else "at_least_once")
        consumer = app.consumer
        assert type(consumer).__name__ == {"batch": "BatchConsumer", "exactly_once": "BatchDrainConsumer",
                                           "stock": "TrueEndConsumer"}[mode]
        asked: list = []

        async def getmany(active_partitions, timeout):  # what Faust's consumer thread is asked for
            asked.append(set(active_partitions))
            return {}

        consumer._thread = SimpleNamespace(getmany=getmany)
        await consumer._getmany({tp0, tp1}, 0.1)
        Rec = namedtuple("Rec", "offset value")
        held = list(consumer.scheduler.iterate({tp0: [Rec(i, b'{"timestamp": %d}' % i) for i in range(3)]}))
        assert held == []  # waiting for partition 1
        await consumer._getmany({tp0, tp1}, 0.1)
        assert await consumer._getmany({tp0}, 0.1) == {}  # every partition asked for is full: nothing fetched
        assert asked == [{tp0, tp1}, {tp1}]

    asyncio.run(main())
