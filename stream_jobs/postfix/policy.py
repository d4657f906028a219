"""Postfix SMTP access policy server (``stormguard policy``): a freeze bites at the SMTP door.

The protocol (Postfix SMTPD_POLICY_README): Postfix connects, sends a request
of ``name=value`` lines ended by an empty line, and reads one
``action=...`` line ended by an empty line; the connection is reused for
further requests. This server answers

* ``action=HOLD <text>`` (or ``action=DEFER <text>`` with ``--action defer``)
  when the request's recipient is a frozen list, and
* ``action=DUNNO`` (no opinion: Postfix goes on with its other restrictions)
  for everything else, and whenever something goes wrong on our side
  (fail open, with a logged warning): a broken Stormguard must never stop mail.

Where to call it: ``smtpd_recipient_restrictions`` (RCPT stage) is the
recommended place. There the request names the recipient as the client
submitted it, i.e. the *list* address before virtual alias expansion, so a
lookup is one dictionary probe. ``HOLD`` at that stage puts the whole message
on hold (Postfix applies HOLD to all recipients of the message); ``DEFER``
answers 4xx for the list recipient only, and the other recipients of the same
message are accepted. At ``smtpd_end_of_data_restrictions`` Postfix sends the
recipient only when the message has exactly one, so this server remembers, per
SMTP transaction (the ``instance`` attribute), which frozen lists it saw at RCPT
time and answers for them there too; that stage is only useful to apply HOLD
once per message, or where RCPT-stage policy checks are not possible.

List state comes from the compacted ``stormguard.list-state`` topic (read from
the beginning with a kafka-python consumer on manually assigned partitions, then
kept up to date in a background thread), or from the worker's HTTP API
(``--worker-url``), cached per address. Either way a request is answered from
memory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from typing import Callable, Optional

import msgspec

from detectors.engine import ListStatus
from stream_jobs.settings import LIST_STATE_TOPIC

log = logging.getLogger("stormguard.postfix_policy")

DEFAULT_HOLD_TEXT = "Stormguard: list {list} is frozen (reply-all storm)"
DEFAULT_DEFER_TEXT = "4.2.1 The list {list} is paused by Stormguard (reply-all storm); please try again later"
#: Attributes in one request, and bytes in one line, beyond which the client is not Postfix.
MAX_ATTRIBUTES = 200
MAX_LINE = 64 * 1024

_status_decoder = msgspec.json.Decoder(ListStatus)


class ProtocolError(ValueError):
    pass


class _Warn:
    """Warnings at most once per ``every`` seconds per kind, with a count of those suppressed."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self.last: dict[str, tuple[float, int]] = {}

    def __call__(self, kind: str, msg: str, *args) -> None:
        now = time.monotonic()
        last, suppressed = self.last.get(kind, (-1e9, 0))
        if now - last < self.every:
            self.last[kind] = (last, suppressed + 1)
            return
        self.last[kind] = (now, 0)
        if suppressed:
            msg += f" ({suppressed} more like this not logged)"
        log.warning(msg, *args)


warn = _Warn()


# -- list state ---------------------------------------------------------------------------------


class ListStates:
    """Frozen lists by lower-cased address, as the worker last published them.

    Written by one feeder (a thread or a task), read by the server; plain dict
    operations are atomic in CPython, so no lock is needed for a lookup.
    """

    def __init__(self, honour_until: bool = True, clock: Callable[[], float] = time.time):
        self.honour_until = honour_until
        self.clock = clock
        self._frozen: dict[str, ListStatus] = {}
        self.ready = threading.Event()
        self.records = 0

    def apply(self, key: Optional[bytes], value: Optional[bytes]) -> None:
        """One record of the list-state topic; a null value (tombstone) forgets its key."""
        self.records += 1
        if value is None:
            if key:
                self._frozen.pop(key.decode("utf-8", "replace").strip().lower(), None)
            return
        try:
            status = _status_decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            warn("bad-state", "ignoring a list-state record that is not a ListStatus (%s): %r", exc, value[:200])
            return
        self.set(status)

    def set(self, status: ListStatus) -> None:
        address = status.list.strip().lower()
        if status.frozen:
            if address not in self._frozen:
                log.warning("list %s is frozen (%s): mail to it is now stopped at the SMTP door",
                            address, status.reason or "no reason given")
            self._frozen[address] = status
        elif self._frozen.pop(address, None) is not None:
            log.warning("list %s is unfrozen: mail to it flows again", address)

    def frozen(self, address: str) -> Optional[ListStatus]:
        status = self._frozen.get(address)
        if status is None:
            return None
        if self.honour_until and status.until is not None and status.until <= self.clock():
            return None
        return status

    def frozen_lists(self) -> list[str]:
        return sorted(a for a in list(self._frozen) if self.frozen(a) is not None)


