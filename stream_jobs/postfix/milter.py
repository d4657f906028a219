"""``stormguard milter``: a Postfix milter that holds a storm's thread before its first reply-all is delivered.

Postfix's policy protocol carries the envelope only, so ``stormguard policy`` can hold a frozen
list but never a thread. A milter (Postfix MILTER_README: ``smtpd_milters``,
``non_smtpd_milters``) sees the envelope, the recipients and the headers, and at the end of the
message it can *quarantine* it (``SMFIR_QUARANTINE``): Postfix puts it in the hold queue, where
nothing is bounced and nothing is lost. For every message this milter

1. reads the envelope sender and recipients, and the headers Message-ID, In-Reply-To, References,
   Subject, Auto-Submitted, Precedence and List-Id;
2. produces the contract event to ``mail.events`` itself (lists and member counts from the same
   ``virtual(5)`` list map as ``stormguard ingest postfix-log``), keyed by its first list, else
   its sender, as ``stormguard replay`` keys: no maillog parsing, no ``header_checks``;
3. quarantines it when it goes to a frozen list, or to a list whose held thread it replies into
   (one of its In-Reply-To or References ids is one of the thread's message-ids): the lookup is
   :class:`detectors.holds.HoldBook`, in memory, fed by the compacted topics
   ``stormguard.list-state`` and ``stormguard.thread-watch`` that the worker publishes.

A message carrying List-Id is a list manager's own distribution of a post it already accepted
(Mailman re-injecting into Postfix): it is neither an event (the post was counted) nor held (the
post was decided).

It **fails open**: an error of its own answers ``continue`` (deliver), and Postfix's
``milter_default_action = accept`` covers a milter that is down or too slow. The protocol is
spoken with ``kilter.protocol`` (pure Python, typed, sans-I/O): this module owns the sockets, the
timeouts and the rule that nothing of ours ever rejects or delays mail.

Holds are written to a journal (:mod:`stream_jobs.postfix.held`), from which an operator, or the
unfreeze of a list, releases or discards them by thread (``postsuper -H`` / ``-d``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import deque
from email.header import decode_header, make_header
from typing import Callable, List, Optional

import msgspec

from detectors.holds import Hold, HoldBook, message_ids, normalise_id
from detectors.events import MailEvent, encode_event
from stream_jobs.postfix.list_state import warn

log = logging.getLogger("stormguard.milter")

#: Headers read (lower case); everything else is not kept.
READ_HEADERS = frozenset({"message-id", "in-reply-to", "references", "subject", "auto-submitted", "precedence",
                          "list-id"})
#: Bytes of one header value kept at most (References of a long thread grows; the ids we need are at its ends).
MAX_HEADER = 16 * 1024
#: Longest a silent MTA connection is kept open (Postfix's milter_command_timeout is 30 s).
IDLE_TIMEOUT = 300.0
#: Largest milter packet accepted (Postfix sends at most 64 KiB body chunks; we ask for none).
MAX_PACKET = 1 << 20
DEFAULT_HOLD_TEXT = "Stormguard: {why}"


class MessageSeen(msgspec.Struct, kw_only=True):
    """What the milter collected about one message, up to its end."""

    queue_id: str = ""
    sender: str = ""
    recipients: list[str] = []
    headers: dict[str, str] = {}
    #: Its event was produced already (a pre-send hold waited for the worker's decision on it).
    produced: bool = False

    def header(self, name: str) -> Optional[str]:
        return self.headers.get(name)

    @property
    def refs(self) -> list[str]:
        """In-Reply-To and References ids, In-Reply-To's first, each once."""
        out: list[str] = []
        for name in ("in-reply-to", "references"):
            for mid in message_ids(self.headers.get(name)):
                if mid not in out:
                    out.append(mid)
        return out

    @property
    def auto_submitted(self) -> bool:
        """An auto-reply (RFC 3834 Auto-Submitted, or Precedence bulk/junk/auto_reply): storm fuel like any other."""
        auto = (self.headers.get("auto-submitted") or "no").strip().lower()
        prec = (self.headers.get("precedence") or "").strip().lower()
        return not auto.startswith("no") or prec in ("bulk", "junk", "auto_reply")


