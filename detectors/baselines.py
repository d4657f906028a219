"""River-backed baselines: what is normal for one sender, and for one list.

Each class learns online from event time only, one observation at a time
(``learn_one``) and says how unusual a new observation is (``score_one``),
in the manner of River's own estimators. The state per key is kept small on
purpose (``__slots__``, two or three River statistics): an organisation of
1.2 million senders must fit in memory on one worker.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque

from river import stats


class SenderFanout(stats.Var):
    """How unusual a message's reach is for the person who sent it.

    The baseline is the mean and variance of ``log1p(deliveries)`` over the
    sender's past messages (River's Welford ``stats.Var``), shrunk towards a
    population prior while the sender has few messages, so a sender seen once
    is neither trusted blindly nor flagged for everything. The score is a
    z-score in log space: 4 means "orders of magnitude past this sender's
    habit", 0 means "what they always do".

    The prior is shared by all senders (class attributes, not per-instance
    state): ``PRIOR_MEAN`` is ``log1p(2)`` because most mail goes to one to
    three people, ``PRIOR_VAR`` is 1 (a factor of e either way) and
    ``PRIOR_WEIGHT`` says how many messages the prior is worth.

    Examples
    --------
    >>> habit = SenderFanout()
    >>> for n in [1, 2, 1, 3, 1, 2, 1, 1, 4, 2]:
    ...     habit.learn_one(n)
    >>> round(habit.score_one(2), 1), round(habit.score_one(840_000), 1)
    (0.2, 22.4)
    >>> owner = SenderFanout()
    >>> for n in [1, 2, 50_000, 1, 50_000, 3, 50_000]:
    ...     owner.learn_one(n)
    >>> round(owner.score_one(50_000), 1)
    1.5
    """

    PRIOR_MEAN = math.log1p(2)
    PRIOR_VAR = 1.0
    PRIOR_WEIGHT = 3.0

    # The habit is River's Welford variance itself (this class is a ``stats.Var``), not an object holding
    # one: one object fewer per sender (issue 19: at most 450 B of state per tracked sender).
    __slots__ = ("max_deliveries", "list_posts")

    def __init__(self) -> None:
        super().__init__()
        self.max_deliveries = 0
        #: Root posts and replies this sender has made to any list.
        self.list_posts = 0

    @property
    def var(self) -> stats.Var:
        """The Welford variance of ``log1p(deliveries)``: this object (it was a separate one)."""
        return self

    def learn_one(self, deliveries: int) -> None:
        # River's ``Var.update`` and ``Mean.update`` (weight 1) written out, operation for operation: every
        # message learns here, and the two calls were a tenth of detection's time (issue 19). The sums are
        # bit for bit River's (test_baselines checks them against ``stats.Var.update``).
        x = math.log1p(deliveries)
        mean = self.mean
        old = mean._mean
        n = mean.n = mean.n + 1.0
        new = mean._mean = old + (1.0 / n) * (x - old)
        self._S += 1.0 * (x - old) * (x - new)
        if deliveries > self.max_deliveries:
            self.max_deliveries = deliveries

    def score_one(self, deliveries: int) -> float:
        prior_mean, prior_var, k = self.PRIOR_MEAN, self.PRIOR_VAR, self.PRIOR_WEIGHT
        n = self.mean.n
        mean = self.mean._mean if n else 0.0
        var = self._S / (n - self.ddof) if n > self.ddof else 0.0  # River's Var.get
        mean_eff = (n * mean + k * prior_mean) / (n + k)
        var_eff = (n * var + k * prior_var) / (n + k)
        return (math.log1p(deliveries) - mean_eff) / math.sqrt(var_eff)


class ReplyVelocity:
    """Reply-alls reaching one list: how many in the recent window, against the list's norm.

    Counts are kept as event times in a bounded, sorted buffer, so events that
    arrive a little out of order still land in the right window. The norm is
    learned per event-time hour with River: exponentially weighted mean and
    variance of hourly counts (``stats.EWMean``, ``stats.EWVar``) and the busiest hour ever seen
    (``stats.Max``). Hours in which the list was storming or frozen are not
    learned, so a storm never teaches the model that storms are normal.

    Parameters
    ----------
    window
        Seconds of event time over which recent reply-alls are counted.
    max_recent
        Reply-alls remembered per list; beyond this many in one window the list
        is storming whatever the norm says.

    Examples
    --------
    A discussion list with a dozen replies every working hour:

    >>> chat = ReplyVelocity(window=3600)
    >>> for hour in range(40):
    ...     for i in range(12):
    ...         chat.learn_one(hour * 3600 + i * 300)
    >>> chat.expected_upper() >= 12
    True

    A bulletin list that never gets replies, then three in ten minutes:

    >>> bulletin = ReplyVelocity(window=3600)
    >>> bulletin.observe_hours_until(40 * 3600)
    >>> for t in (40 * 3600 + 60, 40 * 3600 + 300, 40 * 3600 + 600):
    ...     bulletin.learn_one(t)
    >>> bulletin.count(40 * 3600 + 600), bulletin.expected_upper()
    (3, 0.0)
    """

    __slots__ = ("window", "recent", "hour", "hour_count", "hourly_mean", "hourly_var", "peak", "hours_learned", "hold_hour")

    def __init__(self, window: float = 3600.0, max_recent: int = 512, fading_factor: float = 0.05):
        self.window = window
        self.recent: deque[float] = deque(maxlen=max_recent)
        self.hour: int | None = None
        self.hour_count = 0
        self.hourly_mean = stats.EWMean(fading_factor=fading_factor)
        self.hourly_var = stats.EWVar(fading_factor=fading_factor)
        self.peak = stats.Max()
        self.hours_learned = 0
        #: The hour the list was last storming in; not learned as normal.
        self.hold_hour: int | None = None

    def __getstate__(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple) -> None:
        for name, value in zip(self.__slots__, state):
            setattr(self, name, value)

    # -- learning -----------------------------------------------------------------
    def observe_hours_until(self, t: float, max_gap_hours: int = 24 * 14) -> None:
        """Close the hours before ``t``: learn their counts, quiet hours as zeros."""
        hour = int(t // 3600)
        if self.hour is None:
            self.hour = hour
            return
        if hour <= self.hour:
            return
        self._learn_hour(self.hour, self.hour_count)
        for _ in range(min(hour - self.hour - 1, max_gap_hours)):
            self._learn_hour(None, 0)
        self.hour, self.hour_count = hour, 0

    def _learn_hour(self, hour: int | None, count: int) -> None:
        if hour is not None and hour == self.hold_hour:
            return
        self.hourly_mean.update(float(count))
        self.hourly_var.update(float(count))
        self.peak.update(float(count))
        self.hours_learned += 1

    def learn_one(self, t: float) -> None:
        """Record one reply-all at event time ``t``."""
        self.observe_hours_until(t)
        if self.hour is not None and int(t // 3600) == self.hour:
            self.hour_count += 1
        if not self.recent or t >= self.recent[-1]:
            self.recent.append(t)
        else:
            buf = list(self.recent)
            insort(buf, t)
            self.recent = deque(buf[-self.recent.maxlen :], maxlen=self.recent.maxlen)

    def hold(self, t: float) -> None:
        """Mark the current hour as storming: it will not be learned as normal."""
        self.hold_hour = int(t // 3600)

    # -- scoring ------------------------------------------------------------------
    def count(self, t: float) -> int:
        """Reply-alls in the window ending at ``t`` (inclusive)."""
        lo = bisect_left(self.recent, t - self.window)
        hi = len(self.recent)
        while hi > lo and self.recent[hi - 1] > t:
            hi -= 1
        return hi - lo

    def expected_upper(self, sigmas: float = 3.0) -> float:
        """The most reply-alls per window this list's history makes unremarkable."""
        if not self.hours_learned:
            return 0.0
        per_hour = max(self.hourly_mean.get() + sigmas * math.sqrt(max(self.hourly_var.get(), 0.0)), self.peak.get())
        return per_hour * max(1.0, self.window / 3600.0)

    def score_one(self, t: float) -> float:
        """How many times the list's norm the current window holds (counts ``t`` itself)."""
        return self.count(t) / max(self.expected_upper(), 1.0)