class KafkaStateFeed:
    """Reads ``stormguard.list-state`` from the beginning into :class:`ListStates`, then follows it.

    kafka-python consumer groups get no partitions on the embedded broker, and a
    policy server wants every record anyway, so partitions are assigned by hand
    and nothing is committed.
    """

    def __init__(self, states: ListStates, broker: Optional[str], topic: str = LIST_STATE_TOPIC,
                 poll_ms: int = 200):
        self.states, self.broker, self.topic, self.poll_ms = states, broker, topic, poll_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="list-state-feed", daemon=True)

    def start(self) -> "KafkaStateFeed":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._consume()
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - keep serving the last known state
                warn("feed", "list-state feed from %s failed (%s: %s); serving the last known state, retrying",
                     self.broker, type(exc).__name__, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _consume(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from stream_jobs.kafka.replay import bootstrap_servers, kafka_security

        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers(self.broker), group_id=None,
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 client_id="stormguard-policy", allow_auto_create_topics=False,
                                 bootstrap_timeout_ms=5000, **kafka_security())
        try:
            partitions = None
            while not self._stop.is_set():
                partitions = consumer.partitions_for_topic(self.topic)
                if partitions:
                    break
                if not self.states.ready.is_set():
                    # no topic yet: the worker never froze anything, which is a known, empty state
                    log.info("topic %s does not exist yet: no list is frozen", self.topic)
                    self.states.ready.set()
                self._stop.wait(1.0)
            if not partitions:
                return
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps)
            caught_up = all(end[tp] == 0 for tp in tps)
            while not self._stop.is_set():
                batches = consumer.poll(timeout_ms=self.poll_ms)
                for records in batches.values():
                    for rec in records:
                        self.states.apply(rec.key, rec.value)
                if not caught_up and all(consumer.position(tp) >= end[tp] for tp in tps):
                    caught_up = True
                if caught_up and not self.states.ready.is_set():
                    log.info("list state loaded from %s: %d records, %d lists frozen", self.topic,
                             self.states.records, len(self.states.frozen_lists()))
                    self.states.ready.set()
        finally:
            consumer.close()


