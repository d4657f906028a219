"""The simulator: calibration to INCIDENT.md, determinism per seed, the closed loop, scale."""

from __future__ import annotations

import json
import statistics

import pytest

from detectors.events import MailEvent, parse_event
from stream_jobs.evaluation.simulate import (TRACE_FANOUT, Org, OpenGateway, benign_events, epoch, scenario,
                                  scenario_events)

#: INCIDENT.md: ~840,000 members, ~600 list messages and ~500 million deliveries in 75 minutes.
MEMBERS, MESSAGES, DELIVERIES, MINUTES = 840_000, 600, 500_000_000, 75


def unstopped(name: str, seed: int, **kw):
    return scenario_events(scenario(name, seed, **kw), OpenGateway())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nhsmail_unstopped_matches_the_incident_within_ten_percent(seed):
    run = unstopped("nhsmail", seed, background_days=0.2)
    sc = run.scenario
    assert sc.storm.members == MEMBERS
    messages = run.storm_messages
    deliveries = sum(d for _, d, ok, _ in run.storm_log)
    span = (max(t for t, *_ in run.storm_log) - sc.storm.at) / 60
    assert abs(messages - MESSAGES) <= 0.1 * MESSAGES, messages
    assert abs(deliveries - DELIVERIES) <= 0.1 * DELIVERIES, deliveries
    assert span <= MINUTES
    # every member receives every delivered list message: far more than 300 each
    assert sum(1 for _, _, ok, _ in run.storm_log if ok) > 300
    # the gateway load: on the order of 111,000 deliveries per second over the 75 minutes
    assert 90_000 < deliveries / (MINUTES * 60) < 130_000


def test_nhsmail_calibration_holds_on_average_over_seeds():
    totals = [unstopped("nhsmail", s, background_days=0.05).storm_messages for s in range(3, 11)]
    assert abs(statistics.mean(totals) - MESSAGES) <= 0.05 * MESSAGES, totals


def test_same_seed_same_events_other_seed_other_events():
    a = unstopped("small-org", 7, background_days=1.0)
    b = unstopped("small-org", 7, background_days=1.0)
    c = unstopped("small-org", 8, background_days=1.0)
    assert a.digest == b.digest and a.events == b.events and a.storm_log == b.storm_log
    assert a.digest != c.digest


class FreezeAfter:
    """A gateway that freezes one list after its k-th delivered post."""

    def __init__(self, address: str, k: int):
        self.address, self.k, self.seen, self.frozen_at = address, k, 0, None

    def submit(self, event: MailEvent) -> bool:
        if self.address not in event.lists:
            return True
        if self.frozen_at is not None:
            return False
        self.seen += 1
        if self.seen >= self.k:
            self.frozen_at = event.event_time
        return True


@pytest.mark.parametrize("name", ["nhsmail", "small-org"])
def test_closed_loop_a_frozen_list_gets_no_further_deliveries_and_the_storm_dies_down(name):
    sc = scenario(name, 0, background_days=0.3)
    open_run = scenario_events(sc, OpenGateway())
    gate = FreezeAfter(sc.storm.list_address, 4)  # the first post and three reply-alls
    run = scenario_events(scenario(name, 0, background_days=0.3), gate)
    delivered = [(t, d) for t, d, ok, _ in run.storm_log if ok]
    assert len(delivered) == 4
    assert all(t <= gate.frozen_at for t, _ in delivered)
    assert run.held == run.storm_messages - 4 > 0
    # the replies to replies stop: far fewer messages are even submitted than in the unstopped storm
    assert run.storm_messages < 0.9 * open_run.storm_messages
    # and each run is the unstopped one, pruned: its first four storm messages are the same
    assert run.storm_log[:4] == [(t, d, True, r) for t, d, _, r in open_run.storm_log[:4]]


