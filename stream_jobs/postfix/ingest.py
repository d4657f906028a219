"""Contract events from a Postfix mail log (``stormguard ingest postfix-log``).

Postfix logs one message over several lines that share its queue id::

    postfix/smtpd[..]:   4A1B2C3D4E: client=localhost[127.0.0.1]
    postfix/cleanup[..]: 4A1B2C3D4E: info: header Subject: RE: Test from ...; from=<b@x> to=<..> proto=ESMTP helo=<..>
    postfix/cleanup[..]: 4A1B2C3D4E: message-id=<r1@x>
    postfix/cleanup[..]: 4A1B2C3D4E: info: header In-Reply-To: <root@x> from ...
    postfix/qmgr[..]:    4A1B2C3D4E: from=<b@x>, size=506, nrcpt=601 (queue active)
    postfix/discard[..]: 4A1B2C3D4E: to=<m0@x>, orig_to=<all@lists.x>, relay=none, ..., status=sent (..)
    postfix/qmgr[..]:    4A1B2C3D4E: removed

:class:`PostfixLogParser` joins them and turns each message into one
:class:`~detectors.events.MailEvent`. It is pure: lines in, events out, time
taken from the log lines themselves (plus an injectable clock, used only to
guess the year of classic syslog stamps).

When is a message's event emitted? ``nrcpt`` (logged by qmgr) counts the
recipients *after* virtual alias expansion, and delivery lines name the
original recipient in ``orig_to``. Each delivery line accounts for its
recipient; the first delivery to a known list (from the list map) accounts for
all of that list's members at once. The event goes out as soon as every one of
``nrcpt`` recipients is accounted for -- for a post to an 840,000-member list
that is its *first* delivery line, not the last one hours later -- or
``emit_after`` seconds (log time) after the message entered the active queue,
or when qmgr logs ``removed``, whichever comes first.

Messages Postfix put on hold (for instance by ``stormguard policy``) produce
no event: they were not delivered. Messages whose cleanup line was not seen
(already queued when the log was opened) produce none either, so a restart
does not produce duplicates of long-deferred mail.
"""

from __future__ import annotations

import argparse
import calendar
import datetime as _dt
import logging
import os
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from typing import Callable, Iterable, Iterator, Mapping, Optional, TextIO

from detectors.events import MailEvent, encode_event
from stream_jobs.postfix.lists import ListMapError, load_list_files
from stream_jobs.settings import EVENTS_TOPIC

log = logging.getLogger("stormguard.postfix_ingest")

#: Envelope sender Stormguard reports for the null sender ``<>`` (bounces, auto-replies).
NULL_SENDER = "MAILER-DAEMON"

_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}

# "Nov 27 18:44:17 host prog[pid]: QID: rest" or "2024-11-27T18:44:17.123+00:00 host prog[pid]: QID: rest".
_LINE = re.compile(
    r"^(?:(?P<iso>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?)"
    r"|(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d)(?:\.\d+)?)"
    r" +(?P<host>\S+) +(?P<prog>[^\s\[:]+)(?:\[(?P<pid>\d+)\])?: +(?P<qid>[0-9A-Za-z]{5,20}): (?P<rest>.*)$")
_QMGR = re.compile(r"^from=<(?P<sender>.*?)>, size=(?P<size>\d+), nrcpt=(?P<nrcpt>\d+)")
_DELIVERY = re.compile(r"^to=<(?P<to>[^>]*)>, (?:orig_to=<(?P<orig>[^>]*)>, )?relay=.*?"
                       r"\bstatus=(?P<status>[a-z]+)")
# header_checks INFO/WARN: "info: header Subject: text from host[addr]; from=<s> to=<r> proto=.. helo=<..>"
# The greedy value backtracks to the *last* " from CLIENT; from=<", which is Postfix's own suffix.
_HEADER = re.compile(r"^(?:info|warning): header (?P<name>[!-9;-~]+):[ \t]*(?P<value>.*) from (?P<client>\S*);"
                     r" from=<(?P<sender>.*?)> to=<(?P<to>[^>]*)>")
