"""The milter's matching and its protocol path, fast: no Postfix, no broker (the live test is test_milter_postfix_live)."""

from __future__ import annotations

import asyncio
import time

import pytest

from detectors.holds import HoldBook, message_ids
from detectors.policy import Action, ThreadHold, shadow
from stream_jobs.kafka.broker import free_port
from stream_jobs.postfix.milter import MessageSeen, MilterDecider, MilterServer

LIST = "all@nhs.net"


def held_thread(until: float | None = 1_000.0, root: str = "<t0@nhs.net>", ids=None) -> ThreadHold:
    return ThreadHold(root=root, ids=ids or [root], until=until)


def test_a_reply_into_a_held_thread_is_held_other_mail_flows():
    book = HoldBook()
    book.hold_thread(LIST, held_thread())
    assert book.decide([LIST, "gp@nhs.net"], ["<t0@nhs.net>"], 10.0).kind == "thread"
    # matched by any References id, in any form, and the list by any case
    assert book.decide(["ALL@NHS.NET"], message_ids("<x@y>\r\n <t0@nhs.net>"), 10.0) is not None
    assert book.decide([LIST], ["<other@nhs.net>"], 10.0) is None          # another thread of the list
    assert book.decide([LIST], [], 10.0) is None                            # a new post to the list
    assert book.decide(["nurse@nhs.net"], ["<t0@nhs.net>"], 10.0) is None   # answering the sender only
    assert book.decide([LIST], ["<t0@nhs.net>"], 1_000.0) is None          # the hold has ended


def test_a_frozen_list_holds_everything_and_its_storm_thread_is_known_after_the_unfreeze():
    book = HoldBook()
    book.hold_thread(LIST, held_thread(until=None, ids=["<t0@nhs.net>", "<r1@nhs.net>"]))  # a freeze's storm thread
    assert book.decide([LIST], ["<r1@nhs.net>"], 10.0) is None  # not frozen (yet): a storm hold needs the freeze
    book.freeze(LIST, until=500.0)
    hold = book.decide([LIST], ["<r1@nhs.net>"], 10.0)
    assert hold.kind == "list" and hold.root == "t0@nhs.net"
    assert book.decide([LIST], [], 10.0).root is None
    assert book.decide([LIST], [], 500.0) is None  # past the cool-down's end
    book.unfreeze(LIST)
    assert book.decide([LIST], ["<t0@nhs.net>"], 10.0) is None
    assert book.storm_thread(LIST) == ("t0@nhs.net", frozenset({"t0@nhs.net", "r1@nhs.net"}))
    assert book.in_thread(LIST, "<t0@nhs.net>", ["<r1@nhs.net>"]) and not book.in_thread(LIST, "<t0@nhs.net>", ["x"])


def test_the_book_follows_actions_and_ignores_shadow_decisions():
    alert = Action(kind="alert", list=LIST, sender="a@nhs.net", event_time=1.0, detector="fanout", score=9.0,
                   message_id="<t0@nhs.net>", reason="r", thread=held_thread(until=301.0))
    book = HoldBook()
    book.apply(shadow(alert))
    assert book.decide([LIST], ["<t0@nhs.net>"], 2.0) is None
    book.apply(alert)
    assert book.decide([LIST], ["<t0@nhs.net>"], 2.0) is not None
    book.end_thread(LIST, "<t0@nhs.net>")
    assert book.decide([LIST], ["<t0@nhs.net>"], 2.0) is None and book.threads() == []


def test_ended_holds_are_forgotten_when_the_book_is_full():
    book = HoldBook(max_watches=10)
    for i in range(25):
        book.hold_thread(LIST, held_thread(until=float(i), root=f"<t{i}@x>"))
    assert len(book.threads()) <= 10
    assert book.decide([LIST], ["<t24@x>"], 0.0) is not None  # the newest is kept