class WorkerApiSource:
    """List state from the worker's HTTP API.

    Normally the whole set of frozen lists is polled from ``GET /api/lists``
    every ``ttl`` seconds in the background, and every answer comes from memory.
    While that poll is failing (or on a worker without that endpoint), each
    address is asked with ``GET /api/lists/{address}`` and cached: a cached
    answer younger than ``ttl`` is used as it is; an older one is used while a
    refresh runs in the background; only an address never asked before waits
    for the worker (at most ``timeout``). Errors fail open.
    """

    def __init__(self, url: str, ttl: float = 2.0, timeout: float = 0.25, max_entries: int = 100_000,
                 honour_until: bool = True):
        self.url = url.rstrip("/")
        self.ttl, self.timeout, self.max_entries = ttl, timeout, max_entries
        self.honour_until = honour_until
        self._cache: "OrderedDict[str, tuple[float, bool]]" = OrderedDict()
        self._inflight: dict[str, asyncio.Task] = {}
        self._session = None
        self._all: Optional[frozenset[str]] = None  # every frozen list, from the last good poll
        self._all_at = -1e9
        self._poller: Optional[asyncio.Task] = None

    def _client(self):
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
        return self._session

    async def poll_once(self) -> bool:
        """One ``GET /api/lists``; True when it gave the full set of frozen lists."""
        try:
            async with self._client().get(f"{self.url}/api/lists") as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
                body = await r.json(content_type=None)
            now = time.time()
            frozen = set()
            for status in body["frozen"]:
                until = status.get("until")
                if self.honour_until and isinstance(until, (int, float)) and until <= now:
                    continue
                if status.get("frozen", True):
                    frozen.add(str(status["list"]).strip().lower())
        except Exception as exc:  # noqa: BLE001 - fall back to per-address lookups
            warn("worker-poll", "polling %s/api/lists failed (%s: %s); asking per address meanwhile",
                 self.url, type(exc).__name__, exc)
            return False
        if self._all is not None:
            for gone in self._all - frozen:
                log.warning("list %s is unfrozen: mail to it flows again", gone)
        for new in frozen - (self._all or frozenset()):
            log.warning("list %s is frozen: mail to it is now stopped at the SMTP door", new)
        self._all, self._all_at = frozenset(frozen), time.monotonic()
        return True

    async def _poll_forever(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.ttl)

    def start(self) -> "WorkerApiSource":
        """Start the background poll (needs a running event loop)."""
        if self._poller is None:
            self._poller = asyncio.ensure_future(self._poll_forever())
        return self

    async def frozen(self, address: str) -> bool:
        now = time.monotonic()
        if self._all is not None and now - self._all_at <= max(3 * self.ttl, 5.0):
            return address in self._all
        hit = self._cache.get(address)
        if hit is not None:
            if now - hit[0] > self.ttl:
                self._refresh(address)
            return hit[1]
        try:
            return await asyncio.wait_for(asyncio.shield(self._refresh(address)), self.timeout)
        except asyncio.TimeoutError:
            warn("worker-slow", "worker API did not answer for %s within %.0f ms; answering DUNNO",
                 address, self.timeout * 1000)
            return False

    def _refresh(self, address: str) -> asyncio.Task:
        task = self._inflight.get(address)
        if task is None:
            task = asyncio.ensure_future(self._fetch(address))
            self._inflight[address] = task
            task.add_done_callback(lambda t: self._inflight.pop(address, None))
        return task

    async def _fetch(self, address: str) -> bool:
        try:
            async with self._client().get(f"{self.url}/api/lists/{urllib.parse.quote(address, safe='@')}") as r:
                if r.status == 404:
                    frozen = False
                elif r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
                else:
                    body = await r.json(content_type=None)
                    frozen = bool(body.get("frozen"))
                    until = body.get("until")
                    if frozen and self.honour_until and isinstance(until, (int, float)) and until <= time.time():
                        frozen = False
        except Exception as exc:  # noqa: BLE001 - fail open, keep the last answer if any
            warn("worker-error", "worker API %s failed for %s (%s: %s); answering from cache or DUNNO",
                 self.url, address, type(exc).__name__, exc)
            hit = self._cache.get(address)
            return hit[1] if hit else False
        self._cache[address] = (time.monotonic(), frozen)
        self._cache.move_to_end(address)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return frozen

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        if self._session is not None:
            await self._session.close()


# -- decisions ----------------------------------------------------------------------------------


class PolicyDecider:
    """The decision for one request, from its attributes. Pure apart from the state it reads.

    >>> states = ListStates()
    >>> states.set(ListStatus(list="all@nhs.net", frozen=True, since=0.0, reason="storm"))
    >>> d = PolicyDecider(states.frozen)
    >>> d.decide({"request": "smtpd_access_policy", "protocol_state": "RCPT", "recipient": "All@NHS.net"})
    'HOLD Stormguard: list all@nhs.net is frozen (reply-all storm)'
    >>> d.decide({"request": "smtpd_access_policy", "protocol_state": "RCPT", "recipient": "gp@nhs.net"})
    'DUNNO'
    """

    def __init__(self, lookup: Callable[[str], object], action: str = "hold", hold_text: str = DEFAULT_HOLD_TEXT,
                 defer_text: str = DEFAULT_DEFER_TEXT, recipient_delimiter: str = "",
                 max_transactions: int = 10_000):
        if action not in ("hold", "defer"):
            raise ValueError("action must be hold or defer")
        self.lookup = lookup
        self.action = action
        self.hold_text = hold_text
        self.defer_text = defer_text
        self.recipient_delimiter = recipient_delimiter
        self.max_transactions = max_transactions
        #: SMTP transaction (``instance``) → frozen list seen at RCPT time, for END-OF-MESSAGE requests
        self._transactions: "OrderedDict[str, str]" = OrderedDict()
        self.counts = {"requests": 0, "hold": 0, "defer": 0, "dunno": 0, "errors": 0}

    def candidates(self, recipient: str) -> list[str]:
        """The recipient, and without its address extension (``all+x@d`` → ``all@d``)."""
        address = recipient.strip().strip("<>").lower()
        if not address:
            return []
        out = [address]
        if self.recipient_delimiter and "@" in address:
            local, _, domain = address.rpartition("@")
            for ch in self.recipient_delimiter:
                if ch in local:
                    out.append(local.split(ch, 1)[0] + "@" + domain)
                    break
        return out

    def frozen_list(self, attrs: dict[str, str], lookup: Optional[Callable[[str], object]] = None) -> Optional[str]:
        lookup = lookup or self.lookup
        state = attrs.get("protocol_state", "").upper()
        instance = attrs.get("instance", "")
        for address in self.candidates(attrs.get("recipient", "")):
            if lookup(address):
                if instance and state == "RCPT":
                    self._transactions[instance] = address
                    self._transactions.move_to_end(instance)
                    while len(self._transactions) > self.max_transactions:
                        self._transactions.popitem(last=False)
                return address
        if state in ("DATA", "END-OF-MESSAGE", "BDAT") and instance:
            remembered = self._transactions.get(instance)
            if remembered and lookup(remembered):
                return remembered
        return None

    def verdict(self, frozen: Optional[str]) -> str:
        self.counts["requests"] += 1
        if frozen is None:
            self.counts["dunno"] += 1
            return "DUNNO"
        self.counts[self.action] += 1
        if self.action == "hold":
            return "HOLD " + _one_line(self.hold_text.replace("{list}", frozen))
        return "DEFER " + _one_line(self.defer_text.replace("{list}", frozen))

    def decide(self, attrs: dict[str, str]) -> str:
        if attrs.get("request") != "smtpd_access_policy":
            return self.verdict(None)
        return self.verdict(self.frozen_list(attrs))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def parse_request(lines: list[bytes]) -> dict[str, str]:
    """``name=value`` lines (without the blank terminator) as a dict; a repeated name keeps its last value."""
    if len(lines) > MAX_ATTRIBUTES:
        raise ProtocolError(f"request has more than {MAX_ATTRIBUTES} attributes")
    attrs: dict[str, str] = {}
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        name, sep, value = line.partition("=")
        if not sep or not name:
            raise ProtocolError(f"not a name=value line: {line[:80]!r}")
        attrs[name] = value
    return attrs


