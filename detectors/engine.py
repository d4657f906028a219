"""The storm detector: one event in, zero or more actions out.

:class:`StormDetector` is the single decision path. ``stormguard score`` (offline)
and the live Faust worker both feed it events in order and publish whatever it
returns, so they take the same decisions on the same input. It reads no clock:
time is the events' own (``timestamp``), and cool-downs expire when the
stream's event time passes them.

How a storm is recognised
-------------------------
*Fan-out*: every message is scored against its sender's habit
(:class:`~detectors.baselines.SenderFanout`). A first post to a list is
*anomalous* when nothing about it is usual: a very big list
(``new_list_min_members``) never seen before and bigger than any list we know
(unprecedented reach, as when NHSmail's list held every account), once the
warm-up is over; or a *closed* list (a bulletin: its threads rarely draw
replies) posted to by someone who is not one of its posters and whose reach
is out of character (never posts to lists, never seen, or far past their
habit). An anomalous post raises an alert and marks its thread.

*Reply velocity*: every reply-all to a list is counted in an event-time window
and compared with the list's own learned norm
(:class:`~detectors.baselines.ReplyVelocity`), and weighed by harm: the
deliveries those replies caused (``harm_deliveries``).

A list is frozen:

* on the first reply-all to an anomalous post (one reply-all delivered);
* on a closed list whose norm is known (seen for ``list_warmup``), when
  ``min_replies`` reply-alls (three) from different people to one post are
  above its norm and harmful, in the velocity window, or within
  ``thread_window`` (a slow burn);
* on a list too young to have a norm (at a first deployment, every list), when
  different people reply-all to one post (fan-in; a conversation, where
  someone answers twice or the first poster answers, is not a storm) *with
  evidence a lively discussion does not give*: a burst of reply-alls to the
  post itself (the ``min_replies``-th within ``cold_reply_seconds`` of it,
  each further one within that much more), or ``cold_harm_deliveries`` of
  harm (a slow burn on a big list); on such a list, the first reply-all to an
  anomalous post freezes only within ``anomalous_reply_window`` of the post;
* on an open (discussion) list, or one whose habits are not known yet, only
  at ``open_min_replies`` reply-alls, to one post, ``open_factor`` times its
  learned norm, and ``open_harm_deliveries``: a flood, not a lively afternoon.

Lists too small to hurt, discussion lists whose norm is lively, and big lists
with one or two stray replies are left alone.

>>> from detectors.events import MailEvent
>>> det = StormDetector(PolicyConfig(warmup_events=0))
>>> def post(i, sender, reply_to=None):
...     return MailEvent(message_id=f"m{i}", timestamp=1_479_112_200.0 + 60 * i, sender=sender,
...                      recipients=["all@nhs.net"], lists={"all@nhs.net": 840_000},
...                      in_reply_to=reply_to, subject="test" if reply_to is None else "RE: test")
>>> [a.kind for a in det.process(post(0, "consultant@nhs.net"))]
['alert']
>>> [(a.kind, a.list, a.detector) for a in det.process(post(1, "nurse@nhs.net", reply_to="m0"))]
[('freeze', 'all@nhs.net', 'reply_to_anomalous_post')]
>>> det.list_status("all@nhs.net").frozen
True
>>> det.process(post(2, "gp@nhs.net", reply_to="m0"))  # already frozen: no second freeze
[]
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Collection, Iterator, Optional

import msgspec

from detectors.baselines import ReplyVelocity, SenderFanout
from detectors.events import InvalidEvent, MailEvent, parse_event
from detectors.policy import Action, PolicyConfig, ThreadHold

#: Threads remembered per list (the newest win).
MAX_THREADS_PER_LIST = 64
#: In the reason of an ``alert`` that stands for a freeze the hourly cap refused (metrics and sinks look for it).
FREEZE_CAP_MARK = "(max_freezes_per_hour)"
#: Message-ids remembered per list, to follow In-Reply-To chains to their root.
MAX_MESSAGES_PER_LIST = 256
#: Message-ids a thread hold names at most (the first post's first, then the newest replies known).
MAX_HELD_IDS = 64
#: Distinct posters remembered per list.
MAX_POSTERS_PER_LIST = 32
#: Threads without replies assumed before any are seen, when judging whether a list is open.
OPEN_PRIOR = 2
#: Records more than ``max_future_skew`` ahead of the stream are rejected,
#: unless this many agree (within ``max_future_skew`` of each other): then the
#: stream itself has jumped, and the first of them was the only one lost.
FUTURE_CONFIRMATIONS = 2


class LateEvent(InvalidEvent):
    """An event further behind its list's newest event than ``max_lateness`` allows."""


class ListStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What an operator (or a gateway) needs to know about one list right now."""

    list: str
    frozen: bool
    since: Optional[float] = None
    reason: Optional[str] = None
    until: Optional[float] = None
    actor: Optional[str] = None


class _Thread:
    """One thread on one list: was its first post anomalous, and who answered it."""

    __slots__ = ("anomalous", "root_time", "replies", "counted", "poster", "repliers", "conversation", "root_id",
                 "direct")

    def __init__(self, anomalous: bool, root_time: float, poster: str = "", root_id: str = ""):
        self.anomalous = anomalous
        self.root_time = root_time
        self.replies = 0
        #: Replies that reached the list while it was not frozen (what the list's habits are learned from).
        self.counted = 0
        self.poster = poster
        #: The first few distinct people who replied.
        self.repliers: set[str] = set()
        #: Someone answered twice, or the first poster answered: people are talking.
        #: A storm is fan-in instead: many different people, each answering once.
        self.conversation = False
        #: Message-id of the first post (what a reply-all "to the post itself" answers).
        self.root_id = root_id
        #: Different people who answered the first post itself (not one of its replies): a storm's reflex
        #: reply-alls all answer the post; in a discussion people soon answer each other.
        self.direct = 0

    # Pickled for the worker's changelog once per batch per changed list: a
    # plain tuple pickles several times faster than the generic slots protocol.
    def __reduce__(self):
        return (_restore_thread, (self.anomalous, self.root_time, self.replies, self.counted, self.poster,
                                  self.repliers, self.conversation, self.root_id, self.direct))

    def add_reply(self, sender: str, parent: Optional[str] = None) -> None:
        """Count a reply-all from ``sender`` answering ``parent`` (a message-id; None: not known)."""
        self.replies += 1
        if sender == self.poster or sender in self.repliers:
            self.conversation = True
            return
        if len(self.repliers) < 16:
            self.repliers.add(sender)
        if parent is None or parent == self.root_id:
            self.direct += 1


def _restore_thread(anomalous, root_time, replies, counted, poster, repliers, conversation, root_id="",
                    direct=None) -> _Thread:
    thread = _Thread(anomalous, root_time, poster, root_id)
    thread.replies, thread.counted, thread.repliers, thread.conversation = replies, counted, repliers, conversation
    thread.direct = len(repliers) if direct is None else direct  # models saved before the count existed
    return thread


_ORDERED_FIELDS = frozenset({"posters", "threads", "message_threads"})


class ListState:
    """Everything Stormguard remembers about one list."""

    __slots__ = ("address", "members", "posts", "last_seen", "posters", "velocity", "threads",
                 "message_threads", "frozen_since", "frozen_until", "frozen_reason", "frozen_actor",
                 "alerted_until", "roots", "thread_replies", "first_seen")

    def __init__(self, address: str, window: float):
        self.address = address
        self.members = 0
        self.posts = 0
        self.last_seen = -math.inf
        self.posters: OrderedDict[str, int] = OrderedDict()
        self.velocity = ReplyVelocity(window=window)
        self.threads: OrderedDict[str, _Thread] = OrderedDict()
        self.message_threads: OrderedDict[str, str] = OrderedDict()
        self.frozen_since: Optional[float] = None
        self.frozen_until: float = -math.inf
        self.frozen_reason: Optional[str] = None
        self.frozen_actor: Optional[str] = None
        self.alerted_until = -math.inf
        #: Threads started here, and the reply-alls they drew while the list was not frozen.
        self.roots = 0
        self.thread_replies = 0
        self.first_seen = math.inf

    # The worker pickles a changed list once per batch for its changelog: plain
    # dicts and tuples pickle several times faster than OrderedDicts and the
    # generic __slots__ protocol (insertion order, which the LRUs rely on, is kept).
    def __getstate__(self) -> tuple:
        return tuple(dict(v) if isinstance(v, OrderedDict) else v
                     for v in (getattr(self, name) for name in self.__slots__))

    def __setstate__(self, state: tuple) -> None:
        for name, value in zip(self.__slots__, state):
            setattr(self, name, OrderedDict(value) if name in _ORDERED_FIELDS else value)

    @property
    def frozen(self) -> bool:
        return self.frozen_since is not None

    def status(self) -> ListStatus:
        if not self.frozen:
            return ListStatus(list=self.address, frozen=False)
        until = None if math.isinf(self.frozen_until) else self.frozen_until
        return ListStatus(list=self.address, frozen=True, since=self.frozen_since,
                          reason=self.frozen_reason, until=until, actor=self.frozen_actor)

    def remember_message(self, message_id: str, thread: str) -> None:
        self.message_threads[message_id] = thread
        if len(self.message_threads) > MAX_MESSAGES_PER_LIST:
            self.message_threads.popitem(last=False)

    def thread_of(self, event: MailEvent) -> str:
        if event.in_reply_to:
            known = self.message_threads.get(event.in_reply_to)
            if known is not None:
                return known
        return event.thread

    def is_open(self, config: PolicyConfig, upper: float, current: Optional["_Thread"] = None) -> bool:
        """A discussion list: its threads run to several replies, or lively replies are its norm.

        The current thread is left out, so a storm cannot make its own list look open.
        """
        if upper >= config.discussion_norm:
            return True
        roots, replies = self.roots, self.thread_replies
        if current is not None:
            roots -= 1
            replies -= current.counted
        # shrunk towards "closed" by OPEN_PRIOR threads without replies: two short exchanges do not
        # make a bulletin a discussion list
        return roots >= 2 and replies >= config.open_replies_per_thread * (roots + OPEN_PRIOR)

    def count_poster(self, sender: str) -> None:
        self.posters[sender] = self.posters.pop(sender, 0) + 1
        if len(self.posters) > MAX_POSTERS_PER_LIST:
            self.posters.popitem(last=False)


class StormDetector:
    """Stateful, deterministic storm detection over a stream of :class:`MailEvent`."""

    def __init__(self, config: PolicyConfig | None = None):
        self.config = config or PolicyConfig()
        self.senders: OrderedDict[str, SenderFanout] = OrderedDict()
        self.lists: OrderedDict[str, ListState] = OrderedDict()
        self.events_seen = 0
        #: The most members any list has had (a never-seen list beyond it has unprecedented reach).
        self.largest_list = 0
        self.watermark: Optional[float] = None
        self._frozen: dict[str, ListState] = {}
        self._next_expiry = math.inf
        self._freeze_times: deque[float] = deque()
        #: Recent records rejected as too far ahead (see FUTURE_CONFIRMATIONS).
        self._ahead: deque[float] = deque()
        #: Messages learned as history (``learn_only_until``), and whether the current one is.
        self.history_learned = 0
        self._history = False

    # -- the decision path -------------------------------------------------------
    def process(self, event: MailEvent, lists: Optional[Collection[str]] = None) -> list[Action]:
        """Learn from one event and return the actions it triggers (may be empty).

        ``lists`` scores the event for those of its lists only: where lists are
        spread over workers, each worker scores a message for the lists it owns
        (its *shares*). A message split into shares, in any order, changes
        every list as the whole message would; the sender's habit and the
        stream's counters learn from it once, with its last list (sorted), so
        shares processed one after another decide as the whole message does.

        Raises :class:`InvalidEvent` (or :class:`LateEvent`) without changing any
        learned state when the event cannot be placed in time (it only notes a
        record that is far ahead, so that several which agree move the stream on).

        >>> det = StormDetector(PolicyConfig(warmup_events=0))
        >>> two = MailEvent(message_id="m1", timestamp=1e9, sender="a@x", recipients=["l1@x", "l2@x"],
        ...                 lists={"l1@x": 500, "l2@x": 800})
        >>> det.process(two, lists=["l1@x"]), det.events_seen, sorted(det.lists)
        ([], 0, ['l1@x'])
        >>> det.process(two, lists=["l2@x"]), det.events_seen, det.largest_list
        ([], 1, 800)
        """
        cfg = self.config
        t = event.timestamp
        if type(t) is not float:  # epoch seconds nearly always: event_time's property call saved
            t = event.event_time
        if self.watermark is not None and t > self.watermark + cfg.max_future_skew:
            # One record far ahead is a clock or unit error; several that agree with each other mean
            # the stream itself moved on (a quiet month in a small organisation), and we follow it.
            ahead = self._ahead
            while ahead and abs(ahead[0] - t) > cfg.max_future_skew:
                ahead.popleft()
            if len(ahead) < FUTURE_CONFIRMATIONS - 1:
                ahead.append(t)
                raise InvalidEvent(f"timestamp {t:.0f} is {t - self.watermark:.0f} s ahead of the stream "
                                   f"(max_future_skew {cfg.max_future_skew:.0f} s)")
            ahead.clear()
        shares = event.lists if lists is None else [a for a in lists if a in event.lists]
        for address in shares:
            state = self.lists.get(address)
            if state is not None and t < state.last_seen - cfg.max_lateness:
                raise LateEvent(f"event is {state.last_seen - t:.0f} s behind list {address} "
                                f"(max_lateness {cfg.max_lateness:.0f} s)")
            if state is not None and event.message_id in state.message_threads:
                # A redelivery (at-least-once producers, or a worker re-reading
                # after a crash): it was counted once already; counting it
                # again would inflate the reply velocity.
                return []

        actions: list[Action] = []
        self._history = history = t <= cfg.learn_only_until
        if self.watermark is None or t > self.watermark:
            self.watermark = t
            if t >= self._next_expiry and not history:
                actions.extend(self._expire(event))

        sender = self.senders.get(event.sender)
        if sender is None:
            sender = self._new_sender(event.sender)
        else:  # known: now the most recently seen
            self.senders.move_to_end(event.sender)
        deliveries = event.deliveries
        warm = self.events_seen >= cfg.warmup_events
        trusted = event.sender in cfg.allow_senders

        if not event.lists:
            # Most mail goes to a handful of people: too few deliveries to alert on, so its
            # fan-out is not scored at all (the offline scorer's biggest saving; same decisions).
            if warm and not trusted and deliveries >= cfg.anomalous_min_deliveries:
                fanout_z = sender.score_one(deliveries)
                if fanout_z >= cfg.fanout_z:
                    actions.append(self._action("alert", None, event, "fanout", fanout_z,
                                                f"{deliveries} deliveries is {fanout_z:.1f} sd past this "
                                                "sender's habit"))
        else:
            fanout_z = sender.score_one(deliveries)
            for address in sorted(shares):
                actions.extend(self._list_post(address, event.lists[address], event, sender, fanout_z, warm,
                                               trusted))
            if lists is not None and max(event.lists) not in lists:
                return [] if history else actions  # the share with the last list learns from the whole message
            self.largest_list = max(self.largest_list, max(event.lists.values()))
            sender.list_posts += 1
        sender.learn_one(deliveries)
        self.events_seen += 1
        if history:
            self.history_learned += 1
            return []
        return actions

    def _list_post(self, address: str, members: int, event: MailEvent, sender: SenderFanout,
                   fanout_z: float, warm: bool, trusted: bool) -> Iterator[Action]:
        cfg = self.config
        t = event.event_time
        state = self.lists.get(address)
        never_seen = state is None
        if state is None:
            state = self._new_list(address)
        else:
            self.lists.move_to_end(address)
        state.members = members
        state.first_seen = min(state.first_seen, t)
        established = t - state.first_seen >= cfg.list_warmup
        state.posts += 1
        state.last_seen = max(state.last_seen, t)
        regular = event.sender in state.posters
        thread_key = state.thread_of(event)
        state.remember_message(event.message_id, thread_key)
        velocity = state.velocity
        velocity.observe_hours_until(t)
        upper = velocity.expected_upper(cfg.norm_sigmas)

        if not event.is_reply or trusted:
            state.count_poster(event.sender)
            if event.is_reply:
                return
            # A first post is anomalous when nothing about it is usual: a big list never seen before,
            # or a closed (bulletin-like) list posted to by someone who is not one of its posters and
            # whose reach is out of character (never posts to lists, or far past their habit).
            open_list = state.is_open(cfg, upper)
            out_of_character = sender.n == 0 or sender.list_posts == 0 or fanout_z >= cfg.fanout_z
            if established:  # its habits are known: only a closed (bulletin-like) list can be surprised
                surprising = not open_list and out_of_character
            else:  # new to us: only a very big list, bigger than any we know, is a surprise
                surprising = (never_seen and members >= cfg.new_list_min_members
                              and members > self.largest_list)
            anomalous = (warm and not trusted and not regular and members >= cfg.anomalous_min_deliveries
                         and sender.max_deliveries < members and surprising)
            state.roots += 1
            state.threads[thread_key] = _Thread(anomalous, t, event.sender, event.message_id)
            state.threads.move_to_end(thread_key)
            if len(state.threads) > MAX_THREADS_PER_LIST:
                state.threads.popitem(last=False)
            if anomalous:
                # Its first reply-all would freeze the list (within this window): a gateway that can hold a
                # thread (stormguard milter) holds them all, so not even that one is delivered.
                hold = None if address in cfg.allow_lists else ThreadHold(
                    root=event.message_id, ids=[event.message_id],
                    until=t + (cfg.velocity_window if established else cfg.anomalous_reply_window))
                why = ("a list never seen before" if never_seen else
                       "a sender who never posts to lists" if sender.list_posts == 0 else
                       "a sender never seen before" if sender.n == 0 else
                       f"reach {fanout_z:.1f} sd past this sender's habit")
                alert = self._action("alert", address, event, "fanout", fanout_z,
                                     f"post to {members} members of a bulletin-like list from {why}"
                                     if not never_seen else f"post to {members} members of {why}")
                yield alert if hold is None else msgspec.structs.replace(alert, thread=hold)
            return

        # A reply-all to the list.
        velocity.learn_one(t)
        state.count_poster(event.sender)
        thread = state.threads.get(thread_key)
        if thread is None:  # its first post came before we started, or was lost: the thread starts here
            thread = state.threads[thread_key] = _Thread(False, t, root_id=event.in_reply_to or "")
            state.roots += 1
            if len(state.threads) > MAX_THREADS_PER_LIST:
                state.threads.popitem(last=False)
        thread.add_reply(event.sender, event.in_reply_to)
        if not state.frozen:
            thread.counted += 1
            state.thread_replies += 1
        # A young list's velocity norm is a few hours old, and may be the storm's own first hours (a slow
        # burn's first three replies made bulletin8's norm "3 an hour", a discussion's): until the list is
        # established, only its other threads can show it is a discussion list.
        open_list = state.is_open(cfg, upper if established else 0.0, thread)
        if state.frozen:
            velocity.hold(t)
            if not math.isinf(state.frozen_until):
                self._set_until(state, max(state.frozen_until, t + cfg.cooldown))
            return

        n = velocity.count(t)
        harm = n * members
        big_enough = members >= cfg.min_list_members and address not in cfg.allow_lists
        closed = established and not open_list
        # A young list (habits not learned yet) that is not known to be open: a fan-in of different
        # people answering one post is a storm only with evidence that a lively discussion's first thread
        # does not give (issue 14): a burst of reply-alls to the post itself, each replier after the
        # min_replies-th given cold_reply_seconds more (three in 75 s, four in 150 s, five in 225 s: a
        # discussion's answers are written, and people soon answer each other), or cold_harm_deliveries of
        # harm. A conversation (someone answering twice, or the poster answering) is never one.
        elapsed = t - thread.root_time
        fan_in = (not established and not open_list and not thread.conversation
                  and thread.replies >= cfg.min_replies and elapsed <= cfg.thread_window
                  and thread.replies * members >= cfg.harm_deliveries)
        burst = (fan_in and thread.direct >= cfg.min_replies
                 and elapsed <= cfg.cold_reply_seconds * (thread.direct - cfg.min_replies + 1))
        cold_harm = fan_in and thread.replies * members >= cfg.cold_harm_deliveries
        slow = (thread is not None and closed and not thread.conversation
                and t - thread.root_time <= cfg.thread_window
                and thread.replies >= cfg.min_replies and thread.replies * members >= cfg.harm_deliveries)
        # a conversation (someone answering twice) is held to the open-list threshold even on a closed list,
        # ... and so are reply-alls spread over several threads: a storm is one post answered by many
        need = cfg.min_replies if closed and not thread.conversation and thread.replies >= cfg.min_replies else \
            max(cfg.open_min_replies, math.floor(cfg.open_factor * upper) + 1)
        if not (big_enough and warm):
            pass
        elif thread.anomalous and elapsed <= (cfg.velocity_window if established else cfg.anomalous_reply_window):
            velocity.hold(t)
            yield from self._freeze(state, event, thread_key, thread, "reply_to_anomalous_post", float(n),
                                    f"reply-all #{thread.replies} to an anomalous post reaching {members} members")
            return
        elif n >= need and n > upper and harm >= (cfg.harm_deliveries if need == cfg.min_replies
                                                   else cfg.open_harm_deliveries) \
                and thread.replies >= (cfg.min_replies if need == cfg.min_replies else cfg.open_min_replies) \
                and (need != cfg.min_replies or thread.replies * members >= cfg.harm_deliveries):
            # a storm is one post answered by many, and the harm that counts is that post's: two short
            # threads at once on a 342-member list (five reply-alls in the hour) are a busy hour
            velocity.hold(t)
            yield from self._freeze(state, event, thread_key, thread, "reply_velocity", n / max(upper, 1.0),
                                    f"{n} reply-alls in {cfg.velocity_window / 60:.0f} min (norm <= {upper:.1f}) "
                                    f"caused {harm} deliveries to {members} members"
                                    + ("" if closed else " of a discussion list" if open_list else
                                       " of a list without a learned norm yet"))
            return
        elif slow:
            velocity.hold(t)
            yield from self._freeze(state, event, thread_key, thread, "thread_replies", float(thread.replies),
                                    f"{thread.replies} reply-alls to one post on a bulletin-like list in "
                                    f"{(t - thread.root_time) / 60:.0f} min caused "
                                    f"{thread.replies * members} deliveries to {members} members")
            return
        elif burst:
            velocity.hold(t)
            yield from self._freeze(state, event, thread_key, thread, "reply_fan_in", float(thread.direct),
                                    f"{thread.direct} different people reply-all to the post itself within "
                                    f"{elapsed:.0f} s of it, to {members} members of a list without a learned "
                                    "norm yet")
            return
        elif cold_harm:
            velocity.hold(t)
            yield from self._freeze(state, event, thread_key, thread, "reply_fan_in", float(thread.replies),
                                    f"{thread.replies} different people reply-all to one post to {members} "
                                    f"members within {elapsed / 60:.0f} min of it: {thread.replies * members} "
                                    "deliveries on a list without a learned norm yet")
            return
        if n >= 2 and n > upper and harm >= cfg.harm_deliveries / 2 and t >= state.alerted_until:
            # an alert does not stop the hour being learned: if it was nothing, it is the norm
            state.alerted_until = t + cfg.velocity_window
            yield self._action("alert", address, event, "reply_velocity", n / max(upper, 1.0),
                               f"{n} reply-alls in {cfg.velocity_window / 60:.0f} min (norm <= {upper:.1f}) "
                               f"to {members} members")

    # -- freezes -----------------------------------------------------------------
    def _freeze(self, state: ListState, event: MailEvent, thread_key: str, thread: _Thread, detector: str,
                score: float, reason: str) -> Iterator[Action]:
        cfg = self.config
        t = event.event_time
        if self._history:  # history is learned from, never acted on
            return
        while self._freeze_times and self._freeze_times[0] <= t - 3600.0:
            self._freeze_times.popleft()
        if len(self._freeze_times) >= cfg.max_freezes_per_hour:
            yield self._action("alert", state.address, event, detector, score,
                               f"{reason}; not frozen: {cfg.max_freezes_per_hour} freezes in the last hour "
                               f"{FREEZE_CAP_MARK}, an operator must confirm")
            return
        self._freeze_times.append(t)
        state.frozen_since, state.frozen_reason, state.frozen_actor = t, reason, "stormguard"
        self._frozen[state.address] = state
        self._set_until(state, t + cfg.cooldown)
        # the storm's thread: held with the list, and kept apart from the rest when the list is released
        yield msgspec.structs.replace(self._action("freeze", state.address, event, detector, score, reason),
                                      thread=ThreadHold(root=thread.root_id or event.in_reply_to or event.message_id,
                                                        ids=_thread_ids(state, thread_key, thread)))

    def _set_until(self, state: ListState, until: float) -> None:
        state.frozen_until = until
        self._next_expiry = min(self._next_expiry, until)

    def _expire(self, event: MailEvent) -> list[Action]:
        t = event.event_time
        out = []
        for address, state in sorted(self._frozen.items()):
            if state.frozen_until <= t:
                out.append(self._action("unfreeze", address, event, "cooldown", 0.0,
                                        f"no storm post for {self.config.cooldown / 3600:g} h "
                                        f"(frozen since {state.frozen_since:.0f})"))
                self._clear_freeze(state)
        self._next_expiry = min((s.frozen_until for s in self._frozen.values()), default=math.inf)
        return out

    def _clear_freeze(self, state: ListState) -> None:
        state.frozen_since = state.frozen_reason = state.frozen_actor = None
        state.frozen_until = -math.inf
        self._frozen.pop(state.address, None)

    # -- operators ----------------------------------------------------------------
    def operator_action(self, kind: str, address: str, at: float, actor: str, reason: str) -> Action | None:
        """Freeze or unfreeze a list by hand; ``None`` when it is already in that state.

        A manual freeze has no cool-down: it lasts until an operator lifts it.
        """
        if kind not in ("freeze", "unfreeze"):
            raise ValueError(f"operators can freeze or unfreeze, not {kind!r}")
        state = self.lists.get(address) or self._new_list(address)
        if (kind == "freeze") == state.frozen:
            return None
        if kind == "freeze":
            state.frozen_since, state.frozen_reason, state.frozen_actor = at, reason, actor
            state.frozen_until = math.inf
            self._frozen[address] = state
        else:
            self._clear_freeze(state)
            state.velocity.recent.clear()
            self._next_expiry = min((s.frozen_until for s in self._frozen.values()), default=math.inf)
        return Action(kind=kind, list=address, sender=None, event_time=at, detector="operator", score=0.0,
                      message_id=None, reason=reason, actor=actor)

    def restore(self, status: ListStatus) -> None:
        """Re-apply a freeze remembered elsewhere (the worker's changelog table) after a restart."""
        if not status.frozen:
            return
        state = self.lists.get(status.list) or self._new_list(status.list)
        state.frozen_since, state.frozen_reason, state.frozen_actor = status.since, status.reason, status.actor
        self._frozen[status.list] = state
        self._set_until(state, math.inf if status.until is None else status.until)

    # -- queries --------------------------------------------------------------------
    def list_status(self, address: str) -> ListStatus:
        state = self.lists.get(address)
        return state.status() if state is not None else ListStatus(list=address, frozen=False)

    def frozen_lists(self) -> list[ListStatus]:
        return [s.status() for _, s in sorted(self._frozen.items())]

    # -- bookkeeping ------------------------------------------------------------------
    def _new_sender(self, address: str) -> SenderFanout:
        """A sender seen for the first time; beyond ``max_senders`` the least recently seen is forgotten."""
        profile = self.senders[address] = SenderFanout()
        if len(self.senders) > self.config.max_senders:
            self.senders.popitem(last=False)
        return profile

    def _new_list(self, address: str) -> ListState:
        state = self.lists[address] = ListState(address, self.config.velocity_window)
        while len(self.lists) > self.config.max_lists:
            oldest, old_state = next(iter(self.lists.items()))
            if old_state.frozen:  # a freeze is never forgotten
                self.lists.move_to_end(oldest)
                if oldest == address:
                    break
                continue
            del self.lists[oldest]
        return state

    def _action(self, kind: str, address: Optional[str], event: MailEvent, detector: str, score: float,
                reason: str) -> Action:
        return Action(kind=kind, list=address, sender=event.sender, event_time=event.event_time,
                      detector=detector, score=round(float(score), 4), message_id=event.message_id, reason=reason)


def _thread_ids(state: ListState, key: str, thread: _Thread) -> list[str]:
    """The message-ids of one thread that the list still remembers, its first post's first."""
    ids = [thread.root_id] if thread.root_id else []
    ids += [mid for mid, k in state.message_threads.items() if k == key and mid != thread.root_id]
    return ids if len(ids) <= MAX_HELD_IDS else ids[:1] + ids[1 - MAX_HELD_IDS:]


class Outcome(msgspec.Struct, frozen=True):
    """What became of one raw record: its actions, or why it was dead-lettered."""

    actions: list[Action]
    error: Optional[str] = None
    event: Optional[MailEvent] = None


def refused(exc: InvalidEvent) -> Outcome:
    """The outcome of a record that cannot be scored: no actions, and the reason its dead letter carries
    (the same words offline and live).

    >>> refused(InvalidEvent("record is not JSON")).error, refused(LateEvent()).error
    ('record is not JSON', 'LateEvent')
    """
    return Outcome([], str(exc) or exc.__class__.__name__)


def process_raw(detector: StormDetector, raw: bytes, lists: Optional[Collection[str]] = None) -> Outcome:
    """Parse and score one raw record (for ``lists`` only, if given: see :meth:`StormDetector.process`);
    invalid or late records come back with ``error`` set."""
    try:
        event = parse_event(raw)
        return Outcome(detector.process(event, lists), None, event)
    except InvalidEvent as exc:
        return refused(exc)
