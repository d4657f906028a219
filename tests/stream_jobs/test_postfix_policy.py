"""The Postfix policy server: protocol, decisions, fail-open, and its state sources."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

import msgspec
import pytest

from detectors.engine import ListStatus
from stream_jobs.postfix.list_state import ListStates, WorkerApiSource, warn
from stream_jobs.postfix.policy import (DEFAULT_DEFER_TEXT, PolicyDecider, PolicyServer,
                                        ProtocolError, format_reply, parse_request,
                                        split_listen)

ALL = "all@lists.example.test"

# A request as Postfix 3.7 sends it at RCPT time (SMTPD_POLICY_README, "Protocol description").
RCPT_REQUEST = """request=smtpd_access_policy
protocol_state=RCPT
protocol_name=ESMTP
client_address=127.0.0.1
client_name=localhost
client_port=40312
reverse_client_name=localhost
server_address=127.0.0.1
server_port=2525
helo_name=[127.0.0.1]
sender=bob@example.test
recipient={rcpt}
recipient_count=0
queue_id=
instance={instance}
size=0
etrn_domain=
stress=
sasl_method=
sasl_username=
sasl_sender=
ccert_subject=
ccert_issuer=
ccert_fingerprint=
ccert_pubkey_fingerprint=
encryption_protocol=
encryption_cipher=
encryption_keysize=0
policy_context=