def test_the_milter_event_is_the_contract_event():
    book = HoldBook()
    d = MilterDecider(book, {LIST: 840_000}, clock=lambda: 1_479_112_260.0)
    seen = MessageSeen(queue_id="4XqAbC", sender="nurse@nhs.net", recipients=[LIST, "gp@nhs.net"],
                       headers={"message-id": "<r1@nhs.net>", "in-reply-to": "<t0@nhs.net>",
                                "references": "<t0@nhs.net>", "subject": "=?utf-8?q?RE=3A_test_=C3=A9?="})
    event, hold = d.decide(seen)
    assert hold is None
    assert (event.message_id, event.sender, event.recipients, event.lists) == \
        ("<r1@nhs.net>", "nurse@nhs.net", [LIST, "gp@nhs.net"], {LIST: 840_000})
    assert event.in_reply_to == "<t0@nhs.net>" and event.subject == "RE: test é" and event.is_reply
    assert event.deliveries == 840_001
    # a list manager's own distribution is neither an event nor held
    assert d.decide(MessageSeen(sender="all-bounces@nhs.net", recipients=["x@nhs.net"],
                                headers={"list-id": "<all.nhs.net>"})) == (None, None)
    # no Message-ID: one naming the queue id; the null sender is MAILER-DAEMON
    event, _ = d.decide(MessageSeen(queue_id="Q1", sender="", recipients=["x@nhs.net"]))
    assert event.message_id == "<Q1.stormguard@milter.invalid>" and event.sender == "MAILER-DAEMON"


# -- the protocol path: an MTA speaking the milter protocol (kilter.protocol's messages) to the server ------------