def _decoded(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # noqa: BLE001 - a broken encoded-word: keep what was sent
        return value


def _address(raw: str) -> str:
    """An envelope address as the event wants it: without <>, ESMTP arguments or case.

    >>> _address("<Nurse@NHS.net>"), _address("<>")
    ('nurse@nhs.net', '')
    """
    return raw.strip().split(" ", 1)[0].strip("<>").strip().lower()


class MilterDecider:
    """The per-message work, apart from the protocol: the event, and the decision. Pure apart from ``clock``.

    >>> from detectors.policy import ThreadHold
    >>> book = HoldBook()
    >>> book.hold_thread("all@nhs.net", ThreadHold(root="<t0@x>", ids=["<t0@x>"], until=2e9))
    >>> d = MilterDecider(book, {"all@nhs.net": 840_000}, clock=lambda: 1.5e9)
    >>> seen = MessageSeen(queue_id="4Xq", sender="nurse@nhs.net", recipients=["all@nhs.net"],
    ...                    headers={"message-id": "<r1@x>", "in-reply-to": "<t0@x>", "subject": "RE: test"})
    >>> event, hold = d.decide(seen)
    >>> event.lists, event.in_reply_to, hold.kind
    ({'all@nhs.net': 840000}, '<t0@x>', 'thread')
    """

    def __init__(self, book: HoldBook, lists: dict[str, int], clock: Callable[[], float] = time.time,
                 hold_threads: bool = True):
        self.book = book
        self.lists = lists
        self.clock = clock
        self.hold_threads = hold_threads
        self.counts = {"messages": 0, "held_list": 0, "held_thread": 0, "held_presend": 0, "events": 0,
                       "list_distributions": 0, "errors": 0}

    def event(self, seen: MessageSeen, now: float) -> MailEvent:
        recipients = list(dict.fromkeys(r for r in seen.recipients if r)) or ["undisclosed-recipients"]
        mid = (seen.header("message-id") or "").strip()
        if not mid:  # Postfix adds one after the milter: ours names the queue id, so an operator can find it
            mid = f"<{seen.queue_id or int(now * 1e6)}.stormguard@milter.invalid>"
        irt = message_ids(seen.header("in-reply-to"))
        subject = seen.header("subject")
        return MailEvent(message_id=mid[:998], timestamp=round(now, 3), sender=seen.sender or "MAILER-DAEMON",
                         recipients=recipients[:10_000],
                         lists={r: self.lists[r] for r in recipients if r in self.lists},
                         in_reply_to=f"<{irt[0]}>"[:998] if irt else None,
                         subject=_decoded(subject)[:4096] if subject is not None else None)

    def decide(self, seen: MessageSeen) -> tuple[Optional[MailEvent], Optional[Hold]]:
        """The event to produce (None for a list manager's distribution) and the hold (None: deliver)."""
        self.counts["messages"] += 1
        if seen.header("list-id") is not None:
            self.counts["list_distributions"] += 1
            return None, None
        now = self.clock()
        event = self.event(seen, now)
        hold = self.book.decide(seen.recipients, seen.refs, now)
        if hold is not None and hold.kind == "thread" and not self.hold_threads:
            hold = None
        if hold is not None:
            self.counts["held_" + hold.kind] += 1
        return event, hold


def hold_reason(hold: Hold) -> str:
    """The text Postfix logs with the quarantine (``milter-hold: ...``) and keeps with the queue file.

    >>> hold_reason(Hold("thread", "all@nhs.net", "t0@x"))
    'Stormguard: reply into held thread <t0@x> of all@nhs.net'
    """
    if hold.kind == "presend":
        why = (f"post <{hold.root}> to {hold.list} held before expansion: its reach is unprecedented "
               "(a moderator releases or discards it)")
    elif hold.kind == "list":
        why = f"list {hold.list} is frozen" + (f" (storm thread <{hold.root}>)" if hold.root else "")
    else:
        why = f"reply into held thread <{hold.root}> of {hold.list}"
    return DEFAULT_HOLD_TEXT.replace("{why}", why)


class PreSendHold:
    """Optional: hold a first post whose reach is unprecedented before it is expanded (off by default).

    A post (not a reply) to a list of at least ``floor`` members is produced at once, and the milter
    waits, up to ``wait`` seconds, for the worker's decision on it: if the worker holds its thread
    (the post is anomalous: a list bigger than any posted to so far, or a bulletin posted to out of
    character), the post itself is held, so not even the test message reaches 840,000 mailboxes.
    The decision stays the core's; no answer in time delivers it (fail open).
    """

    def __init__(self, book: HoldBook, emit: Callable[[MailEvent], None], floor: int = 20_000, wait: float = 2.0):
        self.book, self.emit, self.floor, self.wait = book, emit, floor, wait

    def wants(self, event: Optional[MailEvent]) -> bool:
        return event is not None and bool(event.lists) and not event.is_reply \
            and max(event.lists.values()) >= self.floor

    async def decide(self, event: MailEvent) -> Optional[Hold]:
        self.emit(event)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        root = normalise_id(event.message_id)
        while True:
            for address in sorted(event.lists):
                if self.book.thread_ids(address, root):
                    return Hold("presend", address.strip().lower(), root)
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.01)


