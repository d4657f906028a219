"""Which messages a gateway holds before delivery, from Stormguard's decisions.

A :class:`HoldBook` is what ``stormguard milter`` consults for every message and what the
evaluation's thread-hold gateway runs offline: the frozen lists, and the threads held by a
:class:`~detectors.policy.ThreadHold` (the alert on an anomalous first post names its thread; a
freeze names the storm's thread). A message is held when it goes to a frozen list, or when it goes
to a list whose held thread it replies into: one of its In-Reply-To or References ids is one of
the thread's message-ids. A lookup is a few dictionary probes.

Pure and deterministic like the rest of ``detectors``: time is passed in (event time offline, the
wall clock in the milter).

>>> from detectors.policy import ThreadHold
>>> book = HoldBook()
>>> book.hold_thread("all@nhs.net", ThreadHold(root="<t0@x>", ids=["<t0@x>"], until=1000.0))
>>> book.decide(["all@nhs.net"], ["<t0@x>"], now=10.0)
Hold(kind='thread', list='all@nhs.net', root='t0@x')
>>> book.decide(["all@nhs.net"], ["<other@x>"], now=10.0) is None   # another thread flows
True
>>> book.decide(["nurse@nhs.net"], ["<t0@x>"], now=10.0) is None     # a private answer flows
True
>>> book.decide(["all@nhs.net"], ["<t0@x>"], now=1000.0) is None     # the hold has ended
True
>>> book.freeze("all@nhs.net")
>>> book.decide(["ALL@nhs.net"], [], now=2000.0)
Hold(kind='list', list='all@nhs.net', root=None)
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Optional

from detectors.policy import Action, ThreadHold

#: Held threads remembered at most; past it, those that end first are forgotten first.
MAX_WATCHES = 100_000

_ID = re.compile(r"<([^<>\s]+)>")


def message_ids(header: Optional[str]) -> list[str]:
    """The message-ids of an In-Reply-To or References header (or one bare id), normalised.

    >>> message_ids("<a@x> <b@y>\\r\\n <c@z>")
    ['a@x', 'b@y', 'c@z']
    >>> message_ids("reply0"), message_ids(None), message_ids("  ")
    (['reply0'], [], [])
    """
    if not header:
        return []
    found = _ID.findall(header)
    if found:
        return found
    bare = header.strip().strip("<>").strip()
    return [bare] if bare and " " not in bare else []


def normalise_id(message_id: str) -> str:
    """A message-id without its angle brackets and surrounding space (how ids are compared)."""
    return message_id.strip().strip("<>").strip()


class Hold(NamedTuple):
    """Why a message is held: its ``list`` is frozen (``kind='list'``) or it replies into a held thread."""

    kind: str
    list: str
    #: The held thread's first post (normalised id); for a frozen list, the storm's thread if the
    #: message replies into it, else None.
    root: Optional[str]


class _Watch:
    __slots__ = ("list", "root", "ids", "until", "storm")

    def __init__(self, address: str, root: str, ids: set[str], until: Optional[float]):
        self.list, self.root, self.ids = address, root, ids
        #: when a timed hold (an anomalous post's) ends; None: there is none
        self.until = until
        #: a storm's thread (named by a freeze): held while its list is frozen
        self.storm = until is None


class HoldBook:
    """Frozen lists and held threads, and the decision for one message."""

    def __init__(self, max_watches: int = MAX_WATCHES):
        self.max_watches = max_watches
        #: frozen list -> when its freeze ends by itself (None: when it is lifted)
        self._frozen: dict[str, Optional[float]] = {}
        #: (list, root) -> the watch; normalised message-id -> the watches naming it.
        self._watches: dict[tuple[str, str], _Watch] = {}
        self._by_id: dict[str, list[_Watch]] = {}
        #: list -> its storm thread (the last freeze's), kept after the unfreeze: releases leave it apart.
        self._storm: dict[str, _Watch] = {}

    # -- what the decisions say -------------------------------------------------------------
    def apply(self, action: Action) -> None:
        """Follow one action of ``stormguard.actions`` (shadow-mode decisions hold nothing)."""
        if not action.enforced or not action.list or action.kind not in ("alert", "freeze", "unfreeze"):
            return
        if action.thread is not None:
            self.hold_thread(action.list, action.thread)
        if action.kind == "freeze":
            self.freeze(action.list)
        elif action.kind == "unfreeze":
            self.unfreeze(action.list)

    def freeze(self, address: str, until: Optional[float] = None) -> None:
        """Hold every message to ``address`` (until ``until``, if given: a cool-down's end)."""
        self._frozen[address.strip().lower()] = until

    def unfreeze(self, address: str) -> None:
        self._frozen.pop(address.strip().lower(), None)

    def hold_thread(self, address: str, hold: ThreadHold) -> None:
        """Hold replies into a thread: until ``hold.until``, or while the list is frozen (``until`` None)."""
        address = address.strip().lower()
        root = normalise_id(hold.root)
        ids = {normalise_id(i) for i in hold.ids if normalise_id(i)} | {root}
        watch = self._watches.get((address, root))
        if watch is None:
            watch = self._watches[(address, root)] = _Watch(address, root, set(), hold.until)
            if len(self._watches) > self.max_watches:
                self._forget_ended()
        elif hold.until is None:  # the freeze names the thread: a storm's too, and its timed hold still runs
            watch.storm = True
        else:
            watch.until = hold.until if watch.until is None else max(hold.until, watch.until)
        for mid in ids - watch.ids:
            self._by_id.setdefault(mid, []).append(watch)
        watch.ids |= ids
        if hold.until is None:
            self._storm[address] = watch

    def end_thread(self, address: str, root: str) -> None:
        """Forget one held thread (a tombstone on the thread-hold topic)."""
        watch = self._watches.pop((address.strip().lower(), normalise_id(root)), None)
        if watch is not None:
            self._drop_ids(watch)

    def _drop_ids(self, watch: _Watch) -> None:
        for mid in watch.ids:
            named = self._by_id.get(mid)
            if named is not None:
                named[:] = [w for w in named if w is not watch]
                if not named:
                    del self._by_id[mid]

    def _forget_ended(self) -> None:
        """Too many held threads: forget the timed ones that end first, down to half the limit."""
        storms = {id(w) for w in self._storm.values()}
        timed = sorted((w.until, key) for key, w in self._watches.items()
                       if w.until is not None and id(w) not in storms)
        for _, key in timed[:max(0, len(self._watches) - self.max_watches // 2)]:
            self._drop_ids(self._watches.pop(key))

    # -- the decision -----------------------------------------------------------------------
    def frozen(self, address: str, now: Optional[float] = None) -> bool:
        address = address.strip().lower()
        if address not in self._frozen:
            return False
        until = self._frozen[address]
        return until is None or now is None or now < until

    def frozen_lists(self, now: Optional[float] = None) -> list[str]:
        return sorted(a for a in list(self._frozen) if self.frozen(a, now))

    def decide(self, lists: Iterable[str], refs: Iterable[str], now: float) -> Optional[Hold]:
        """Hold a message to ``lists`` (its recipients as submitted) replying to ``refs``? None: deliver it.

        ``refs`` are the message's In-Reply-To and References ids (as :func:`message_ids` gives them).
        """
        targets = {a.strip().lower() for a in lists}
        refs = [normalise_id(r) for r in refs]
        for address in sorted(targets.intersection(self._frozen)):
            if not self.frozen(address, now):
                continue
            storm = self._storm.get(address)
            root = storm.root if storm is not None and any(r in storm.ids for r in refs) else None
            return Hold("list", address, root)
        for ref in refs:
            for watch in self._by_id.get(ref, ()):
                if watch.list in targets and watch.until is not None and now < watch.until:
                    return Hold("thread", watch.list, watch.root)
        return None

    def storm_thread(self, address: str) -> Optional[tuple[str, frozenset[str]]]:
        """The last storm thread of a list: (root, its message-ids), or None."""
        watch = self._storm.get(address.strip().lower())
        return None if watch is None else (watch.root, frozenset(watch.ids))

    def in_thread(self, address: str, root: str, refs: Iterable[str]) -> bool:
        """Does a message replying to ``refs`` reply into the held thread ``root`` of ``address``?"""
        watch = self._watches.get((address.strip().lower(), normalise_id(root)))
        return watch is not None and any(normalise_id(r) in watch.ids for r in refs)

    def thread_ids(self, address: str, root: str) -> set[str]:
        """The message-ids of one held thread (normalised; empty if the thread is not known)."""
        watch = self._watches.get((address.strip().lower(), normalise_id(root)))
        return set(watch.ids) if watch is not None else set()

    def threads(self) -> list[dict]:
        """Every held thread, for an operator (``GET /api/holds`` of the milter)."""
        return [{"list": w.list, "root": w.root, "ids": len(w.ids), "until": w.until,
                 "storm": self._storm.get(w.list) is w} for w in self._watches.values()]