class FakeMTAConnection:
    """The MTA side of the milter protocol, as Postfix speaks it: framed packets over TCP."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    async def send(self, *messages) -> None:
        from kilter.protocol.buffer import SimpleBuffer

        buf = SimpleBuffer(1 << 16)
        for message in messages:
            message.pack(buf)
        self.writer.write(buf[:].tobytes())
        await self.writer.drain()

    async def receive(self):
        from kilter.protocol import messages as m
        from kilter.protocol.buffer import SimpleBuffer

        head = await asyncio.wait_for(self.reader.readexactly(4), 5)
        body = await asyncio.wait_for(self.reader.readexactly(int.from_bytes(head, "big")), 5)
        buf = SimpleBuffer(len(body) + 4)
        buf[:] = head + body
        message, _ = m.Message.unpack(buf)
        message.freeze()
        return message


async def _message(mta, queue_id: str, sender: str, rcpts: list[str], headers: dict[str, str]):
    from kilter.protocol import messages as m

    await mta.send(m.Macro(ord("M"), {"i": queue_id}), m.EnvelopeFrom(f"<{sender}>".encode()))
    for r in rcpts:
        await mta.send(m.EnvelopeRecipient(f"<{r}>".encode()))
    for name, value in headers.items():
        await mta.send(m.Header(name, value.encode()))
    await mta.send(m.EndOfHeaders(), m.Macro(ord("E"), {"i": queue_id}), m.EndOfMessage(b""))
    first = await mta.receive()
    return [first] if isinstance(first, (m.Continue, m.Accept)) else [first, await mta.receive()]


async def test_the_protocol_path_quarantines_a_reply_into_a_held_thread_and_lets_the_rest_through():
    from kilter.protocol import messages as m

    book = HoldBook()
    book.hold_thread(LIST, held_thread(until=time.time() + 60))
    got = []
    decider = MilterDecider(book, {LIST: 600})
    server = MilterServer(decider, lambda seen, event, hold: got.append((seen.queue_id, event, hold)))
    port = free_port()
    await server.start(f"inet:127.0.0.1:{port}")
    try:
        mta = FakeMTAConnection(*await asyncio.open_connection("127.0.0.1", port))
        P = m.ProtocolFlags
        offered = P(0x1FFFFF) & ~P.HEADER_LEADING_SPACE  # everything Postfix 3.7 offers
        await mta.send(m.Negotiate(6, m.ActionFlags.ALL, offered))
        reply = await mta.receive()
        assert isinstance(reply, m.Negotiate) and reply.action_flags == m.ActionFlags.QUARANTINE
        assert P.NO_BODY in reply.protocol_flags and P.NR_HEADER in reply.protocol_flags

        reply_all = await _message(mta, "Q1", "nurse@nhs.net", [LIST], {
            "Message-ID": "<r1@nhs.net>", "In-Reply-To": "<t0@nhs.net>", "Subject": "RE: test"})
        assert isinstance(reply_all[0], m.Quarantine) and "held thread <t0@nhs.net>" in reply_all[0].reason
        assert isinstance(reply_all[1], m.Continue)
        other = await _message(mta, "Q2", "gp@nhs.net", [LIST], {"Message-ID": "<n1@nhs.net>", "Subject": "rota"})
        assert [type(r) for r in other] == [m.Continue]
        # an aborted transaction forgets what it saw; the next one on the same connection starts clean
        await mta.send(m.EnvelopeFrom(b"<x@nhs.net>"), m.Abort())
        private = await _message(mta, "Q3", "gp@nhs.net", ["nurse@nhs.net"], {
            "Message-ID": "<p1@nhs.net>", "In-Reply-To": "<t0@nhs.net>"})
        assert [type(r) for r in private] == [m.Continue]
        await mta.send(m.Close())
        assert await mta.reader.read() == b""  # closed

        assert [(q, h.kind if h else None) for q, _, h in got] == [("Q1", "thread"), ("Q2", None), ("Q3", None)]
        assert got[0][1].message_id == "<r1@nhs.net>" and got[0][1].lists == {LIST: 600}
        assert decider.counts["held_thread"] == 1 and decider.counts["errors"] == 0

        # a broken peer: the connection is dropped (Postfix then applies milter_default_action = accept)
        bad = FakeMTAConnection(*await asyncio.open_connection("127.0.0.1", port))
        bad.writer.write(b"\xff\xff\xff\xffjunk")
        await bad.writer.drain()
        assert await asyncio.wait_for(bad.reader.read(), 5) == b""
        assert decider.counts["errors"] == 1
    finally:
        server.server.close()


async def test_a_decision_error_delivers_the_message():
    from kilter.protocol import messages as m

    class Broken(HoldBook):
        def decide(self, *a, **kw):
            raise RuntimeError("boom")

    server = MilterServer(MilterDecider(Broken(), {}))
    port = free_port()
    await server.start(f"inet:127.0.0.1:{port}")
    try:
        mta = FakeMTAConnection(*await asyncio.open_connection("127.0.0.1", port))
        await mta.send(m.Negotiate(6, m.ActionFlags.ALL, m.ProtocolFlags(0x1FFFFF)))
        await mta.receive()
        assert [type(r) for r in await _message(mta, "Q9", "a@x", [LIST], {"Message-ID": "<m@x>"})] == [m.Continue]
        assert server.decider.counts["errors"] == 1
    finally:
        server.server.close()


def test_the_bench_measures_the_milter_decision_on_realistic_traffic():
    from stream_jobs.bench.milter import milter_decisions
    from stream_jobs.bench.traffic import encode_all, realistic_events

    figures = milter_decisions(encode_all(realistic_events(3_000, seed=7)), held_threads=50, frozen_lists=3)
    assert figures["events"] == 3_000 and figures["held_threads"] == 50
    assert figures["held"] > 0  # replies into the held threads and posts to the frozen lists were found
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]


async def test_pre_send_hold_holds_an_unprecedented_post_when_the_worker_says_so_and_delivers_otherwise():
    from kilter.protocol import messages as m

    from stream_jobs.postfix.milter import PreSendHold

    book = HoldBook()
    produced, after = [], []

    def emit(event):  # the worker, 50 ms later, finds the first post anomalous and holds its thread
        produced.append(event.message_id)
        if event.message_id == "<t0@nhs.net>":
            asyncio.get_running_loop().call_later(0.05, book.hold_thread, LIST, held_thread(until=time.time() + 60))

    server = MilterServer(MilterDecider(book, {LIST: 840_000, "team@nhs.net": 40}),
                          lambda seen, event, hold: after.append((seen.produced, hold)),
                          presend=PreSendHold(book, emit, floor=20_000, wait=0.5))
    port = free_port()
    await server.start(f"inet:127.0.0.1:{port}")
    try:
        mta = FakeMTAConnection(*await asyncio.open_connection("127.0.0.1", port))
        await mta.send(m.Negotiate(6, m.ActionFlags.ALL, m.ProtocolFlags(0x1FFFFF)))
        await mta.receive()
        held = await _message(mta, "Q1", "consultant@nhs.net", [LIST], {"Message-ID": "<t0@nhs.net>", "Subject": "test"})
        assert isinstance(held[0], m.Quarantine) and "held before expansion" in held[0].reason
        # no decision within the wait: delivered (fail open); small lists and replies are never waited for
        started = time.monotonic()
        quiet = await _message(mta, "Q2", "comms@nhs.net", [LIST], {"Message-ID": "<news@nhs.net>", "Subject": "news"})
        assert [type(r) for r in quiet] == [m.Continue] and time.monotonic() - started >= 0.5
        team = await _message(mta, "Q3", "a@nhs.net", ["team@nhs.net"], {"Message-ID": "<tm@nhs.net>"})
        assert [type(r) for r in team] == [m.Continue]
        assert produced == ["<t0@nhs.net>", "<news@nhs.net>"]  # produced before the wait, once
        assert [(p, h.kind if h else None) for p, h in after] == [(True, "presend"), (True, None), (False, None)]
    finally:
        server.server.close()


def test_releases_and_discards_are_actions_that_webhooks_leave_to_the_actions_topic():
    from detectors.policy import decode_action, encode_action
    from stream_jobs.actions.sinks.base import Sink
    from stream_jobs.actions.sinks.http import HttpSink

    release = Action(kind="release", list=LIST, sender=None, event_time=5.0, detector="operator", score=0.0,
                     message_id="<t0@nhs.net>", reason="harmless (2 message(s))", actor="alice",
                     thread=held_thread(until=None))
    assert decode_action(encode_action(release)) == release
    hook = Sink("any")  # webhooks, Alertmanager: the default, decisions only
    assert not hook.accepts(release) and hook.accepts(msgspec_replace(release, kind="freeze"))
    assert HttpSink("http://127.0.0.1:1/{kind}", kinds=["release", "discard"]).accepts(release)


def msgspec_replace(action, **kw):
    import msgspec

    return msgspec.structs.replace(action, **kw)


def test_healthz_figures_of_the_latest_decisions():
    server = MilterServer(MilterDecider(HoldBook(), {}))
    assert server.decide_ms() == {"p50": None, "p99": None, "of": 0}
    server.decide_seconds.extend([0.0001] * 99 + [0.002])
    assert server.decide_ms() == {"p50": 0.1, "p99": 2.0, "of": 100}


def test_a_freeze_naming_the_thread_does_not_end_its_running_hold_before_the_list_state_arrives():
    """The worker publishes list-state and thread-watch on two topics: the milter may read the freeze's thread
    record before the freeze itself; the anomalous post's hold must keep holding meanwhile."""
    book = HoldBook()
    book.hold_thread(LIST, held_thread(until=300.0))                         # the anomalous post's alert
    book.hold_thread(LIST, held_thread(until=None, ids=["<t0@nhs.net>", "<r1@nhs.net>"]))  # the freeze's record
    assert book.decide([LIST], ["<t0@nhs.net>"], 20.0).kind == "thread"      # list-state not read yet: still held
    assert book.storm_thread(LIST)[0] == "t0@nhs.net"
    assert book.decide([LIST], ["<t0@nhs.net>"], 300.0) is None               # past its end, only a freeze holds
    book.freeze(LIST)
    assert book.decide([LIST], ["<r1@nhs.net>"], 400.0) == ("list", LIST, "t0@nhs.net")