_MSGID = re.compile(r"^message-id=(?P<mid>.*)$")
_ANGLE = re.compile(r"<[^<>\s]+>")
_NOT_QIDS = frozenset({"warning", "fatal", "panic", "error", "statistics", "connect",
                       "disconnect", "lost", "timeout", "Anonymous", "Trusted", "Untrusted", "Verified"})
# Daemons whose "QID: ..." lines carry nothing Stormguard needs; skipping them early is cheap.
_SKIP_PROGS = frozenset({"bounce", "postsuper", "postqueue", "anvil", "scache", "tlsmgr", "verify"})


@dataclass
class _Message:
    qid: str
    first_seen: float
    message_id: Optional[str] = None
    sender: Optional[str] = None
    nrcpt: Optional[int] = None
    active_at: Optional[float] = None
    subject: Optional[str] = None
    in_reply_to: Optional[str] = None
    header_to: Optional[str] = None
    held: bool = False
    content_seen: bool = False  # cleanup has logged about it: its RCPT phase is over
    emitted: bool = False
    accounted: int = 0
    #: original recipient → delivery lines seen for it
    recipients: dict[str, int] = field(default_factory=dict)
    seen: set = field(default_factory=set)


class PostfixLogParser:
    """Joins Postfix log lines by queue id into contract events.

    ``lists`` maps list address (lower case) to member count. ``emit_after``
    is how long (log seconds after ``queue active``) to wait for delivery
    lines before emitting what is known. ``clock`` is only used to give
    classic syslog stamps (which have no year) their year.

    >>> p = PostfixLogParser({"all@lists.example": 600})
    >>> lines = [
    ...   "Nov 27 18:44:17 mx postfix/cleanup[7673]: 5486420E202: message-id=<r1@example>",
    ...   "Nov 27 18:44:17 mx postfix/qmgr[7541]: 5486420E202: from=<bob@example>, size=506, nrcpt=600 (queue active)",
    ...   "Nov 27 18:44:17 mx postfix/discard[7681]: 5486420E202: to=<m0@example>, orig_to=<all@lists.example>,"
    ...   " relay=none, delay=0.12, delays=0.05/0.07/0/0, dsn=2.0.0, status=sent (discarded)",
    ... ]
    >>> [e for line in lines for e in p.feed(line)][0].lists
    {'all@lists.example': 600}
    """

    def __init__(self, lists: Optional[Mapping[str, int]] = None, emit_after: float = 5.0,
                 max_age: float = 86400.0, max_pending: int = 200_000, min_members: int = 2,
                 tz: Optional[_dt.tzinfo] = None, clock: Callable[[], float] = time.time):
        self.lists: dict[str, int] = {k.lower(): v for k, v in (lists or {}).items()}
        self.emit_after = emit_after
        self.max_age = max_age
        self.max_pending = max_pending
        self.min_members = min_members
        self.tz = tz
        self.clock = clock
        self.now = 0.0  # newest log time seen
        self._pending: "OrderedDict[str, _Message]" = OrderedDict()
        self._active: "OrderedDict[str, float]" = OrderedDict()  # qid → time its emit_after ends
        #: smtpd process → (queue id it has open or None after a NOQUEUE hold, log time)
        self._sessions: "OrderedDict[tuple, tuple[Optional[str], float]]" = OrderedDict()
        self.stats = {"lines": 0, "events": 0, "held": 0, "dropped": 0, "unparsed_time": 0}

    # -- input -----------------------------------------------------------------------------------

    def feed(self, line: str) -> list[MailEvent]:
        """Take one log line; return the events it completes (usually none)."""
        self.stats["lines"] += 1
        m = _LINE.match(line.rstrip("\r\n"))
        if m is None:
            return []
        qid = m["qid"]
        if qid in _NOT_QIDS:
            return []
        daemon = m["prog"].rsplit("/", 1)[-1]
        if daemon in _SKIP_PROGS:
            return []
        ts = self._time(m)
        if ts is None:
            self.stats["unparsed_time"] += 1
            return []
        if ts > self.now:
            self.now = ts
        session = (m["host"], m["prog"], m["pid"]) if daemon == "smtpd" else None
        if qid == "NOQUEUE":
            if session is not None and m["rest"].startswith("hold: "):
                self._smtpd_hold(session, ts)
            return []
        out = self._handle(qid, ts, m["rest"], daemon, session)
        out.extend(self.flush(self.now))
        return out

    def _smtpd_hold(self, session: tuple, ts: float) -> None:
        """``NOQUEUE: hold: RCPT ...`` (a HOLD at RCPT time): it names no queue id, but the
        message is the one this smtpd process has open, or opens next (its ``client=`` line)."""
        self.stats["held"] += 1
        current = self._sessions.get(session)
        if current is not None:
            msg = self._pending.get(current[0])
            if msg is not None and not msg.content_seen:
                msg.held = True  # a later RCPT of the message still in its envelope phase
                return
        self._sessions[session] = (None, ts)
        self._sessions.move_to_end(session)

    def _handle(self, qid: str, ts: float, rest: str, daemon: str = "", session: Optional[tuple] = None
                ) -> list[MailEvent]:
        msg = self._pending.get(qid)
        if rest.startswith("client=") or rest.startswith("uid="):
            if msg is None or msg.emitted:
                msg = self._start(qid, ts)
            if session is not None:
                mark = self._sessions.pop(session, None)
                if mark is not None and mark[0] is None and ts - mark[1] <= 60.0:
                    msg.held = True  # the HOLD logged just before this message had a queue id
                self._sessions[session] = (qid, ts)
                while len(self._sessions) > 10_000:
                    self._sessions.popitem(last=False)
            return []
        mm = _MSGID.match(rest)
        if mm:
            if msg is None:
                msg = self._start(qid, ts)
            msg.content_seen = True
            mid = mm["mid"].strip()
            msg.message_id = mid or None
            return []
        hm = _HEADER.match(rest)
        if hm:
            if msg is None:
                msg = self._start(qid, ts)
            msg.content_seen = True
            self._header(msg, hm)
            return []
        if msg is None:
            return []  # a message that entered the queue before we started reading
        if rest.startswith("hold: "):
            msg.held = True
            self.stats["held"] += 1
            return []
        if rest.startswith(("reject: ", "discard: ", "milter-reject: ", "milter-discard: ")):
            # cleanup (header/body checks, milters) or smtpd after DATA refused the whole message;
            # smtpd's "reject: RCPT from" refuses one recipient and the message goes on
            if daemon != "smtpd" or not rest.split(": ", 1)[1].startswith(("RCPT ", "MAIL ")):
                self._pending.pop(qid, None)
                self._active.pop(qid, None)
            return []
        qm = _QMGR.match(rest)
        if qm:
            if msg.emitted or msg.held:
                # re-entering the active queue (deferred mail) or released from hold: no second event
                return []
            msg.sender = qm["sender"]
            msg.nrcpt = int(qm["nrcpt"])
            if msg.active_at is None:
                msg.active_at = ts
                self._active[qid] = ts + self.emit_after
            return self._maybe_emit(msg)
        dm = _DELIVERY.match(rest)
        if dm:
            if msg.emitted or msg.held:
                return []
            self._delivery(msg, dm["to"].lower(), (dm["orig"] or dm["to"]).lower())
            return self._maybe_emit(msg)
        if rest == "removed":
            self._pending.pop(qid, None)
            self._active.pop(qid, None)
            if not msg.emitted and not msg.held and msg.nrcpt is not None:
                return self._emit(msg)
            return []
        return []

    def _start(self, qid: str, ts: float) -> _Message:
        msg = _Message(qid=qid, first_seen=ts)
        self._pending[qid] = msg
        self._pending.move_to_end(qid)
        self._active.pop(qid, None)
        while len(self._pending) > self.max_pending:
            old, _ = self._pending.popitem(last=False)
            self._active.pop(old, None)
            self.stats["dropped"] += 1
        return msg

    def _header(self, msg: _Message, hm: re.Match) -> None:
        name = hm["name"].lower()
        if msg.header_to is None and hm["to"]:
            msg.header_to = hm["to"].lower()
        if name == "subject":
            msg.subject = _decode_words(hm["value"])[:4096]
        elif name == "in-reply-to":
            ids = _ANGLE.findall(hm["value"])
            value = ids[0] if ids else hm["value"].strip()
            msg.in_reply_to = value[:998] or None

    def _delivery(self, msg: _Message, to: str, orig: str) -> None:
        key = (to, orig)
        if key in msg.seen:
            return  # a retry of a recipient already accounted for
        msg.seen.add(key)
        first = orig not in msg.recipients
        msg.recipients[orig] = msg.recipients.get(orig, 0) + 1
        if orig in self.lists:
            if first:
                msg.accounted += self.lists[orig]
        else:
            msg.accounted += 1

    # -- output ----------------------------------------------------------------------------------

    def _maybe_emit(self, msg: _Message) -> list[MailEvent]:
        if msg.nrcpt is not None and msg.recipients and msg.accounted >= msg.nrcpt:
            return self._emit(msg)
        return []

    def flush(self, now: Optional[float] = None) -> list[MailEvent]:
        """Emit messages whose wait ended by ``now`` (log time); ``None`` emits everything pending."""
        out: list[MailEvent] = []
        while self._active:
            qid, due = next(iter(self._active.items()))
            if now is not None and due > now:
                break
            self._active.popitem(last=False)
            msg = self._pending.get(qid)
            if msg is not None and not msg.emitted and not msg.held:
                out.extend(self._emit(msg))
        if now is not None:
            while self._pending:
                qid, msg = next(iter(self._pending.items()))
                if msg.first_seen + self.max_age > now:
                    break
                self._pending.popitem(last=False)
                self._active.pop(qid, None)
        return out

    def _emit(self, msg: _Message) -> list[MailEvent]:
        msg.emitted = True
        self._active.pop(msg.qid, None)
        recipients = list(msg.recipients)
        if not recipients and msg.header_to:
            recipients = [msg.header_to]
        if not recipients:
            log.debug("%s: no recipient known when its wait ended; no event", msg.qid)
            return []
        lists: dict[str, int] = {}
        for r in recipients:
            if r in self.lists:
                lists[r] = self.lists[r]
            elif msg.recipients.get(r, 0) >= max(self.min_members, 2):
                lists[r] = msg.recipients[r]  # an alias the map does not know: members seen so far
        delivered = msg.nrcpt if msg.nrcpt is not None else sum(msg.recipients.values()) or len(recipients)
        event = MailEvent(
            message_id=msg.message_id or f"<{msg.qid}@postfix>",
            timestamp=msg.first_seen,
            sender=msg.sender or NULL_SENDER,
            recipients=recipients,
            lists=lists,
            delivered_count=delivered,
            in_reply_to=msg.in_reply_to,
            subject=msg.subject,
        )
        self.stats["events"] += 1
        return [event]

    # -- time ------------------------------------------------------------------------------------

    def _time(self, m: re.Match) -> Optional[float]:
        if m["iso"]:
            try:
                dt = _dt.datetime.fromisoformat(m["iso"].replace(" ", "T"))
            except ValueError:
                return None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=self.tz) if self.tz else dt.astimezone()
            return dt.timestamp()
        month = _MONTHS.get(m["mon"])
        if month is None:
            return None
        hh, mi, ss = (int(x) for x in m["hms"].split(":"))
        ref = _dt.datetime.fromtimestamp(self.clock(), self.tz) if self.tz else \
            _dt.datetime.fromtimestamp(self.clock())
        year = ref.year
        # a December line read in January belongs to last year
        if month > ref.month + 1 or (month == 12 and ref.month == 1):
            year -= 1
        try:
            dt = _dt.datetime(year, month, int(m["day"]), hh, mi, ss, tzinfo=self.tz)
        except ValueError:
            return None
        if self.tz is None:
            return time.mktime(dt.timetuple())
        return dt.timestamp()


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words (``=?UTF-8?B?...?=``) decoded; the raw text if they are broken."""
    value = value.strip()
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # noqa: BLE001 - any malformed header is kept as logged
        return value


# -- the command line ---------------------------------------------------------------------------


def follow_lines(path: str, from_end: bool = False, poll: float = 0.2,
                 stop: Callable[[], bool] = lambda: False) -> Iterator[Optional[str]]:
    """Lines of a growing file, like ``tail -F``: survives rotation and truncation.

    Yields ``None`` whenever it waits for more, so the caller can flush timers.
    """
    fh = None
    ino = None
    first = True
    buf = ""
    while not stop():
        if fh is None:
            try:
                fh = open(path, "r", encoding="utf-8", errors="replace", newline="")
            except FileNotFoundError:
                yield None
                time.sleep(poll)
                continue
            ino = os.fstat(fh.fileno()).st_ino
            if first and from_end:
                fh.seek(0, os.SEEK_END)
            first = False
            buf = ""
        chunk = fh.read(65536)
        if chunk:
            buf += chunk
            *complete, buf = buf.split("\n")
            yield from complete
            continue
        # at EOF: rotated (new inode, or gone) or truncated (shorter than where we are)?
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is None or st.st_ino != ino or st.st_size < fh.tell():
            fh.close()
            fh = None
            if st is not None and st.st_ino == ino:
                log.warning("%s was truncated; reading it from the start", path)
            continue
        yield None
        time.sleep(poll)
    if fh is not None:
        fh.close()


def _ingest_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The ``ingest`` command's own sub-commands, shared with any other ingest module."""
    existing = sub.choices.get("ingest")
    if existing is not None:
        for action in existing._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
    p = sub.add_parser("ingest", help="turn a mail gateway's logs into contract events on mail.events")
    return p.add_subparsers(dest="source", metavar="SOURCE", required=True)


