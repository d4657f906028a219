"""The Postfix log parser, on real log lines written by Postfix 3.7 (Debian 12) on loopback.

``postfix_maillog_delivered.log`` and ``postfix_maillog_held.log`` are excerpts of
``maillog_file`` output of a real instance (a 600-member virtual alias list, a
2-member one, a discard transport, a deferring relay, a policy HOLD, a local
``sendmail`` submission); only the list deliveries after the second of each
message were cut, to keep the files small.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import threading
import time
from pathlib import Path

import pytest

from detectors.events import encode_event, parse_event
from stream_jobs import cli
from stream_jobs.postfix.ingest import NULL_SENDER, PostfixLogParser, follow_lines
from stream_jobs.postfix.lists import ListMapError, load_list_files, read_virtual_lists

HERE = Path(__file__).parent
DELIVERED = HERE / "postfix_maillog_delivered.log"
HELD = HERE / "postfix_maillog_held.log"
VIRTUAL = HERE / "postfix_virtual_lists.txt"
ALL = "all@lists.example.test"
# The excerpts were written on 27 November; read them "in" that year.
CLOCK = dt.datetime(2026, 11, 28, 12, 0).timestamp


def parse_file(path: Path, **kw) -> list:
    parser = PostfixLogParser(load_list_files([str(VIRTUAL)]), clock=CLOCK, **kw)
    events = []
    for line in path.read_text().splitlines():
        events.extend(parser.feed(line))
    events.extend(parser.flush(None))
    return events


# -- the list map --------------------------------------------------------------------------------


def test_virtual_alias_table_gives_list_member_counts():
    assert load_list_files([str(VIRTUAL)]) == {ALL: 600, "team@lists.example.test": 2}


def test_nested_lists_cycles_and_self_references_count_distinct_final_addresses():
    table = [
        "All-Staff@Example.org  wards@example.org, admin@example.org, boss@example.org",
        "wards@example.org  w1@example.org w2@example.org,w3@example.org",
        "admin@example.org  a1@example.org, boss@example.org, all-staff@example.org",  # cycle back
        "keep@example.org   keep@example.org, copy@example.org",  # delivers to itself too
        "@example.org       catchall@example.org",
        "example.org        virtual-domain",
        "single@example.org one@example.org",
    ]
    counts = read_virtual_lists(table)
    assert counts["all-staff@example.org"] == 5  # w1 w2 w3 a1 boss, boss counted once
    assert counts["wards@example.org"] == 3
    assert counts["keep@example.org"] == 2
    assert "single@example.org" not in counts  # an alias, not a list
    assert not any(k.startswith("@") or "@" not in k for k in counts)
    assert read_virtual_lists(table, min_members=1)["single@example.org"] == 1


def test_bad_list_maps_are_refused_with_file_and_line(tmp_path):
    with pytest.raises(ListMapError, match=r"x.txt:2: entry 'lonely@example.org' has no result"):
        read_virtual_lists(["# ok", "lonely@example.org"], source="x.txt")
    with pytest.raises(ListMapError, match="continuation line before any entry"):
        read_virtual_lists(["   a@example.org"])
    with pytest.raises(ListMapError, match="No such file"):
        load_list_files([str(tmp_path / "missing")])


# -- joining real log lines ----------------------------------------------------------------------


def test_real_log_joins_cleanup_qmgr_and_delivery_lines_into_contract_events():
    events = {e.message_id: e for e in parse_file(DELIVERED)}
    assert set(events) == {"<root1@example.test>", "<r1@example.test>",
                           "<20261127184417.5D9F220E204@mx.example.test>"}

    root = events["<root1@example.test>"]
    assert root.sender == "alice@example.test"
    assert root.recipients == [ALL]
    assert root.lists == {ALL: 600} and root.delivered_count == 600 and root.deliveries == 600
    assert root.subject == "Test message" and root.in_reply_to is None and not root.is_reply
    assert root.event_time == dt.datetime(2026, 11, 27, 18, 44, 17).timestamp()  # local time, as syslog

    reply = events["<r1@example.test>"]
    assert reply.sender == "bob@example.test"
    assert sorted(reply.recipients) == sorted([ALL, "carol@members.example.test"])
    assert reply.lists == {ALL: 600} and reply.delivered_count == 601
    assert reply.in_reply_to == "<root1@example.test>" and reply.is_reply
    assert reply.subject == "RE: Test message"

    direct = events["<20261127184417.5D9F220E204@mx.example.test>"]
    assert direct.recipients == ["x@members.example.test"] and direct.lists == {}
    assert direct.delivered_count == 1 and direct.subject == "lunch"

    for e in events.values():  # every event is valid on the wire
        assert parse_event(encode_event(e)) == e


def test_a_list_post_is_emitted_on_its_first_list_delivery_not_its_last():
    parser = PostfixLogParser({ALL: 600}, clock=CLOCK)
    lines = DELIVERED.read_text().splitlines()
    emitted_at = None
    for i, line in enumerate(lines):
        if any(e.message_id == "<root1@example.test>" for e in parser.feed(line)):
            emitted_at = i
            break
    assert emitted_at is not None
    assert "to=<user0@members.example.test>" in lines[emitted_at]  # 1 of 600 deliveries seen


def test_held_messages_rejected_recipients_deferrals_pickup_and_encoded_subjects():
    events = {e.message_id: e for e in parse_file(HELD)}
    # <r1@example.test> was put on hold by the policy server (NOQUEUE: hold, then its client= line):
    # it was not delivered, so it is no event
    assert "<r1@example.test>" not in events
    assert set(events) == {"<root1@example.test>", "<c1@example.test>",
                           "<20261127184741.8CFA520E316@mx.example.test>"}

    mixed = events["<c1@example.test>"]
    # one recipient rejected at RCPT (the message went on), one deferred, one 2-member list
    assert sorted(mixed.recipients) == ["team@lists.example.test", "z@slow.example.test"]
    assert mixed.lists == {"team@lists.example.test": 2} and mixed.delivered_count == 3
    assert mixed.subject == "café time"  # RFC 2047 encoded word decoded

    local = events["<20261127184741.8CFA520E316@mx.example.test>"]  # sendmail → pickup
    assert local.sender == "root@example.test" and local.recipients == ["x@members.example.test"]


def test_hold_on_a_later_recipient_of_an_open_message_marks_that_message():
    parser = PostfixLogParser({ALL: 600}, clock=CLOCK)
    lines = [
        "Nov 27 18:50:00 mx postfix/smtpd[42]: AAAAA11111: client=localhost[127.0.0.1]",
        "Nov 27 18:50:00 mx postfix/smtpd[42]: NOQUEUE: hold: RCPT from localhost[127.0.0.1]: <all@lists.example.test>:"
        " Recipient address frozen; from=<b@example.test> to=<all@lists.example.test> proto=ESMTP helo=<x>",
        "Nov 27 18:50:00 mx postfix/cleanup[43]: AAAAA11111: message-id=<h@example.test>",
        # a second message on the same connection is not held
        "Nov 27 18:50:01 mx postfix/smtpd[42]: BBBBB22222: client=localhost[127.0.0.1]",
        "Nov 27 18:50:01 mx postfix/cleanup[43]: BBBBB22222: message-id=<ok@example.test>",
        "Nov 27 18:50:01 mx postfix/qmgr[44]: BBBBB22222: from=<b@example.test>, size=1, nrcpt=1 (queue active)",
        "Nov 27 18:50:01 mx postfix/smtp[45]: BBBBB22222: to=<x@example.net>, relay=127.0.0.1[127.0.0.1]:2525,"
        " delay=0.1, delays=0/0/0/0.1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as CCCCC)",
    ]
    events = [e for line in lines for e in parser.feed(line)]
    assert [e.message_id for e in events] == ["<ok@example.test>"]
    # released later by an operator (postsuper -H): still no event, it was stopped by Stormguard
    assert parser.feed("Nov 27 19:50:00 mx postfix/qmgr[44]: AAAAA11111: from=<b@example.test>, size=1,"
                       " nrcpt=600 (queue active)") == []
    assert parser.stats["held"] == 1


def test_without_a_list_map_aliases_are_inferred_and_the_wait_ends_by_log_time():
    parser = PostfixLogParser({}, emit_after=5.0, clock=CLOCK)
    head = [
        "Nov 27 10:00:00 mx postfix/smtpd[1]: 1111122222: client=localhost[127.0.0.1]",
        "Nov 27 10:00:00 mx postfix/cleanup[2]: 1111122222: message-id=<m@x>",
        "Nov 27 10:00:00 mx postfix/qmgr[3]: 1111122222: from=<>, size=10, nrcpt=4 (queue active)",
    ]
    deliveries = [f"Nov 27 10:00:01 mx postfix/local[4]: 1111122222: to=<u{i}@x>, orig_to=<staff@x>, relay=local,"
                  f" delay=1, delays=0/0/0/1, dsn=2.0.0, status=sent (delivered to mailbox)" for i in range(3)]
    out = [e for line in head + deliveries for e in parser.feed(line)]
    assert out == []  # 3 of 4 recipients accounted for: wait
    # nothing more about this message; another message's line 5 s later ends the wait
    out = parser.feed("Nov 27 10:00:06 mx postfix/smtpd[1]: 3333344444: client=localhost[127.0.0.1]")
    assert len(out) == 1
    e = out[0]
    assert e.sender == NULL_SENDER and e.recipients == ["staff@x"]
    assert e.lists == {"staff@x": 3} and e.delivered_count == 4


def test_removed_emits_what_is_known_and_messages_seen_only_from_qmgr_are_ignored():
    parser = PostfixLogParser({}, emit_after=3600, clock=CLOCK)
    lines = [
        # queued before the log was opened: no cleanup line, so no event (no duplicates on restart)
        "Nov 27 10:00:00 mx postfix/qmgr[3]: 9999988888: from=<old@x>, size=10, nrcpt=1 (queue active)",
        "Nov 27 10:00:00 mx postfix/smtp[5]: 9999988888: to=<a@y>, relay=none, delay=9, delays=0/0/9/0,"
        " dsn=4.4.1, status=deferred (connect to y[1.2.3.4]:25: Connection timed out)",
        "Nov 27 10:00:00 mx postfix/cleanup[2]: 5555566666: message-id=<m@x>",
        "Nov 27 10:00:00 mx postfix/cleanup[2]: 5555566666: info: header Subject: hi from local; from=<me@x> to=<you@y>",
        "Nov 27 10:00:00 mx postfix/qmgr[3]: 5555566666: from=<me@x>, size=10, nrcpt=2 (queue active)",
        "Nov 27 10:00:01 mx postfix/smtp[5]: 5555566666: to=<you@y>, relay=y[1.2.3.4]:25, delay=1,"
        " delays=0/0/0/1, dsn=2.0.0, status=sent (250 ok)",
    ]
    assert [e for line in lines for e in parser.feed(line)] == []
    out = parser.feed("Nov 27 10:00:02 mx postfix/qmgr[3]: 5555566666: removed")
    assert [(e.message_id, e.recipients, e.delivered_count) for e in out] == [("<m@x>", ["you@y"], 2)]


def test_cleanup_rejects_drop_the_message_and_noise_lines_are_ignored():
    parser = PostfixLogParser({}, clock=CLOCK)
    lines = [
        "Nov 27 10:00:00 mx postfix/smtpd[1]: 7777711111: client=h[10.0.0.1]",
        "Nov 27 10:00:00 mx postfix/cleanup[2]: 7777711111: reject: header Subject: spam from h[10.0.0.1];"
        " from=<s@x> to=<t@y> proto=ESMTP helo=<h>: 5.7.1 no",
        "Nov 27 10:00:00 mx postfix/qmgr[3]: 7777711111: removed",
        "Nov 27 10:00:00 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from h[10.0.0.1]: 554 5.7.1 <t@y>: Relay access"
        " denied; from=<s@x> to=<t@y> proto=ESMTP helo=<h>",
        "Nov 27 10:00:00 mx postfix/smtpd[1]: warning: hostname h does not resolve to address 10.0.0.1",
        "Nov 27 10:00:00 mx postfix/anvil[9]: statistics: max connection rate 1/60s for (smtp:10.0.0.1) at Nov 27",
        "not a syslog line at all",
        "",
    ]
    assert [e for line in lines for e in parser.feed(line)] == []
    assert not parser._pending


def test_iso_time_stamps_and_the_year_of_classic_ones():
    line = ("{ts} mx postfix/cleanup[2]: 5555566666: message-id=<m@x>\n"
            "{ts} mx postfix/qmgr[3]: 5555566666: from=<me@x>, size=10, nrcpt=1 (queue active)\n"
            "{ts} mx postfix/smtp[5]: 5555566666: to=<you@y>, relay=y[1.2.3.4]:25, delay=1, delays=0/0/0/1,"
            " dsn=2.0.0, status=sent (250 ok)")

    def first(ts: str, clock=CLOCK, tz=None):
        p = PostfixLogParser({}, clock=clock, tz=tz)
        return [e for raw in line.format(ts=ts).splitlines() for e in p.feed(raw)][0].event_time

    assert first("2026-11-27T18:44:17.250000+00:00") == dt.datetime(2026, 11, 27, 18, 44, 17, 250000,
                                                                     tzinfo=dt.timezone.utc).timestamp()
    assert first("2026-11-27T18:44:17+0100") == dt.datetime(2026, 11, 27, 17, 44, 17,
                                                            tzinfo=dt.timezone.utc).timestamp()
    january = dt.datetime(2027, 1, 2, 0, 5).timestamp
    assert first("Dec 31 23:59:59", clock=january) == dt.datetime(2026, 12, 31, 23, 59, 59).timestamp()
    assert first("Jan  2 00:00:01", clock=january) == dt.datetime(2027, 1, 2, 0, 0, 1).timestamp()
    utc = dt.timezone.utc
    assert first("Nov 27 18:44:17", tz=utc) == dt.datetime(2026, 11, 27, 18, 44, 17, tzinfo=utc).timestamp()


# -- the command ---------------------------------------------------------------------------------


def test_cli_writes_events_as_json_lines(capsysbinary, monkeypatch):
    monkeypatch.setattr("stream_jobs.postfix.ingest.time.time", CLOCK)
    code = cli.main(["ingest", "postfix-log", "--stdout", "--lists", str(VIRTUAL),
                     "--list", "Extra@Example.org=12", str(DELIVERED)])
    assert code == 0
    out = capsysbinary.readouterr().out.splitlines()
    events = [parse_event(line) for line in out]
    assert [e.message_id for e in events] == ["<root1@example.test>", "<r1@example.test>",
                                              "<20261127184417.5D9F220E204@mx.example.test>"]


def test_cli_refuses_bad_options(capsys, tmp_path):
    assert cli.main(["ingest", "postfix-log", "--stdout", "--list", "nocount", str(DELIVERED)]) == 2
    assert "ADDRESS=MEMBERS" in capsys.readouterr().err
    assert cli.main(["ingest", "postfix-log", "--stdout", "--lists", str(tmp_path / "nope"), str(DELIVERED)]) == 2
    assert cli.main(["ingest", "postfix-log", "--follow", "-"]) == 2


def test_follow_reads_appended_lines_across_rotation_and_truncation(tmp_path):
    path = tmp_path / "maillog"
    path.write_text("one\n")
    got: list[str] = []
    stop = threading.Event()

    def run():
        for line in follow_lines(str(path), poll=0.02, stop=stop.is_set):
            if line is not None:
                got.append(line)

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def wait_for(n):
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(got)

    with open(path, "a") as fh:
        fh.write("two\nthr")
        fh.flush()
        assert wait_for(2) == ["one", "two"]  # a partial line waits for its newline
        fh.write("ee\n")
    assert wait_for(3) == ["one", "two", "three"]
    os.rename(path, tmp_path / "maillog.1")  # logrotate: rename, then a new file
    path.write_text("four\n")
    assert wait_for(4)[-1] == "four"
    path.write_text("")  # copytruncate
    time.sleep(0.1)
    with open(path, "a") as fh:
        fh.write("five\n")
    assert wait_for(5)[-1] == "five"
    stop.set()
    t.join(5)
    assert not t.is_alive()


def test_follow_from_end_skips_what_is_there(tmp_path):
    path = tmp_path / "maillog"
    path.write_text("old\n")
    it = follow_lines(str(path), from_end=True, poll=0.01)
    assert next(it) is None
    with open(path, "a") as fh:
        fh.write("new\n")
    assert next(it) == "new"
