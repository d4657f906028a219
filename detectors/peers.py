"""The rules Stormguard is measured against: pure, deterministic, event time only.

Each rule sees every submitted message once, in order, through
:meth:`check`, which answers whether the gateway would *hold* that message
(because an earlier decision blocked its thread or list) and then learns from
it. A message that trips a rule is itself still delivered: the block applies
to the messages after it, as in the live path.

:class:`ExchangeReplyAllRule` is Exchange Online's reply-all storm protection
as Microsoft documents it today (``Set-TransportConfig``; the 2021 "customizable settings"):
``ReplyAllStormDetectionMinimumRecipients`` 2,500 (settable 1,000 to 5,000; 5,000 was the 2020
default), ``ReplyAllStormDetectionMinimumReplies`` 10 (settable 5 to 20), a 60-minute detection
window and ``ReplyAllStormBlockDurationHours`` 6 (settable 1 to 12): per thread, not per list.
:meth:`ExchangeReplyAllRule.tightest` is its most sensitive setting (5 replies, 1,000 recipients).

>>> from detectors.events import MailEvent
>>> rule = ExchangeReplyAllRule()
>>> def reply(i, members=840_000):
...     return MailEvent(message_id=f"r{i}", timestamp=1_479_112_200.0 + 30 * i, sender=f"p{i}@nhs.net",
...                      recipients=["all@nhs.net"], lists={"all@nhs.net": members}, in_reply_to="m0",
...                      subject="RE: Test")
>>> [rule.check(reply(i)).held for i in range(12)]
[False, False, False, False, False, False, False, False, False, False, True, True]
>>> rule.fired[0][1]
's:test'
>>> small = ExchangeReplyAllRule()
>>> any(small.check(reply(i, members=816)).held for i in range(300))  # under its recipient floor
False
>>> tight = ExchangeReplyAllRule.tightest()
>>> [tight.check(reply(i, members=1_891)).held for i in range(7)], tight.name
([False, False, False, False, False, True, True], 'exchange-tight')
>>> ExchangeReplyAllRule(min_replies=30)
Traceback (most recent call last):
...
ValueError: ReplyAllStormDetectionMinimumReplies is settable from 5 to 20, not 30

:class:`StaticThresholdRule` is the classic list-server rate limit: a list is
frozen once it takes more than ``max_posts`` reply-alls in ``window`` seconds,
whatever its size or habits.

>>> static = StaticThresholdRule(max_posts=3)
>>> [static.check(reply(i)).held for i in range(6)]
[False, False, False, False, True, True]
"""

from __future__ import annotations

from bisect import insort
from collections import defaultdict, deque
from typing import NamedTuple, Optional

from detectors.events import MailEvent


class Verdict(NamedTuple):
    """What a rule says about one message."""

    #: The gateway holds this message (its thread or list is blocked).
    held: bool
    #: This message tripped the rule (a new block starts after it).
    fired: bool
    #: The thread or list key that was blocked, when ``fired``.
    key: Optional[str] = None


class _Window:
    __slots__ = ("times",)

    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def add(self, t: float, window: float) -> int:
        if not self.times or t >= self.times[-1]:
            self.times.append(t)
        else:  # a little out of order
            buf = list(self.times)
            insort(buf, t)
            self.times = deque(buf)
        while self.times and self.times[0] <= self.times[-1] - window:
            self.times.popleft()
        return len(self.times)


class ExchangeReplyAllRule:
    """Block a thread for ``block_hours`` once ``min_replies`` reply-alls to ``min_recipients``+ arrive in ``window``."""

    #: Exchange Online's documented defaults and the ranges it lets an administrator set.
    DEFAULT_MIN_RECIPIENTS, MIN_RECIPIENTS_RANGE = 2500, (1000, 5000)
    DEFAULT_MIN_REPLIES, MIN_REPLIES_RANGE = 10, (5, 20)
    DEFAULT_BLOCK_HOURS, BLOCK_HOURS_RANGE = 6.0, (1.0, 12.0)

    def __init__(self, min_recipients: int = DEFAULT_MIN_RECIPIENTS, min_replies: int = DEFAULT_MIN_REPLIES,
                 window: float = 3600.0, block_hours: float = DEFAULT_BLOCK_HOURS, name: str = "exchange"):
        for setting, value, (lo, hi) in (("ReplyAllStormDetectionMinimumRecipients", min_recipients,
                                          self.MIN_RECIPIENTS_RANGE),
                                         ("ReplyAllStormDetectionMinimumReplies", min_replies, self.MIN_REPLIES_RANGE),
                                         ("ReplyAllStormBlockDurationHours", block_hours, self.BLOCK_HOURS_RANGE)):
            if not lo <= value <= hi:
                raise ValueError(f"{setting} is settable from {lo:g} to {hi:g}, not {value:g}")
        self.name = name
        self.min_recipients, self.min_replies = min_recipients, min_replies
        self.window, self.block = window, block_hours * 3600.0
        self.blocked_until: dict[str, float] = {}
        self.windows: defaultdict[str, _Window] = defaultdict(_Window)
        #: (event time, thread) of every block.
        self.fired: list[tuple[float, str]] = []

    @classmethod
    def tightest(cls) -> "ExchangeReplyAllRule":
        """The most sensitive setting Exchange allows: 5 reply-alls to 1,000+ recipients."""
        return cls(min_recipients=cls.MIN_RECIPIENTS_RANGE[0], min_replies=cls.MIN_REPLIES_RANGE[0],
                   name="exchange-tight")

    def check(self, event: MailEvent) -> Verdict:
        t = event.event_time
        if not event.is_reply or event.deliveries < self.min_recipients:
            return Verdict(False, False)
        key = event.thread
        if self.blocked_until.get(key, float("-inf")) > t:
            return Verdict(True, False)
        if self.windows[key].add(t, self.window) >= self.min_replies:
            self.blocked_until[key] = t + self.block
            self.windows.pop(key, None)
            self.fired.append((t, key))
            return Verdict(False, True, key)
        return Verdict(False, False)


class StaticThresholdRule:
    """Freeze a list of ``min_members``+ once it takes more than ``max_posts`` reply-alls in ``window`` s."""

    name = "static"

    def __init__(self, max_posts: int = 20, window: float = 3600.0, min_members: int = 100,
                 block_hours: float = 6.0):
        self.max_posts, self.window, self.min_members = max_posts, window, min_members
        self.block = block_hours * 3600.0
        self.frozen_until: dict[str, float] = {}
        self.windows: defaultdict[str, _Window] = defaultdict(_Window)
        self.fired: list[tuple[float, str]] = []

    def check(self, event: MailEvent) -> Verdict:
        t = event.event_time
        held = any(self.frozen_until.get(a, float("-inf")) > t for a in event.lists)
        if held or not event.is_reply:
            return Verdict(held, False)
        fired_key = None
        for address, members in sorted(event.lists.items()):
            if members < self.min_members:
                continue
            if self.windows[address].add(t, self.window) > self.max_posts:
                self.frozen_until[address] = t + self.block
                self.windows.pop(address, None)
                self.fired.append((t, address))
                fired_key = fired_key or address
        return Verdict(False, fired_key is not None, fired_key)