def register(sub: argparse._SubParsersAction) -> None:
    ingest = _ingest_subparsers(sub)
    p = ingest.add_parser(
        "postfix-log", help="join a Postfix maillog by queue id into events (see docs/postfix.md)",
        description="Read a Postfix mail log, join each message's cleanup, qmgr and delivery lines "
                    "by queue id, and produce one contract event per message to mail.events.")
    p.add_argument("file", help="the mail log (e.g. /var/log/mail.log), or - for stdin")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep reading as the file grows, across rotation (like tail -F)")
    p.add_argument("--from-end", action="store_true",
                   help="with --follow: skip what the file holds now, read only new lines")
    p.add_argument("--lists", action="append", default=[], metavar="FILE",
                   help="Postfix virtual(5) alias table; every address expanding to >= --min-members "
                        "final addresses is a list with that member count (repeatable; re-read on change)")
    p.add_argument("--list", action="append", default=[], metavar="ADDRESS=MEMBERS", dest="list_counts",
                   help="a list and its member count, for lists kept elsewhere (LDAP, Mailman); repeatable")
    p.add_argument("--min-members", type=int, default=2,
                   help="an alias is a list from this many final addresses (default 2)")
    p.add_argument("--emit-after", type=float, default=5.0, metavar="SECONDS",
                   help="emit a message's event at the latest this long after it entered the active "
                        "queue, even if not every recipient's delivery line was seen (default 5)")
    p.add_argument("--timezone", metavar="TZ",
                   help="IANA zone of classic syslog time stamps (default: this machine's local time)")
    p.add_argument("--broker", help="kafka://HOST:PORT (default $STORMGUARD_BROKER or kafka://127.0.0.1:9092)")
    p.add_argument("--topic", default=EVENTS_TOPIC, help=f"topic to produce to (default {EVENTS_TOPIC})")
    p.add_argument("--stdout", action="store_true",
                   help="write events as JSON lines to stdout instead of producing them (for `stormguard score`)")
    p.add_argument("--poll", type=float, default=0.2, metavar="SECONDS",
                   help="with --follow: how often to look for new lines (default 0.2)")
    p.set_defaults(func=_ingest_postfix_log)