def format_reply(action: str) -> bytes:
    return f"action={action}\n\n".encode("utf-8", "replace")


# -- the server ---------------------------------------------------------------------------------


class PolicyServer:
    """asyncio server speaking the Postfix policy protocol; one decider, any number of connections."""

    def __init__(self, decider: PolicyDecider, worker: Optional[WorkerApiSource] = None):
        self.decider = decider
        self.worker = worker
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self, listen: str) -> asyncio.AbstractServer:
        if listen.startswith("unix:"):
            self.server = await asyncio.start_unix_server(self.handle, path=listen[5:], limit=MAX_LINE)
        else:
            host, port = split_listen(listen)
            self.server = await asyncio.start_server(self.handle, host, port, limit=MAX_LINE)
        return self.server

    async def answer(self, attrs: dict[str, str]) -> str:
        try:
            if self.worker is not None and attrs.get("request") == "smtpd_access_policy":
                found: dict[str, bool] = {}
                for address in self.decider.candidates(attrs.get("recipient", "")):
                    found[address] = await self.worker.frozen(address)
                instance = attrs.get("instance", "")
                remembered = self.decider._transactions.get(instance) if instance else None
                if remembered and remembered not in found:
                    found[remembered] = await self.worker.frozen(remembered)
                action = self.decider.verdict(self.decider.frozen_list(attrs, found.get))
            else:
                action = self.decider.decide(attrs)
        except Exception as exc:  # noqa: BLE001 - fail open
            self.decider.counts["errors"] += 1
            warn("decide", "policy decision failed (%s: %s); answering DUNNO", type(exc).__name__, exc)
            return "DUNNO"
        if action != "DUNNO":
            log.info("%s: from=<%s> to=<%s> client=%s instance=%s", action.split(" ", 1)[0],
                     attrs.get("sender", ""), attrs.get("recipient", ""), attrs.get("client_address", ""),
                     attrs.get("instance", ""))
        return action

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                lines: list[bytes] = []
                while True:
                    line = await reader.readline()
                    if not line:
                        return  # Postfix closed the connection (idle or max_ttl)
                    if line in (b"\n", b"\r\n"):
                        break
                    lines.append(line)
                    if len(lines) > MAX_ATTRIBUTES:
                        raise ProtocolError(f"more than {MAX_ATTRIBUTES} attributes")
                try:
                    attrs = parse_request(lines)
                except ProtocolError as exc:
                    warn("protocol", "malformed policy request (%s); answering DUNNO", exc)
                    action = "DUNNO"
                else:
                    action = await self.answer(attrs)
                writer.write(format_reply(action))
                await writer.drain()
        except (ProtocolError, ValueError, asyncio.LimitOverrunError) as exc:
            warn("protocol", "closing a policy connection that broke the protocol: %s", exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:  # noqa: BLE001
                pass


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:10040")
    return host.strip("[]") or "127.0.0.1", int(port)


# -- the command line ---------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "policy", help="Postfix policy server: HOLD (or DEFER) mail to frozen lists (see docs/postfix.md)",
        description="A Postfix SMTP access policy delegation server (check_policy_service). Answers HOLD "
                    "for a recipient that is a frozen list, DUNNO otherwise, and DUNNO on its own errors.")
    p.add_argument("--listen", default="127.0.0.1:10040",
                   help="HOST:PORT (or unix:/path) to listen on (default 127.0.0.1:10040)")
    p.add_argument("--broker", help="kafka://HOST:PORT to read list state from "
                                    "(default $STORMGUARD_BROKER or kafka://127.0.0.1:9092)")
    p.add_argument("--topic", default=LIST_STATE_TOPIC, help=f"list-state topic (default {LIST_STATE_TOPIC})")
    p.add_argument("--worker-url", metavar="URL",
                   help="read list state from the worker's HTTP API (e.g. http://127.0.0.1:6066) "
                        "instead of the topic")
    p.add_argument("--action", choices=("hold", "defer"), default="hold",
                   help="hold: the message goes to Postfix's hold queue (default); "
                        "defer: the list recipient gets a 4xx and the client retries later")
    p.add_argument("--hold-text", default=DEFAULT_HOLD_TEXT,
                   help="text Postfix logs with HOLD; {list} is the list (default: %(default)r)")
    p.add_argument("--defer-text", default=DEFAULT_DEFER_TEXT,
                   help="4xx text with DEFER; may start with an enhanced status code (default: %(default)r)")
    p.add_argument("--recipient-delimiter", default="", metavar="CHARS",
                   help="Postfix's recipient_delimiter: also match list+ext@domain as list@domain")
    p.add_argument("--ignore-until", action="store_true",
                   help="keep enforcing a freeze past its 'until' time, until the worker unfreezes it")
    p.add_argument("--startup-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="wait this long for the list state before listening; then listen anyway "
                        "(answering DUNNO for lists not yet known) (default 10)")
    p.add_argument("--cache-ttl", type=float, default=2.0, metavar="SECONDS",
                   help="with --worker-url: how long an answer is fresh (default 2)")
    p.add_argument("--worker-timeout", type=float, default=0.25, metavar="SECONDS",
                   help="with --worker-url: longest wait for a first answer about an address (default 0.25)")
    p.set_defaults(func=_policy)