def test_benign_fan_out_follows_the_traces_heavy_tail():
    org = Org(people=20_000, msgs_per_day=2.0, all_staff=False, bulletins=1, discussions=1)
    start = epoch("2016-11-14T00:00:00Z")
    direct = [e for e in benign_events(org, start, start + 86400, seed=1) if not e.lists]
    ones = sum(1 for e in direct if not e.in_reply_to and e.deliveries == 1)
    originals = sum(1 for e in direct if not e.in_reply_to)
    trace_share = TRACE_FANOUT[1] / sum(TRACE_FANOUT.values())
    assert abs(ones / originals - trace_share) < 0.03
    assert max(e.deliveries for e in direct) >= 30
    # the working day: most mail between 08:00 and 18:00
    hours = [int((e.event_time - start) // 3600) for e in direct]
    assert sum(8 <= h < 18 for h in hours) > 0.75 * len(hours)
    assert sum(1 for e in direct if e.in_reply_to) > 0.2 * len(direct)


def test_scales_to_an_nhsmail_sized_organisation_without_per_person_state():
    import tracemalloc

    org = Org(domain="nhs.net", people=1_200_000, sample=0.001, bulletins=5, discussions=5)
    start = epoch("2016-11-14T08:00:00Z")
    tracemalloc.start()
    events = list(benign_events(org, start, start + 3600, seed=0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert events and peak < 30_000_000
    assert any(int(e.sender.split("@")[0][1:]) > 600_000 for e in events if e.sender.startswith("p"))


def test_cli_writes_valid_events_deterministically(tmp_path, capsys):
    from stream_jobs.cli import main

    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["simulate", "--scenario", "small-org", "--seed", "3", "--days", "0.5", "-o", str(out1)]) == 0
    assert main(["simulate", "--scenario", "small-org", "--seed", "3", "--days", "0.5", "-o", str(out2)]) == 0
    assert out1.read_bytes() == out2.read_bytes()
    lines = out1.read_bytes().splitlines()
    events = [parse_event(line) for line in lines]
    assert [e.event_time for e in events] == sorted(e.event_time for e in events)
    assert any(e.lists.get("all-staff@smallco.example") for e in events)
    assert "storm list" in capsys.readouterr().err


def test_cli_closed_loop_holds_posts_to_the_frozen_list(tmp_path, capsys):
    from stream_jobs.cli import main

    out = tmp_path / "c.jsonl"
    assert main(["simulate", "--scenario", "small-org", "--seed", "3", "--days", "1", "--closed-loop",
                 "-o", str(out)]) == 0
    import re

    err = capsys.readouterr().err
    m = re.search(r"(\d+) events, (\d+) held; storm list: (\d+) messages, (\d+) delivered", err)
    assert m, err
    events, held, storm, delivered = map(int, m.groups())
    assert held > 0 and delivered <= 4  # the first post and at most three reply-alls
    assert len(out.read_bytes().splitlines()) == events  # held messages are still submitted events


@pytest.mark.parametrize("name,days,sample,digest", [("small-org", 0.5, None, "e164efa13ffeb347612ffd5c"),
                                                     ("nhsmail", 0.5, 0.02, "0dee5370534d7e0b09c9d459"),
                                                     ("benign-week", 1.0, 0.02, "67d17aea41a1a66cc38c850a")])
def test_the_scenarios_of_issue_2_are_unchanged_byte_for_byte(name, days, sample, digest):
    # digests taken before the lively lists and the cold starts were added (issue 14): same seed, same events
    assert unstopped(name, 3, background_days=days, sample=sample).digest == digest


def test_lively_discussion_lists_have_the_shape_of_issue_14():
    from collections import defaultdict

    sc = scenario("lively-cold", 4, background_days=3.0, sample=0.01)
    assert sc.cold and sc.storm is None and sc.org.lively == 8
    posts: dict[str, list[MailEvent]] = defaultdict(list)
    for ev in benign_events(sc.org, sc.start, sc.end, sc.seed):
        for lst in ev.lists:
            if lst.startswith("forum"):
                posts[lst].append(ev)
    assert len(posts) == 8
    for lst, evs in posts.items():
        members = {ev.lists[lst] for ev in evs}
        assert len(members) == 1 and 200 <= members.pop() <= 3000
        assert 20 <= len({ev.sender for ev in evs}) <= 60  # of about 60 active members
        by_root: dict[str, list[MailEvent]] = defaultdict(list)
        ids = {}
        for ev in evs:
            root = ev.message_id if not ev.in_reply_to else ids[ev.in_reply_to]
            ids[ev.message_id] = root
            by_root[root].append(ev)
        gaps = []
        for thread in by_root.values():
            assert not thread[0].in_reply_to and 4 <= len(thread) - 1 <= 15
            gaps += [b.event_time - a.event_time for a, b in zip(thread, thread[1:])]
        assert 120 < sum(gaps) / len(gaps) < 300  # a few minutes apart
        # people answer each other: some replies answer a reply, some people answer twice
        assert any(ids.get(ev.in_reply_to) != ev.in_reply_to for ev in evs if ev.in_reply_to)
        assert any(len({e.sender for e in t}) < len(t) for t in by_root.values())


def test_a_cold_start_begins_on_the_storm_day_with_the_same_storm():
    warm, cold = scenario("small-org", 2), scenario("small-org-cold", 2)
    assert cold.cold and not warm.cold and cold.criterion == 5 and warm.criterion == 3
    assert cold.storm == warm.storm and cold.start == 86400 * (warm.storm.at // 86400) > warm.start
    assert scenario("nhsmail-cold", 0).criterion == 1
    a = unstopped("small-org-cold", 2)
    assert a.digest == unstopped("small-org-cold", 2).digest != unstopped("small-org-cold", 3).digest
    assert a.storm_log == unstopped("small-org", 2, background_days=0.2).storm_log  # the storm itself is the same