def test_the_hold_journal_survives_a_restart_and_is_compacted(tmp_path):
    from stream_jobs.postfix.held import HeldMail, Postfix
    from stream_jobs.postfix.milter import MessageSeen
    from detectors.holds import Hold

    book = HoldBook()
    held = HeldMail(str(tmp_path), Postfix(), book)
    for q, refs in (("Q1", "<t0@nhs.net>"), ("Q2", "<r1@nhs.net> <t0@nhs.net>"), ("Q3", "<other@nhs.net>")):
        seen = MessageSeen(queue_id=q, sender="a@nhs.net", recipients=[LIST], headers={"references": refs})
        held.record(seen, None, Hold("thread" if q != "Q3" else "list", LIST, "t0@nhs.net" if q != "Q3" else None))
    held._append({"queue_id": "Q2", "state": "released", "at": 1.0, "actor": "alice"})
    again = HeldMail(str(tmp_path), Postfix(), book)
    assert sorted(again.entries) == ["Q1", "Q3"]
    assert len((tmp_path / "holds.jsonl").read_text().splitlines()) == 2
    assert [e["queue_id"] for e in again.select(LIST, "<t0@nhs.net>")] == ["Q1"]
    assert again.summary() == [{"list": LIST, "thread": None, "held": 1}, {"list": LIST, "thread": "<t0@nhs.net>",
                                                                          "held": 1}]