# -- the protocol -------------------------------------------------------------------------------


class MilterServer:
    """asyncio server speaking the milter protocol to Postfix; one decider, any number of connections.

    ``on_message(seen, event, hold)`` is called after the answer is sent: it produces the event and
    journals the hold (its errors are logged, never answered to Postfix).
    """

    def __init__(self, decider: MilterDecider,
                 on_message: Optional[Callable[[MessageSeen, Optional[MailEvent], Optional[Hold]], None]] = None,
                 idle_timeout: float = IDLE_TIMEOUT, presend: Optional[PreSendHold] = None):
        self.decider = decider
        self.presend = presend
        self.on_message = on_message
        self.idle_timeout = idle_timeout
        self.server: Optional[asyncio.AbstractServer] = None
        #: seconds spent deciding each of the latest messages (protocol excluded), for /healthz
        self.decide_seconds: "deque[float]" = deque(maxlen=10_000)

    async def start(self, listen: str) -> asyncio.AbstractServer:
        kind, where = parse_listen(listen)
        if kind == "unix":
            self.server = await asyncio.start_unix_server(self.handle, path=where)
        else:
            host, port = where
            self.server = await asyncio.start_server(self.handle, host, port)
        return self.server

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from kilter.protocol import messages as m
        from kilter.protocol.buffer import SimpleBuffer
        from kilter.protocol.exceptions import UnknownMessage

        conn: dict = {"macros": {}, "no_reply": set(), "seen": MessageSeen()}

        def send(*replies) -> None:
            out = SimpleBuffer(64 * 1024)
            for reply in replies:
                reply.pack(out)
            writer.write(out[:].tobytes())

        try:
            while True:
                try:  # a packet: 4-byte length, then the command and its data
                    head = await asyncio.wait_for(reader.readexactly(4), self.idle_timeout)
                except asyncio.TimeoutError:
                    return
                size = int.from_bytes(head, "big")
                if not 0 < size <= MAX_PACKET:
                    raise ValueError(f"milter packet of {size} bytes")
                packet = await asyncio.wait_for(reader.readexactly(size), self.idle_timeout)
                buf = SimpleBuffer(size + 4)
                buf[:] = head + packet
                try:
                    message, _ = m.Message.unpack(buf)
                except UnknownMessage:  # a newer MTA's command: skip it
                    continue
                try:
                    answer = self.dispatch(message, conn)
                finally:
                    message.release()
                if answer is None:
                    continue
                if answer == "close":
                    return
                if isinstance(answer, tuple) and answer and answer[0] == "eom":
                    _, replies, event, hold, done = answer
                    if hold is None and self.presend is not None and self.presend.wants(event):
                        try:
                            done.produced = True
                            hold = await self.presend.decide(event)
                        except Exception as exc:  # noqa: BLE001 - fail open: deliver
                            self.decider.counts["errors"] += 1
                            warn("milter-presend", "pre-send hold failed (%s: %s); delivering", type(exc).__name__,
                                 exc)
                        if hold is not None:
                            self.decider.counts["held_presend"] += 1
                            replies = [m.Quarantine(hold_reason(hold)), m.Continue()]
                    send(*replies)
                    await writer.drain()
                    conn["seen"] = MessageSeen(queue_id="")
                    if self.on_message is not None:
                        try:
                            self.on_message(done, event, hold)
                        except Exception as exc:  # noqa: BLE001 - the answer is sent; log, go on
                            self.decider.counts["errors"] += 1
                            warn("milter-after", "after a message: %s: %s", type(exc).__name__, exc)
                    continue
                send(*answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # noqa: BLE001 - Postfix applies milter_default_action (accept)
            self.decider.counts["errors"] += 1
            warn("milter-protocol", "closing a milter connection after %s: %s (Postfix applies "
                 "milter_default_action)", type(exc).__name__, exc)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:  # noqa: BLE001
                pass

    def dispatch(self, message, conn: dict):
        """One MTA command: the replies to send, "close", ("eom", ...) or None (no reply)."""
        from kilter.protocol import messages as m

        P = m.ProtocolFlags
        seen: MessageSeen = conn["seen"]
        macros: dict = conn["macros"]
        if isinstance(message, m.Negotiate):
            # Ask only for what we read; the rest is skipped by Postfix. "No reply" for the steps where our
            # answer is always continue saves a round trip each, where Postfix offers it.
            offered = message.protocol_flags
            skip = P.NO_CONNECT | P.NO_HELO | P.NO_BODY | P.NO_UNKNOWN | P.NO_DATA
            quiet = P.NR_SENDER | P.NR_RECIPIENT | P.NR_HEADER | P.NR_END_OF_HEADERS
            wanted = skip & offered
            if quiet & offered == quiet:
                wanted |= quiet
                conn["no_reply"] = {m.EnvelopeFrom, m.EnvelopeRecipient, m.Header, m.EndOfHeaders}
            actions = m.ActionFlags.QUARANTINE & message.action_flags
            if not actions:
                warn("milter-negotiate", "the MTA does not offer quarantine: nothing can be held")
            return (m.Negotiate(6, actions, wanted),)
        if isinstance(message, m.Macro):
            macros.update(message.macros)
            if macros.get("i"):
                seen.queue_id = macros["i"]
            return None
        if isinstance(message, m.EnvelopeFrom):
            seen = conn["seen"] = MessageSeen(queue_id=macros.get("i", ""))
            seen.sender = _address(bytes(message.sender).decode("utf-8", "replace"))
            return self._continue(message, conn)
        if isinstance(message, m.EnvelopeRecipient):
            if len(seen.recipients) < 10_000:
                seen.recipients.append(_address(bytes(message.recipient).decode("utf-8", "replace")))
            return self._continue(message, conn)
        if isinstance(message, m.Header):
            name = message.name.lower()
            if name in READ_HEADERS and name not in seen.headers:
                seen.headers[name] = bytes(message.value[:MAX_HEADER]).decode("utf-8", "replace")
            return self._continue(message, conn)
        if isinstance(message, m.EndOfMessage):
            if macros.get("i"):
                seen.queue_id = macros["i"]
            event, hold, replies = None, None, [m.Continue()]
            started = time.perf_counter()
            try:
                event, hold = self.decider.decide(seen)
                if hold is not None:
                    replies = [m.Quarantine(hold_reason(hold)), m.Continue()]
            except Exception as exc:  # noqa: BLE001 - fail open: deliver
                self.decider.counts["errors"] += 1
                warn("milter-decide", "milter decision failed (%s: %s); delivering", type(exc).__name__, exc)
            self.decide_seconds.append(time.perf_counter() - started)
            return ("eom", replies, event, hold, seen)
        if isinstance(message, m.Abort):
            macros.pop("i", None)
            conn["seen"] = MessageSeen()
            return None
        if isinstance(message, m.Close):
            return "close"
        # Connect, Helo, Data, EndOfHeaders, Body, Unknown: whatever was not skipped, continue
        return self._continue(message, conn)

    def decide_ms(self) -> dict:
        """p50 and p99 of the latest decisions, in milliseconds (for /healthz)."""
        got = sorted(self.decide_seconds)
        if not got:
            return {"p50": None, "p99": None, "of": 0}
        return {"p50": round(got[len(got) // 2] * 1000, 4), "p99": round(got[min(len(got) - 1, int(0.99 * len(got)))]
                                                                        * 1000, 4), "of": len(got)}

    @staticmethod
    def _continue(message, conn: dict):
        from kilter.protocol import messages as m

        if type(message) in conn["no_reply"]:
            return None
        return (m.Continue(),)


def parse_listen(listen: str):
    """Postfix's milter address forms: ``inet:HOST:PORT`` (or ``HOST:PORT``) and ``unix:/path``.

    >>> parse_listen("inet:127.0.0.1:8899"), parse_listen("unix:/run/sg.sock"), parse_listen("[::1]:8899")
    (('inet', ('127.0.0.1', 8899)), ('unix', '/run/sg.sock'), ('inet', ('::1', 8899)))
    """
    if listen.startswith("unix:"):
        return "unix", listen[5:]
    rest = listen[5:] if listen.startswith("inet:") else listen
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: expected inet:HOST:PORT or unix:/path, e.g. inet:127.0.0.1:8899")
    return "inet", (host.strip("[]") or "127.0.0.1", int(port))


# -- following the worker's topics ------------------------------------------------------------------


class _TopicIntoBook:
    """A compacted topic applied to the :class:`HoldBook` on the event loop (feeds run in threads)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, apply: Callable[[Optional[bytes], Optional[bytes]], None],
                 describe: Callable[[], list]):
        import threading

        self.loop, self._apply, self._describe = loop, apply, describe
        self.ready = threading.Event()
        self.records = 0

    def apply(self, key: Optional[bytes], value: Optional[bytes]) -> None:
        self.records += 1
        self.loop.call_soon_threadsafe(self._safe, key, value)

    def _safe(self, key, value) -> None:
        try:
            self._apply(key, value)
        except Exception as exc:  # noqa: BLE001 - a bad record is skipped, loudly
            warn("milter-record", "ignoring a record the milter cannot use (%s: %s): %r", type(exc).__name__, exc,
                 (value or b"")[:200])

    def frozen_lists(self) -> list:
        return self._describe()


def list_state_applier(book: HoldBook, on_unfreeze: Optional[Callable[[str], None]] = None):
    """``stormguard.list-state`` records into the book; a frozen list that turns unfrozen calls ``on_unfreeze``."""
    from detectors.engine import ListStatus

    decoder = msgspec.json.Decoder(ListStatus)

    def apply(key: Optional[bytes], value: Optional[bytes]) -> None:
        if value is None:
            if key:
                address = key.decode("utf-8", "replace")
                was = book.frozen(address)
                book.unfreeze(address)
                if was and on_unfreeze is not None:
                    on_unfreeze(address.strip().lower())
            return
        status = decoder.decode(value)
        if status.frozen:
            if not book.frozen(status.list):
                log.warning("list %s is frozen (%s): its mail is held in Postfix's hold queue", status.list,
                            status.reason or "no reason given")
            book.freeze(status.list, status.until)
        elif book.frozen(status.list) or status.list.strip().lower() in book._frozen:
            book.unfreeze(status.list)
            log.warning("list %s is unfrozen: its mail flows again", status.list)
            if on_unfreeze is not None:
                on_unfreeze(status.list.strip().lower())

    return apply


class ThreadWatch(msgspec.Struct, kw_only=True):
    """A record of ``stormguard.thread-watch`` (the worker's :func:`~stream_jobs.worker.app.thread_watch_record`)."""

    list: str
    root: str
    ids: List[str]  # typing's: the field ``list`` hides the builtin in this class's namespace
    until: Optional[float] = None
    since: Optional[float] = None
    storm: bool = False
    reason: Optional[str] = None


def thread_watch_applier(book: HoldBook):
    from detectors.policy import ThreadHold

    decoder = msgspec.json.Decoder(ThreadWatch)

    def apply(key: Optional[bytes], value: Optional[bytes]) -> None:
        if value is None:
            if key:
                address, _, root = key.decode("utf-8", "replace").partition(" ")
                book.end_thread(address, root)
            return
        watch = decoder.decode(value)
        if watch.until is not None and watch.until <= time.time():
            return  # an anomalous post's hold that has ended (the topic keeps every one)
        book.hold_thread(watch.list, ThreadHold(root=watch.root, ids=watch.ids, until=watch.until))
        if watch.until is not None:
            log.warning("holding replies into thread %s of %s until %s (%s)", watch.root, watch.list,
                        time.strftime("%H:%M:%S", time.localtime(watch.until)), watch.reason or "")

    return apply


class EventOutbox:
    """Events handed to a producer thread: a broker that is slow or gone never blocks the milter's loop.

    Bounded: when full, new events are dropped and counted (never the mail).
    """

    def __init__(self, producer, topic: str, key: Callable[[bytes], Optional[bytes]], max_events: int = 100_000):
        import queue
        import threading

        self.producer, self.topic, self.key = producer, topic, key
        self.queue: "queue.Queue[Optional[bytes]]" = queue.Queue(max_events)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="milter-events", daemon=True)
        self._thread.start()

    def put(self, raw: bytes) -> None:
        import queue

        try:
            self.queue.put_nowait(raw)
        except queue.Full:
            self.dropped += 1
            warn("milter-outbox", "the event outbox is full (broker down?): %d event(s) dropped", self.dropped)

    def _run(self) -> None:
        while True:
            raw = self.queue.get()
            if raw is None:
                return
            try:
                self.producer.send(self.topic, value=raw, key=self.key(raw))
            except Exception as exc:  # noqa: BLE001 - the mail went on; the event is lost, said once in a while
                self.dropped += 1
                warn("milter-produce", "could not produce an event (%s: %s)", type(exc).__name__, exc)

    def close(self, timeout: float = 5.0) -> None:
        self.queue.put(None)
        self._thread.join(timeout)


# -- the command line ---------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "milter", help="Postfix milter: events in, and storm threads and frozen lists held (see docs/postfix.md)",
        description="A Postfix milter (smtpd_milters). Produces every message's event to mail.events and "
                    "quarantines (Postfix hold queue) replies into threads the worker holds and mail to frozen "
                    "lists. Fails open.")
    p.add_argument("--listen", default="inet:127.0.0.1:8899",
                   help="inet:HOST:PORT or unix:/path, as in smtpd_milters (default inet:127.0.0.1:8899)")
    p.add_argument("--broker", help="kafka://HOST:PORT (default $STORMGUARD_BROKER or kafka://127.0.0.1:9092)")
    p.add_argument("--lists", action="append", default=[], metavar="FILE",
                   help="a Postfix virtual(5) alias table: lists and member counts (repeatable), as for ingest")
    p.add_argument("--list", action="append", default=[], metavar="ADDRESS=MEMBERS",
                   help="a list and its member count, for lists kept elsewhere (repeatable)")
    p.add_argument("--min-members", type=int, default=2, help="an alias is a list from this many addresses (2)")
    p.add_argument("--no-events", action="store_true",
                   help="do not produce events (another source, such as ingest postfix-log, does)")
    p.add_argument("--no-thread-holds", action="store_true",
                   help="hold mail to frozen lists only, as the policy server does")
    p.add_argument("--state-dir", default=".stormguard/milter",
                   help="where the journal of held messages is kept (default .stormguard/milter)")
    p.add_argument("--postfix-config", metavar="DIR",
                   help="Postfix config directory for postqueue/postsuper -c (default: Postfix's own)")
    p.add_argument("--admin-listen", metavar="HOST:PORT",
                   help="serve /healthz, GET /api/holds and POST /api/holds/release|discard here "
                        "(writes need STORMGUARD_ADMIN_TOKEN)")
    p.add_argument("--release-storm-thread", action="store_true",
                   help="when a list unfreezes, release its storm thread's held replies too "
                        "(default: they stay held for a moderator; $STORMGUARD_MILTER_RELEASE_STORM_THREAD)")
    p.add_argument("--pre-send-hold", action="store_true",
                   help="hold a first post to a list of --pre-send-floor members or more when the worker finds it "
                        "anomalous (unprecedented reach), before it is expanded; off by default")
    p.add_argument("--pre-send-floor", type=int, default=20_000, metavar="MEMBERS",
                   help="with --pre-send-hold: lists this big or bigger (default 20000)")
    p.add_argument("--pre-send-wait", type=float, default=2.0, metavar="SECONDS",
                   help="with --pre-send-hold: longest wait for the worker's decision; then deliver (default 2)")
    p.add_argument("--startup-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="wait this long for the list state and held threads before listening (default 10)")
    p.set_defaults(func=_milter)


def _milter(args) -> int:
    from stream_jobs.postfix.lists import ListMapError, load_list_files
    from stream_jobs.settings import SettingsError

    try:
        parse_listen(args.listen)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    try:
        lists = load_list_files(args.lists, min_members=args.min_members)
    except ListMapError as exc:
        raise SettingsError(str(exc)) from None
    for item in args.list:
        address, sep, members = item.partition("=")
        if not sep or not members.strip().isdigit():
            raise SettingsError(f"--list {item!r}: expected ADDRESS=MEMBERS")
        lists[address.strip().lower()] = int(members)
    import os

    env_release = (os.environ.get("STORMGUARD_MILTER_RELEASE_STORM_THREAD") or "").strip().lower()
    if env_release and env_release not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise SettingsError(f"STORMGUARD_MILTER_RELEASE_STORM_THREAD={env_release!r} is not a boolean (true/false)")
    args.release_storm_thread = args.release_storm_thread or env_release in ("1", "true", "yes", "on")
    from stream_jobs.kafka.replay import ReplayError

    try:
        return asyncio.run(_serve(args, lists))
    except ReplayError as exc:  # no broker at start: Postfix accepts without us meanwhile
        print(f"stormguard: milter: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"stormguard: milter: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1


async def _serve(args, lists: dict[str, int]) -> int:
    import signal

    from stream_jobs.kafka.replay import make_producer, routing_key
    from stream_jobs.postfix.held import HeldMail, Postfix, serve_admin, sweep_forever
    from stream_jobs.postfix.list_state import KafkaStateFeed
    from stream_jobs.settings import ACTIONS_TOPIC, EVENTS_TOPIC, LIST_STATE_TOPIC, THREAD_WATCH_TOPIC

    loop = asyncio.get_running_loop()
    book = HoldBook()
    producer = make_producer(args.broker, max_block_ms=2000)
    held = HeldMail(args.state_dir, Postfix(args.postfix_config), book, producer=producer,
                    actions_topic=ACTIONS_TOPIC, release_storm_thread=args.release_storm_thread)

    started = False

    def unfrozen(address: str) -> None:
        # while the topics are first read, an old unfreeze is history: reconcile() looks at the end state
        if started:
            loop.create_task(held.after_unfreeze(address))

    lists_in = _TopicIntoBook(loop, list_state_applier(book, unfrozen), book.frozen_lists)
    threads_in = _TopicIntoBook(loop, thread_watch_applier(book), lambda: book.threads())
    # A hold must bite within about 100 ms of the worker's decision: a short fetch long-poll bounds the wait
    # on a broker that answers only when the long-poll ends (the embedded one); a real Kafka answers at once.
    feeds = [KafkaStateFeed(lists_in, args.broker, LIST_STATE_TOPIC, poll_ms=100, fetch_max_wait_ms=50).start(),
             KafkaStateFeed(threads_in, args.broker, THREAD_WATCH_TOPIC, poll_ms=100, fetch_max_wait_ms=50).start()]
    for source in (lists_in, threads_in):
        if not await loop.run_in_executor(None, source.ready.wait, args.startup_timeout):
            log.warning("state not loaded after %.0f s; listening anyway (fail open until it is)",
                        args.startup_timeout)
    started = True
    loop.create_task(held.reconcile())
    decider = MilterDecider(book, lists, hold_threads=not args.no_thread_holds)
    outbox = EventOutbox(producer, EVENTS_TOPIC, routing_key)

    def emit(event: MailEvent) -> None:
        outbox.put(encode_event(event))
        decider.counts["events"] += 1

    def after(seen: MessageSeen, event: Optional[MailEvent], hold: Optional[Hold]) -> None:
        if event is not None and not args.no_events and not seen.produced:
            outbox.put(encode_event(event))
            decider.counts["events"] += 1
        if hold is not None:
            held.record(seen, event, hold)
            log.info("held %s from=<%s> (%s)", seen.queue_id, seen.sender, hold_reason(hold))

    presend = PreSendHold(book, emit, args.pre_send_floor, args.pre_send_wait) \
        if args.pre_send_hold and not args.no_events else None
    server = MilterServer(decider, after, presend=presend)
    sweeper = asyncio.ensure_future(sweep_forever(held))
    admin = None
    try:
        await server.start(args.listen)
        if args.admin_listen:
            admin = await serve_admin(args.admin_listen, held, decider, server)
        print(f"stormguard: milter listening on {args.listen} ({len(lists)} lists known; state from "
              f"{LIST_STATE_TOPIC} and {THREAD_WATCH_TOPIC}"
              + (f"; admin API on {args.admin_listen}" if args.admin_listen else "") + ")",
              file=sys.stderr, flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        sweeper.cancel()
        if server.server is not None:
            server.server.close()
        if admin is not None:
            await admin.cleanup()
        for feed in feeds:
            await loop.run_in_executor(None, feed.stop)
        await loop.run_in_executor(None, outbox.close)
        await loop.run_in_executor(None, lambda: producer.close(timeout=5))
        log.warning("milter stopped: %s", decider.counts)
    return 0
