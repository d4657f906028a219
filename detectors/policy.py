"""What Stormguard decides, and the knobs that govern it.

Every threshold lives in :class:`PolicyConfig`, with its default and the
reason for it; the shell fills it from ``STORMGUARD_*`` environment variables
(the README lists them all). :class:`Action` is the wire form of a decision on
``stormguard.actions``.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Optional

import msgspec

#: ``alert``, ``freeze`` and ``unfreeze`` are the detectors' and operators' decisions; ``release`` and
#: ``discard`` are what became of held mail (``stormguard milter``'s releases, by thread or by list).
ActionKind = Literal["alert", "freeze", "unfreeze", "release", "discard"]


class ThreadHold(msgspec.Struct, frozen=True, kw_only=True):
    """A thread whose reply-alls gateways hold before delivery (``stormguard milter``).

    Carried by the alert on an anomalous first post (its replies are held until ``until``: the
    first of them would freeze the list, so none needs to be delivered) and by a freeze (the
    storm's thread, held while the list is frozen and kept apart when it is released).
    """

    #: Message-id of the thread's first post.
    root: str
    #: Message-ids of the thread known so far, the first post's first: a message to the list that
    #: names any of them in In-Reply-To or References replies into the thread.
    ids: list[str]
    #: Epoch seconds (event time) when the hold ends; None: while the list stays frozen.
    until: Optional[float] = None


class PolicyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Thresholds of the storm policy. Defaults are the product's recommendation."""

    #: Events the whole stream must have shown before any freeze: until then
    #: nothing is known of anyone's habits, so only alerts go out.
    warmup_events: int = 100
    #: Lists with fewer members are never frozen: a reply-all storm on a
    #: 40-person team list is a conversation, not an outage.
    min_list_members: int = 100
    #: A root post is only "anomalous" if it reaches at least this many
    #: mailboxes; below it, no single post is worth an alarm.
    anomalous_min_deliveries: int = 500
    #: Fan-out z-score (log space, against the sender's own habit) above which
    #: a post is out of character for its sender.
    fanout_z: float = 4.0
    #: Reply-alls within ``velocity_window`` needed before the velocity rule
    #: can freeze a list whose first post was ordinary (Exchange waits for 10).
    min_replies: int = 3
    #: The same, for *open* lists (discussion lists: their threads run to
    #: several replies, or lively reply traffic is their norm) and lists whose
    #: habits are not known yet. Reply-all is normal on them, so it takes a flood.
    open_min_replies: int = 20
    #: On open lists the reply-alls must also exceed their learned norm this
    #: many times over (a busy afternoon on a discussion list is not a storm).
    open_factor: float = 2.0
    #: Reply-alls per earlier thread (on average) from which a list is open: a
    #: discussion list's threads run to several replies; a bulletin's draw
    #: none, or one or two stray ones.
    open_replies_per_thread: float = 1.5
    #: Deliveries the reply-alls in the window must have caused before an open
    #: (or not yet known) list is frozen: on lists where reply-all is normal,
    #: only a flood matters (20 reply-alls to 1,000 members, 80 to 250).
    open_harm_deliveries: int = 20_000
    #: A list seen for the first time is only "anomalous" (frozen on its first
    #: reply-all) when its first post reaches at least this many members, and
    #: more than any list seen before; other new lists are frozen by the
    #: cold-start evidence (``cold_reply_seconds``, ``cold_harm_deliveries``).
    new_list_min_members: int = 20_000
    #: Seconds of event time a list must have been seen before its own norm is
    #: trusted: until then it may be a discussion list whose habits are not
    #: learned yet, so the velocity rule needs ``open_min_replies``.
    list_warmup: float = 24 * 3600.0
    #: On a list younger than ``list_warmup`` (at a first deployment, every
    #: list), the first reply-all to an anomalous post freezes only within
    #: this many seconds of the post: a storm's first reply-alls come within
    #: seconds (at most 41 s in 20 seeds of NHSmail and the never-seen list),
    #: a stray reply to a big bulletin comes hours later.
    anomalous_reply_window: float = 300.0
    #: On a list younger than ``list_warmup``, different people reply-alling
    #: to the post itself freeze it only in a burst: the ``min_replies``-th
    #: within this many seconds of the post, each further one within this much
    #: more (three in 75 s, four in 150 s, five in 225 s). A discussion's
    #: answers are written, and people soon answer each other: of every
    #: thread on 8 lively lists over 3 days in 20 seeds, the fastest had its
    #: third different replier to the post at 122 s, its fourth at 262 s and
    #: its fifth at 299 s (docs/simulate-evaluate.md, "Cold start").
    cold_reply_seconds: float = 75.0
    #: Or, on a list younger than ``list_warmup``, when the reply-alls of
    #: different people to one post (within ``thread_window``, no one twice)
    #: have caused this many deliveries: a slow burn on a big list. A lively
    #: discussion's thread, before people answer each other, did at most
    #: 21,000 (seven people on a 3,000-member list).
    cold_harm_deliveries: int = 40_000
    #: Seconds a thread on a closed list stays one storm: ``min_replies``
    #: reply-alls to one bulletin within this time freeze it however slowly
    #: they came (a slow burn), as long as they did ``harm_deliveries`` harm.
    thread_window: float = 24 * 3600.0
    #: Event-time window, in seconds, over which reply-alls to a list are counted.
    velocity_window: float = 3600.0
    #: How many standard deviations above its hourly norm a list may go.
    norm_sigmas: float = 3.0
    #: Deliveries the reply-alls in the window must have caused before the
    #: velocity rule freezes (harm, not just unusualness).
    harm_deliveries: int = 1_600
    #: Lists whose learned norm is at least this many reply-alls per window
    #: are discussion lists: the first-reply rule does not apply to them.
    discussion_norm: float = 3.0
    #: Seconds a freeze lasts after the list's last storm post (6 h, as
    #: commonly set for Exchange's ReplyAllStormBlockDurationHours).
    cooldown: float = 6 * 3600.0
    #: Seconds an event may arrive behind the newest event of its list.
    max_lateness: float = 300.0
    #: Seconds an event may be ahead of the newest event seen at all.
    max_future_skew: float = 7 * 86400.0
    #: Lists that are never frozen (they still raise alerts).
    allow_lists: frozenset[str] = frozenset()
    #: Senders whose posts never count towards a storm (list owners, robots).
    allow_senders: frozenset[str] = frozenset()
    #: Freezes per event-time hour across all lists; beyond this, further
    #: freezes become alerts (a forged storm must not freeze everything).
    max_freezes_per_hour: int = 20
    #: Most senders remembered; the least recently seen are forgotten first.
    max_senders: int = 2_000_000
    #: Most lists remembered; frozen lists are never forgotten.
    max_lists: int = 200_000
    #: Epoch seconds: events up to this time are history, learned from but never acted on (no
    #: freeze, no alert), so a first deployment starts with the habits the topic already shows
    #: instead of freezing storms that ended days ago. 0: none. The worker sets it by itself at
    #: its consumer group's first start (the newest event then in mail.events).
    learn_only_until: float = 0.0

    def __post_init__(self) -> None:
        for name in ("warmup_events", "min_list_members", "anomalous_min_deliveries", "min_replies",
                     "open_min_replies", "new_list_min_members", "harm_deliveries", "open_harm_deliveries",
                     "cold_harm_deliveries", "max_freezes_per_hour", "max_senders", "max_lists"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("velocity_window", "thread_window", "list_warmup", "cooldown",
                     "max_lateness", "max_future_skew", "anomalous_reply_window", "cold_reply_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds")
        if self.open_factor < 1.0:
            raise ValueError("open_factor must be >= 1")
        if not self.open_replies_per_thread > 0:
            raise ValueError("open_replies_per_thread must be > 0")
        if self.min_replies < 1:
            raise ValueError("min_replies must be >= 1")


class Action(msgspec.Struct, kw_only=True):
    """One decision, as published on ``stormguard.actions``."""

    kind: ActionKind
    list: Optional[str]
    sender: Optional[str]
    event_time: float
    detector: str
    score: float
    message_id: Optional[str]
    reason: str
    #: Who decided: "stormguard" for the detectors, the operator for admin actions.
    actor: str = "stormguard"
    #: Stable identity of this decision, for idempotent consumers.
    action_id: str = ""
    #: False in shadow mode (``STORMGUARD_ENFORCE=false``): the decision is published, and nothing
    #: holds anything because of it. Not part of ``action_id``: a shadow decision and an enforced
    #: one are the same decision.
    enforced: bool = True
    #: The thread gateways hold (:class:`ThreadHold`), on an anomalous post's alert and on a freeze;
    #: for releases and discards, the thread they concern. Not part of ``action_id``.
    thread: Optional[ThreadHold] = None

    def __post_init__(self) -> None:
        if not self.action_id:
            key = f"{self.kind}|{self.list}|{self.sender}|{self.message_id}|{self.event_time!r}"
            self.action_id = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


_action_encoder = msgspec.json.Encoder()
_action_decoder = msgspec.json.Decoder(Action)


def encode_action(action: Action) -> bytes:
    return _action_encoder.encode(action)


def decode_action(raw: bytes) -> Action:
    return _action_decoder.decode(raw)


def shadow(action: Action) -> Action:
    """The same decision, published in shadow mode: nothing is held because of it.

    >>> a = Action(kind="freeze", list="l@x", sender=None, event_time=1.0, detector="d", score=1.0,
    ...            message_id="m", reason="r")
    >>> s = shadow(a)
    >>> s.enforced, s.action_id == a.action_id
    (False, True)
    """
    return msgspec.structs.replace(action, enforced=False)
