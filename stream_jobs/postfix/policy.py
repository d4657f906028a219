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

List state comes from :mod:`stream_jobs.postfix.list_state` (the compacted
``stormguard.list-state`` topic, or the worker's HTTP API); either way a request is
answered from memory.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections import OrderedDict
from typing import Callable, Optional

from stream_jobs.postfix.list_state import KafkaStateFeed, ListStates, WorkerApiSource, warn
from stream_jobs.settings import LIST_STATE_TOPIC

log = logging.getLogger("stormguard.postfix_policy")

DEFAULT_HOLD_TEXT = "Stormguard: list {list} is frozen (reply-all storm)"
DEFAULT_DEFER_TEXT = "4.2.1 The list {list} is paused by Stormguard (reply-all storm); please try again later"
#: Attributes in one request, and bytes in one line, beyond which the client is not Postfix.
MAX_ATTRIBUTES = 200
MAX_LINE = 64 * 1024

class ProtocolError(ValueError):
    pass


# -- decisions ----------------------------------------------------------------------------------


class PolicyDecider:
    """The decision for one request, from its attributes. Pure apart from the state it reads.

    >>> from detectors.engine import ListStatus
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
        from stream_jobs.kafka.preflight import refusal
        from stream_jobs.kafka.replay import bootstrap_servers

        refused = await asyncio.get_running_loop().run_in_executor(None, refusal, bootstrap_servers(args.broker))
        if refused:  # fail open is for a broker that is away, not for a password it refuses
            print(f"stormguard: policy: cannot start: {refused}", file=sys.stderr, flush=True)
            return 2
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
