"""Python's cyclic garbage collector, paced for what the worker is doing.

The collector runs a young-generation pass every 700 net allocations of container objects (Python's
default). A worker catching up a backlog allocates a few such objects per record (the decoded event,
its recipient list, the record, the outcome) and keeps the model of every sender it meets: at 20,000
records a second that is ~150 passes a second, and each promotes the state just learned into the
older generations, which the full passes then scan again. Measured on the bench's 100,000
sender-keyed events (``docs/performance.md``): 1.7 s of the worker's 6.2 CPU-seconds went to the
collector, 0.4 s with a threshold of 50,000. Since then the event-time merge holds up to 200,000
fetched records, young objects that each 50,000-pass walked again: 0.84 s of collections in a
catch-up of 330,000 records at 50,000, 0.40 s at 2,000,000 (the default), where young passes took
0.06 s in all, start-up's included (the worker's ``gc.freeze`` every ``STORMGUARD_GC_FREEZE_S`` also
resets the young count, so only what gathers between two freezes counts).

A bigger threshold makes each young pass longer (~25 ms per 50,000 objects here, so up to a second
at the default, if one comes), which live traffic must not wait for: produce -> freeze is tens of
milliseconds. So the threshold is raised only while the worker catches up (its batch's newest record
more than a second old: nobody is waiting on those records) and put back as soon as it is live
again. At that moment up to a threshold's worth of young objects is waiting: rather than the first
live record paying for a pass over them, they are frozen (``gc.freeze``, which moves them to the
permanent generation without scanning them), as the worker's freeze timer does every
``STORMGUARD_GC_FREEZE_S`` anyway.

>>> import gc
>>> before = gc.get_threshold()
>>> pace = CollectorPace(50_000)
>>> pace.follow(catching_up=True); gc.get_threshold()[0]
50000
>>> pace.follow(catching_up=False); gc.get_threshold() == before
True
>>> gc.unfreeze()
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


class CollectorPace:
    """Raise the young-generation threshold while catching up a backlog, restore it once live.

    Parameters
    ----------
    catch_up_threshold
        Net container allocations between two young-generation passes while catching up
        (``STORMGUARD_GC_CATCH_UP_THRESHOLD``); 0 leaves Python's thresholds alone.
    """

    def __init__(self, catch_up_threshold: int) -> None:
        self.catch_up_threshold = catch_up_threshold
        #: the thresholds to go back to (Python's, or whatever the process had set)
        self.live_thresholds = gc.get_threshold()
        self.relaxed = False

    def follow(self, catching_up: bool) -> None:
        """Set the collector for the batch just scored: ``catching_up`` or live."""
        if not self.catch_up_threshold or catching_up == self.relaxed:
            return
        if catching_up:
            self.live_thresholds = gc.get_threshold()
            gc.set_threshold(self.catch_up_threshold, *self.live_thresholds[1:])
            log.info("catching up a backlog: a young collection every %d allocations", self.catch_up_threshold)
        else:
            gc.freeze()  # what the backlog left young: no pass over it on the first live record
            gc.set_threshold(*self.live_thresholds)
            log.info("live: the collector's thresholds are back to %s", self.live_thresholds)
        self.relaxed = catching_up
