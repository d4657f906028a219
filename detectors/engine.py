"""The storm detector: one event in, zero or more actions out.

:class:`StormDetector` is the single decision path. ``stormguard score`` (offline)
and the live Faust worker both feed it events in order and publish whatever it
returns, so they take the same decisions on the same input. It reads no clock:
time is the events' own (``timestamp``), and cool-downs expire when the
stream's event time passes them.

How a storm is recognised
-------------------------
*Fan-out*: every message is scored against its sender's habit
(:class:`~detectors.baselines.SenderFanout`). A root post that reaches many
mailboxes and is out of character (a sender who never posts to lists, a list
never seen before, or a reach far past the sender's habit) marks its thread
as anomalous and raises an alert.

*Reply velocity*: every reply-all to a list is counted in an event-time window
and compared with the list's own learned norm
(:class:`~detectors.baselines.ReplyVelocity`), and weighed by harm: the
deliveries those replies caused.

A list is frozen on the first reply-all to an anomalous post (one reply-all
delivered), or when its reply-alls are both above its norm and harmful
(``min_replies``, three by default). Lists too small to hurt, discussion
lists whose norm is lively, and big lists with one or two stray replies are
left alone.

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
from typing import Iterable, Iterator, Optional

import msgspec

from detectors.baselines import ReplyVelocity, SenderFanout
from detectors.events import InvalidEvent, MailEvent, parse_event
from detectors.policy import Action, PolicyConfig

#: Threads remembered per list (the newest win).
MAX_THREADS_PER_LIST = 64
#: Message-ids remembered per list, to follow In-Reply-To chains to their root.
MAX_MESSAGES_PER_LIST = 256
#: Distinct posters remembered per list.
MAX_POSTERS_PER_LIST = 32


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
    __slots__ = ("anomalous", "root_time", "replies")

    def __init__(self, anomalous: bool, root_time: float):
        self.anomalous = anomalous
        self.root_time = root_time
        self.replies = 0


class ListState:
    """Everything Stormguard remembers about one list."""

    __slots__ = ("address", "members", "posts", "last_seen", "posters", "velocity", "threads",
                 "message_threads", "frozen_since", "frozen_until", "frozen_reason", "frozen_actor",
                 "alerted_until")

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
        self.watermark: Optional[float] = None
        self._frozen: dict[str, ListState] = {}
        self._next_expiry = math.inf
        self._freeze_times: deque[float] = deque()

    # -- the decision path -------------------------------------------------------
    def process(self, event: MailEvent) -> list[Action]:
        """Learn from one event and return the actions it triggers (may be empty).

        Raises :class:`InvalidEvent` (or :class:`LateEvent`) without changing any
        state when the event cannot be placed in time.
        """
        cfg = self.config
        t = event.event_time
        if self.watermark is not None and t > self.watermark + cfg.max_future_skew:
            raise InvalidEvent(f"timestamp {t:.0f} is {t - self.watermark:.0f} s ahead of the stream "
                               f"(max_future_skew {cfg.max_future_skew:.0f} s)")
        for address in event.lists:
            state = self.lists.get(address)
            if state is not None and t < state.last_seen - cfg.max_lateness:
                raise LateEvent(f"event is {state.last_seen - t:.0f} s behind list {address} "
                                f"(max_lateness {cfg.max_lateness:.0f} s)")

        actions: list[Action] = []
        if self.watermark is None or t > self.watermark:
            self.watermark = t
            if t >= self._next_expiry:
                actions.extend(self._expire(event))

        sender = self._sender(event.sender)
        deliveries = event.deliveries
        fanout_z = sender.score_one(deliveries)
        warm = self.events_seen >= cfg.warmup_events
        trusted = event.sender in cfg.allow_senders

        if not event.lists and warm and not trusted and deliveries >= cfg.anomalous_min_deliveries \
                and fanout_z >= cfg.fanout_z:
            actions.append(self._action("alert", None, event, "fanout", fanout_z,
                                        f"{deliveries} deliveries is {fanout_z:.1f} sd past this sender's habit"))
        for address in sorted(event.lists):
            actions.extend(self._list_post(address, event.lists[address], event, sender, fanout_z, warm, trusted))

        sender.learn_one(deliveries)
        if event.lists:
            sender.list_posts += 1
        self.events_seen += 1
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
        state.posts += 1
        state.last_seen = max(state.last_seen, t)
        regular = event.sender in state.posters
        thread_key = state.thread_of(event)
        state.remember_message(event.message_id, thread_key)
        velocity = state.velocity
        velocity.observe_hours_until(t)
        discussion = velocity.expected_upper(cfg.norm_sigmas) >= cfg.discussion_norm

        if not event.is_reply or trusted:
            state.count_poster(event.sender)
            if event.is_reply:
                return
            out_of_character = (
                fanout_z >= cfg.fanout_z
                or (sender.list_posts == 0 and sender.n > 0)
                or (never_seen and warm)
            )
            anomalous = (warm and not trusted and not regular and not discussion
                         and members >= cfg.anomalous_min_deliveries and out_of_character
                         and sender.max_deliveries < members)
            state.threads[thread_key] = _Thread(anomalous, t)
            state.threads.move_to_end(thread_key)
            if len(state.threads) > MAX_THREADS_PER_LIST:
                state.threads.popitem(last=False)
            if anomalous:
                why = ("a list never seen before" if never_seen else
                       "a sender who never posts to lists" if sender.list_posts == 0 else
                       f"reach {fanout_z:.1f} sd past this sender's habit")
                yield self._action("alert", address, event, "fanout", fanout_z,
                                   f"post to {members} members from {why}")
            return

        # A reply-all to the list.
        velocity.learn_one(t)
        state.count_poster(event.sender)
        thread = state.threads.get(thread_key)
        if thread is not None:
            thread.replies += 1
        if state.frozen:
            velocity.hold(t)
            if not math.isinf(state.frozen_until):
                self._set_until(state, max(state.frozen_until, t + cfg.cooldown))
            return

        n = velocity.count(t)
        upper = velocity.expected_upper(cfg.norm_sigmas)
        harm = n * members
        big_enough = members >= cfg.min_list_members and address not in cfg.allow_lists
        if (thread is not None and thread.anomalous and big_enough and warm
                and t - thread.root_time <= cfg.velocity_window):
            velocity.hold(t)
            yield from self._freeze(state, event, "reply_to_anomalous_post", float(n),
                                    f"reply-all #{thread.replies} to an anomalous post reaching {members} members")
        elif n >= cfg.min_replies and n > upper and harm >= cfg.harm_deliveries and big_enough and warm:
            velocity.hold(t)
            yield from self._freeze(state, event, "reply_velocity", n / max(upper, 1.0),
                                    f"{n} reply-alls in {cfg.velocity_window / 60:.0f} min (norm <= {upper:.1f}) "
                                    f"caused {harm} deliveries to {members} members")
        elif n >= 2 and n > upper and harm >= cfg.harm_deliveries / 2 and t >= state.alerted_until:
            velocity.hold(t)
            state.alerted_until = t + cfg.velocity_window
            yield self._action("alert", address, event, "reply_velocity", n / max(upper, 1.0),
                               f"{n} reply-alls in {cfg.velocity_window / 60:.0f} min (norm <= {upper:.1f}) "
                               f"to {members} members")

    # -- freezes -----------------------------------------------------------------
    def _freeze(self, state: ListState, event: MailEvent, detector: str, score: float,
                reason: str) -> Iterator[Action]:
        cfg = self.config
        t = event.event_time
        while self._freeze_times and self._freeze_times[0] <= t - 3600.0:
            self._freeze_times.popleft()
        if len(self._freeze_times) >= cfg.max_freezes_per_hour:
            yield self._action("alert", state.address, event, detector, score,
                               f"{reason}; not frozen: {cfg.max_freezes_per_hour} freezes in the last hour "
                               "(max_freezes_per_hour), an operator must confirm")
            return
        self._freeze_times.append(t)
        state.frozen_since, state.frozen_reason, state.frozen_actor = t, reason, "stormguard"
        self._frozen[state.address] = state
        self._set_until(state, t + cfg.cooldown)
        yield self._action("freeze", state.address, event, detector, score, reason)

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
    def _sender(self, address: str) -> SenderFanout:
        profile = self.senders.get(address)
        if profile is None:
            profile = self.senders[address] = SenderFanout()
            if len(self.senders) > self.config.max_senders:
                self.senders.popitem(last=False)
        else:
            self.senders.move_to_end(address)
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


class Outcome(msgspec.Struct, frozen=True):
    """What became of one raw record: its actions, or why it was dead-lettered."""

    actions: list[Action]
    error: Optional[str] = None
    event: Optional[MailEvent] = None


def process_raw(detector: StormDetector, raw: bytes) -> Outcome:
    """Parse and score one raw record; invalid or late records come back with ``error`` set."""
    try:
        event = parse_event(raw)
        return Outcome(detector.process(event), None, event)
    except InvalidEvent as exc:
        return Outcome([], str(exc) or exc.__class__.__name__)


def score_stream(records: Iterable[bytes], config: PolicyConfig | None = None) -> Iterator[Outcome]:
    """Score raw records in order with a fresh detector: the offline decision path."""
    detector = StormDetector(config)
    for raw in records:
        yield process_raw(detector, raw)