def _policy(args) -> int:
    from stream_jobs.settings import SettingsError

    try:
        split_listen(args.listen) if not args.listen.startswith("unix:") else None
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    try:
        return asyncio.run(_serve(args))
    except OSError as exc:
        print(f"stormguard: policy: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1


async def _serve(args) -> int:
    import signal

    states = ListStates(honour_until=not args.ignore_until)
    feed = worker = None
    if args.worker_url:
        worker = WorkerApiSource(args.worker_url, ttl=args.cache_ttl, timeout=args.worker_timeout,
                                 honour_until=not args.ignore_until)
        if not await worker.poll_once():
            log.warning("the worker API at %s does not list frozen lists yet; asking per address until it does",
                        args.worker_url)
        worker.start()
        decider = PolicyDecider(lambda a: False, action=args.action, hold_text=args.hold_text,
                                defer_text=args.defer_text, recipient_delimiter=args.recipient_delimiter)
        source = f"worker API {args.worker_url}"
    else:
        feed = KafkaStateFeed(states, args.broker, args.topic).start()
        decider = PolicyDecider(states.frozen, action=args.action, hold_text=args.hold_text,
                                defer_text=args.defer_text, recipient_delimiter=args.recipient_delimiter)
        source = f"topic {args.topic}"
        loaded = await asyncio.get_running_loop().run_in_executor(None, states.ready.wait, args.startup_timeout)
        if not loaded:
            log.warning("list state not loaded after %.0f s; listening anyway (fail open until it is)",
                        args.startup_timeout)
    server = PolicyServer(decider, worker)
    try:
        await server.start(args.listen)
        print(f"stormguard: policy server listening on {args.listen} (state from {source}; "
              f"frozen lists answer {args.action.upper()})", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        if server.server is not None:
            server.server.close()
            await server.server.wait_closed()
        if feed is not None:
            await asyncio.get_running_loop().run_in_executor(None, feed.stop)
        if worker is not None:
            await worker.close()
        log.warning("policy server stopped: %s", decider.counts)
    return 0