def _parse_list_counts(items: list[str]) -> dict[str, int]:
    from stream_jobs.settings import SettingsError

    out = {}
    for item in items:
        addr, sep, count = item.rpartition("=")
        try:
            n = int(count)
        except ValueError:
            n = -1
        if not sep or not addr or n < 0:
            raise SettingsError(f"--list {item!r}: expected ADDRESS=MEMBERS, e.g. all@example.org=840000")
        out[addr.strip().lower()] = n
    return out


class _ListSource:
    """The list map, re-read when one of its files changes."""

    def __init__(self, paths: list[str], fixed: dict[str, int], min_members: int):
        self.paths, self.fixed, self.min_members = paths, fixed, min_members
        self.mtimes: dict[str, float] = {}
        self.checked = 0.0

    def _stamp(self) -> dict[str, float]:
        out = {}
        for p in self.paths:
            try:
                out[p] = os.stat(p).st_mtime
            except OSError:
                out[p] = -1.0
        return out

    def load(self) -> dict[str, int]:
        self.mtimes = self._stamp()
        counts = load_list_files(self.paths, self.min_members)
        counts.update(self.fixed)
        return counts

    def reload_if_changed(self, parser: PostfixLogParser, every: float = 5.0) -> None:
        now = time.monotonic()
        if not self.paths or now - self.checked < every:
            return
        self.checked = now
        if self._stamp() == self.mtimes:
            return
        try:
            parser.lists = self.load()
            log.warning("list map re-read: %d lists", len(parser.lists))
        except ListMapError as exc:
            log.warning("list map not re-read, keeping the old one: %s", exc)