"""


def req(rcpt: str, state: str = "RCPT", instance: str = "9a1.6763d7f1.b4a2f.0") -> bytes:
    return RCPT_REQUEST.format(rcpt=rcpt, instance=instance).replace("protocol_state=RCPT",
                                                                     f"protocol_state={state}").encode()


def frozen_states(*lists: str, **kw) -> ListStates:
    states = ListStates(**kw)
    for address in lists:
        states.set(ListStatus(list=address, frozen=True, since=1.0, reason="reply-all storm"))
    return states


# -- protocol ------------------------------------------------------------------------------------


def test_request_parsing_and_reply_format():
    attrs = parse_request(req(ALL).splitlines(keepends=True)[:-1])
    assert attrs["request"] == "smtpd_access_policy" and attrs["recipient"] == ALL
    assert attrs["policy_context"] == "" and attrs["encryption_keysize"] == "0"
    assert parse_request([b"ccert_subject=CN=a=b\n"]) == {"ccert_subject": "CN=a=b"}  # "=" in values
    with pytest.raises(ProtocolError):
        parse_request([b"no equals sign\n"])
    with pytest.raises(ProtocolError):
        parse_request([b"a=b\n"] * 500)
    assert format_reply("DUNNO") == b"action=DUNNO\n\n"
    assert split_listen("127.0.0.1:10040") == ("127.0.0.1", 10040)
    assert split_listen("[::1]:10040") == ("::1", 10040)
    with pytest.raises(ValueError):
        split_listen("10040x")


# -- decisions -----------------------------------------------------------------------------------


def test_frozen_list_is_held_everything_else_passes():
    d = PolicyDecider(frozen_states(ALL).frozen)
    attrs = parse_request(req(ALL).splitlines()[:-1])
    assert d.decide(attrs) == f"HOLD Stormguard: list {ALL} is frozen (reply-all storm)"
    assert d.decide({**attrs, "recipient": "ALL@Lists.Example.Test"}).startswith("HOLD ")
    assert d.decide({**attrs, "recipient": "<all@lists.example.test>"}).startswith("HOLD ")
    assert d.decide({**attrs, "recipient": "carol@members.example.test"}) == "DUNNO"
    assert d.decide({**attrs, "recipient": ""}) == "DUNNO"
    assert d.decide({**attrs, "request": "something_else"}) == "DUNNO"
    assert d.counts == {"requests": 6, "hold": 3, "defer": 0, "dunno": 3, "errors": 0}


def test_defer_action_and_texts_are_configurable():
    d = PolicyDecider(frozen_states(ALL).frozen, action="defer")
    verdict = d.decide({"request": "smtpd_access_policy", "protocol_state": "RCPT", "recipient": ALL})
    assert verdict == "DEFER " + DEFAULT_DEFER_TEXT.replace("{list}", ALL)
    assert verdict.startswith("DEFER 4.")  # a 4xx enhanced status: the client retries later
    d = PolicyDecider(frozen_states(ALL).frozen, hold_text="storm on {list}\nsecond line")
    assert d.decide({"request": "smtpd_access_policy", "recipient": ALL}) == f"HOLD storm on {ALL} second line"
    with pytest.raises(ValueError):
        PolicyDecider(frozen_states().frozen, action="reject")


def test_address_extensions_match_their_list_when_a_delimiter_is_given():
    states = frozen_states(ALL)
    plain = PolicyDecider(states.frozen)
    ext = PolicyDecider(states.frozen, recipient_delimiter="+-")
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "recipient": "all+urgent@lists.example.test"}
    assert plain.decide(attrs) == "DUNNO"
    assert ext.decide(attrs).startswith("HOLD ")


def test_end_of_message_requests_are_answered_for_lists_seen_at_rcpt_time():
    d = PolicyDecider(frozen_states(ALL).frozen)
    # at END-OF-MESSAGE Postfix sends no recipient when the message has several
    eom = {"request": "smtpd_access_policy", "protocol_state": "END-OF-MESSAGE", "recipient": "",
           "recipient_count": "2", "instance": "i-1"}
    assert d.decide(eom) == "DUNNO"  # nothing seen at RCPT for this transaction
    d.decide({"request": "smtpd_access_policy", "protocol_state": "RCPT", "recipient": ALL, "instance": "i-1"})
    d.decide({"request": "smtpd_access_policy", "protocol_state": "RCPT", "recipient": "c@x", "instance": "i-1"})
    assert d.decide(eom).startswith("HOLD ")
    assert d.decide({**eom, "instance": "i-2"}) == "DUNNO"  # another transaction
    # a single-recipient message carries its recipient at END-OF-MESSAGE too
    assert d.decide({**eom, "instance": "i-3", "recipient": ALL, "recipient_count": "1"}).startswith("HOLD ")


def test_list_state_records_freeze_unfreeze_tombstone_and_until():
    now = [1000.0]
    states = ListStates(clock=lambda: now[0])
    enc = msgspec.json.encode
    states.apply(ALL.encode(), enc(ListStatus(list=ALL, frozen=True, since=900.0, reason="storm", until=2000.0)))
    assert states.frozen(ALL) is not None and states.frozen_lists() == [ALL]
    now[0] = 2000.0  # the cool-down is over even if no unfreeze record came
    assert states.frozen(ALL) is None
    assert ListStates(honour_until=False, clock=lambda: now[0]) is not None
    keep = ListStates(honour_until=False, clock=lambda: now[0])
    keep.apply(ALL.encode(), enc(ListStatus(list=ALL, frozen=True, until=1.0)))
    assert keep.frozen(ALL) is not None
    keep.apply(ALL.encode(), enc(ListStatus(list=ALL, frozen=False)))
    assert keep.frozen(ALL) is None
    keep.apply(b"B@x", enc(ListStatus(list="b@x", frozen=True)))
    keep.apply(b"B@x", None)  # compaction tombstone
    assert keep.frozen("b@x") is None
    keep.apply(b"c@x", b"not json")  # ignored with a warning, never raises
    keep.apply(b"c@x", b'{"list": "c@x"}')
    assert keep.frozen_lists() == []


# -- the server, over real sockets ---------------------------------------------------------------


async def _start(decider, worker=None) -> tuple[PolicyServer, int]:
    server = PolicyServer(decider, worker)
    srv = await server.start("127.0.0.1:0")
    return server, srv.sockets[0].getsockname()[1]


async def _close(writer) -> None:
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.01)  # let the server's handler see the end of the connection


async def _ask(reader, writer, payload: bytes) -> bytes:
    writer.write(payload)
    await writer.drain()
    return await reader.readuntil(b"\n\n")


async def test_server_answers_many_requests_on_one_connection_fast():
    server, port = await _start(PolicyDecider(frozen_states(ALL).frozen))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await _ask(reader, writer, req(ALL)) == \
            f"action=HOLD Stormguard: list {ALL} is frozen (reply-all storm)\n\n".encode()
        assert await _ask(reader, writer, req("carol@members.example.test")) == b"action=DUNNO\n\n"
        timings = []
        for i in range(300):
            t0 = time.perf_counter()
            await _ask(reader, writer, req(ALL if i % 2 else f"u{i}@x"))
            timings.append(time.perf_counter() - t0)
        p50 = statistics.median(timings) * 1000
        p99 = sorted(timings)[int(len(timings) * 0.99)] * 1000
        print(f"policy round trip on loopback: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
        assert p50 < 10.0  # the budget; typically ~0.2 ms
    finally:
        await _close(writer)
        server.server.close()
        await server.server.wait_closed()


async def test_server_fails_open_on_its_own_errors_and_on_bad_requests(caplog):
    def broken(address):
        raise RuntimeError("state store exploded")

    warn.last.clear()  # the warning limiter is per process; this test wants to see its warning
    server, port = await _start(PolicyDecider(broken))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        with caplog.at_level(logging.WARNING, logger="stormguard.postfix_policy"):
            assert await _ask(reader, writer, req(ALL)) == b"action=DUNNO\n\n"
            assert await _ask(reader, writer, b"garbage without equals\n\n") == b"action=DUNNO\n\n"
            # the connection is still usable after both
            assert await _ask(reader, writer, req("x@y")) == b"action=DUNNO\n\n"
        assert any("answering DUNNO" in r.getMessage() for r in caplog.records)
        assert server.decider.counts["errors"] == 2  # both real requests; the garbage one is a protocol error
    finally:
        await _close(writer)
        server.server.close()
        await server.server.wait_closed()


async def test_worker_api_source_caches_and_fails_open():
    from aiohttp import web

    frozen = {ALL: True}
    hits = []
    slow = asyncio.Event()

    async def handler(request):
        address = request.match_info["address"]
        hits.append(address)
        if address == "slow@x":
            await slow.wait()
        if address == "broken@x":
            return web.Response(status=500)
        return web.json_response({"list": address, "frozen": frozen.get(address, False), "since": None,
                                  "reason": None})

    app = web.Application()
    app.router.add_get("/api/lists/{address}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    worker = WorkerApiSource(f"http://127.0.0.1:{port}", ttl=0.2, timeout=0.3)
    server, pport = await _start(PolicyDecider(lambda a: False), worker)
    reader, writer = await asyncio.open_connection("127.0.0.1", pport)
    try:
        assert (await _ask(reader, writer, req(ALL))).startswith(b"action=HOLD ")
        assert await _ask(reader, writer, req("c@x")) == b"action=DUNNO\n\n"
        n = len(hits)
        assert (await _ask(reader, writer, req(ALL))).startswith(b"action=HOLD ")
        assert len(hits) == n  # served from the cache
        frozen[ALL] = False
        await asyncio.sleep(0.3)
        await _ask(reader, writer, req(ALL))  # stale: answered from cache, refreshed behind
        await asyncio.sleep(0.1)
        assert await _ask(reader, writer, req(ALL)) == b"action=DUNNO\n\n"
        t0 = time.monotonic()
        assert await _ask(reader, writer, req("slow@x")) == b"action=DUNNO\n\n"  # fail open on timeout
        assert time.monotonic() - t0 < 1.0
        assert await _ask(reader, writer, req("broken@x")) == b"action=DUNNO\n\n"  # and on HTTP errors
    finally:
        slow.set()
        await _close(writer)
        server.server.close()
        await server.server.wait_closed()
        await worker.close()
        await runner.cleanup()


async def test_worker_api_source_polls_the_set_of_frozen_lists():
    from aiohttp import web

    frozen = [{"list": "All@Lists.Example.Test", "frozen": True, "since": 1.0, "reason": "storm", "until": None}]
    per_address = []
    broken = [False]

    async def all_lists(request):
        if broken[0]:
            return web.Response(status=503)
        return web.json_response({"frozen": frozen})

    async def one(request):
        per_address.append(request.match_info["address"])
        return web.json_response({"list": request.match_info["address"], "frozen": False})

    app = web.Application()
    app.router.add_get("/api/lists", all_lists)
    app.router.add_get("/api/lists/{address}", one)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    worker = WorkerApiSource(f"http://127.0.0.1:{port}", ttl=0.1, timeout=0.5)
    try:
        assert await worker.poll_once()
        worker.start()
        assert await worker.frozen(ALL) is True and await worker.frozen("c@x") is False
        assert per_address == []  # answered from the polled set, no request per address
        frozen.clear()
        await asyncio.sleep(0.3)
        assert await worker.frozen(ALL) is False
        broken[0] = True  # the poll fails: after the staleness window, ask per address (fail open)
        await asyncio.sleep(0.15)
        worker._all_at -= 60
        assert await worker.frozen(ALL) is False and per_address == [ALL]
    finally:
        await worker.close()
        await runner.cleanup()


async def test_worker_api_down_fails_open():
    from stream_jobs.kafka.broker import free_port

    worker = WorkerApiSource(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    try:
        assert await worker.frozen(ALL) is False
    finally:
        await worker.close()


# -- the list-state topic on a real broker -------------------------------------------------------


@pytest.mark.live
def test_kafka_feed_follows_the_compacted_list_state_topic():
    from stream_jobs.kafka.broker import embedded
    from stream_jobs.postfix.list_state import KafkaStateFeed
    from stream_jobs.kafka.replay import make_producer
    from stream_jobs.settings import LIST_STATE_TOPIC

    def wait(pred, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return False

    with embedded() as broker:
        states = ListStates()
        feed = KafkaStateFeed(states, broker.url).start()
        try:
            assert states.ready.wait(20), "no state before the topic exists should still be 'ready'"
            producer = make_producer(broker.url)
            for status in (ListStatus(list=ALL, frozen=True, since=time.time(), reason="storm"),
                           ListStatus(list="b@x", frozen=True, since=time.time(), reason="storm"),
                           ListStatus(list="b@x", frozen=False)):
                producer.send(LIST_STATE_TOPIC, key=status.list.encode(), value=msgspec.json.encode(status))
            producer.flush()
            assert wait(lambda: states.records >= 3)
            assert states.frozen_lists() == [ALL]
            producer.send(LIST_STATE_TOPIC, key=ALL.encode(), value=msgspec.json.encode(ListStatus(list=ALL, frozen=False)))
            producer.flush()
            producer.close()
            assert wait(lambda: states.frozen(ALL) is None)
        finally:
            feed.stop()
        # a fresh reader rebuilds the same state from the beginning of the topic
        again = ListStates()
        feed = KafkaStateFeed(again, broker.url).start()
        try:
            assert again.ready.wait(20) and wait(lambda: again.records >= 4)
            assert again.frozen_lists() == []
        finally:
            feed.stop()
