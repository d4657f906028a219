"""The worker's scorer (stream_jobs/worker/app.py) handed records directly: a real Faust app, not started.

What reaches the broker is the live tests' (test_worker_live, test_failover_live); these check what the
scorer keeps between records, which no broker shows until a rebalance.
"""

from __future__ import annotations

import asyncio

from faust.types import TP

from detectors.events import MailEvent, encode_event
from stream_jobs.settings import WorkerSettings
from stream_jobs.worker.app import StormguardWorker
from stream_jobs.worker.faust_tuning import RecordEvent
from tests.scenarios import T0


def test_a_list_share_marks_only_its_own_list_for_saving():
    """A message to two lists reaches each list's owner as a share on the by-list topic. The share of
    one list changes that list only; its record's partition is that list's changelog partition, so
    saving the other list with it would put that model where the other list's owner never reads it."""
    async def main():
        worker = StormguardWorker(WorkerSettings.from_env({"STORMGUARD_PARTITIONS": "8"}))
        names = (f"team{i}@nhs.net" for i in range(100))
        first = next(names)
        second = next(a for a in names if worker._partition_of(a) != worker._partition_of(first))
        home = worker._partition_of(first)
        raw = encode_event(MailEvent(message_id="m1", timestamp=T0, sender="a@nhs.net",
                                     recipients=[first, second], lists={first: 40, second: 60}))
        share = RecordEvent(worker.by_list_name, home, 0, T0, first.encode(), raw, (),
                            TP(worker.by_list_name, home))
        await worker.score_batch([share])  # an old record: catching up, so nothing is written yet
        assert worker.records_consumed == 1 and first in worker.detector.lists
        assert set(worker.unsaved) == {first}
        assert worker.unsaved[first][0] is share

    asyncio.run(main())