def _ingest_postfix_log(args) -> int:
    from stream_jobs.settings import SettingsError

    tz = None
    if args.timezone:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            tz = ZoneInfo(args.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise SettingsError(f"--timezone {args.timezone!r} is not a known IANA zone") from None
    if args.emit_after < 0:
        raise SettingsError("--emit-after must be >= 0")
    if args.follow and args.file == "-":
        raise SettingsError("--follow needs a file, not stdin")
    source = _ListSource(args.lists, _parse_list_counts(args.list_counts), args.min_members)
    try:
        lists = source.load()
    except ListMapError as exc:
        print(f"stormguard: --lists: {exc}", file=sys.stderr)
        return 2
    parser = PostfixLogParser(lists, emit_after=args.emit_after, min_members=args.min_members, tz=tz)
    log.info("%d lists known from the list map", len(lists))

    if args.stdout:
        out = sys.stdout.buffer

        def send(event: MailEvent) -> None:
            out.write(encode_event(event) + b"\n")
            out.flush()

        close = lambda: None  # noqa: E731
    else:
        from stream_jobs.kafka.replay import Refusals, ReplayError, make_producer, routing_key

        try:
            producer = make_producer(args.broker)
        except ReplayError as exc:
            print(f"stormguard: {exc}", file=sys.stderr)
            return 1
        # a message the broker refuses (too big) is said on stderr and counted; the log goes on
        refusals = Refusals("stormguard ingest")

        def send(event: MailEvent) -> None:
            raw = encode_event(event)
            refusals.send(producer, args.topic, raw, routing_key(raw), f"message {event.message_id}")

        def close() -> None:
            producer.flush()
            producer.close()

    stopping = []
    if args.follow:
        import signal

        signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
        lines: Iterable[Optional[str]] = follow_lines(args.file, args.from_end, args.poll, stop=lambda: bool(stopping))
    else:
        fh: TextIO = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8", errors="replace")
        lines = fh
    last_flush = time.monotonic()
    try:
        for line in lines:
            if line is not None:
                for event in parser.feed(line):
                    send(event)
            now = time.monotonic()
            if line is None or now - last_flush > 0.5:
                # an idle log must not hold a message back: its wait also ends by the wall clock
                for event in parser.flush(max(parser.now, time.time() - 1.0) if line is None else parser.now):
                    send(event)
                if line is None and not args.stdout:
                    producer.flush()
                source.reload_if_changed(parser)
                last_flush = now
        for event in parser.flush(None):
            send(event)
    finally:
        close()
    log.info("postfix-log: %s", parser.stats)
    if not args.stdout and refusals.count:
        print(f"stormguard ingest: {refusals.count} message(s) refused by the broker and not produced "
              f"(the first: {refusals.first})", file=sys.stderr)
        return 1
    return 0
