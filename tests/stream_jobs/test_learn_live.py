"""``stormguard learn``: a list learned from an archive is not young on the worker's first day (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, STORMGUARD, produce_lines, read_topic, wait_for
from tests.scenarios import T0, background, lines

pytestmark = pytest.mark.live

LIST, MEMBERS = "bulletin@nhs.net", 5_000
DAY = 86_400.0


def _bulletin(k: int) -> dict:
    return {"message_id": f"bul{k}", "timestamp": T0 + 2500 + k * DAY, "sender": "comms@nhs.net",
            "recipients": [LIST], "lists": {LIST: MEMBERS}, "subject": f"Weekly bulletin {k}"}


def _today() -> list[dict]:
    """A bulletin from its usual sender, then reply-alls ten minutes apart: never a burst, 15,000
    deliveries by the third (under the cold-start harm bar): frozen at the third only where the list's
    norm is known."""
    post = _bulletin(3)
    return [post] + [{"message_id": f"re{j}", "timestamp": post["timestamp"] + 600 * (j + 1),
                      "sender": f"x{j}@nhs.net", "recipients": [LIST], "lists": {LIST: MEMBERS},
                      "subject": "RE: Weekly bulletin 3", "in_reply_to": "bul3"} for j in range(4)]


def _learn(path, broker, app_id, *extra):
    return subprocess.run(STORMGUARD + ["learn", str(path), "--broker", broker.url, "--no-progress", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "STORMGUARD_APP_ID": app_id})


def _freezes(records) -> list[tuple[str, str]]:
    return [(a["list"], a["message_id"]) for a in map(json.loads, records) if a["kind"] == "freeze"]


def test_an_archive_learned_before_the_first_start_makes_the_first_day_warm(broker, start_worker, tmp_path):
    archive = background(300) + [_bulletin(k) for k in range(3)]
    path = tmp_path / "archive.jsonl"
    path.write_bytes(b"\n".join(lines(archive)) + b"\n")
    app_id = "sg-learned"

    done = _learn(path, broker, app_id)
    assert done.returncode == 0, done.stderr
    assert f"learned {len(archive)} event(s)" in done.stderr and "1 list model(s) written" in done.stderr
    models = read_topic(broker.bootstrap, f"{app_id}-list_models-changelog")
    assert {json.loads(r.key) for r in models} == {LIST, "__stormguard_meta__"}

    again = _learn(path, broker, app_id)  # the changelog is no longer empty: refused, nothing written
    assert again.returncode == 2 and "--force overwrites it" in again.stderr
    assert len(read_topic(broker.bootstrap, f"{app_id}-list_models-changelog")) == len(models)

    worker = start_worker(broker.url, app_id=app_id)
    today = _today()
    produce_lines(broker.bootstrap, lines(today))
    actions = wait_for(lambda: _freezes(r.value for r in read_topic(broker.bootstrap, "stormguard.actions")),
                       what="a freeze")
    assert actions == [(LIST, "re2")]  # the third reply-all: the list's norm came from the archive
    assert wait_for(lambda: worker.get("/healthz")["records"] >= len(today))

    # offline: the archive as history, then today, decides the same; today alone (a cold start) does not freeze
    both, alone = tmp_path / "both.jsonl", tmp_path / "today.jsonl"
    both.write_bytes(b"\n".join(lines(archive + today)) + b"\n")
    alone.write_bytes(b"\n".join(lines(today)) + b"\n")
    score = lambda p, *a: subprocess.run(STORMGUARD + ["score", str(p), *a], cwd=ROOT,  # noqa: E731
                                         capture_output=True, check=True).stdout.splitlines()
    assert _freezes(score(both, "--learn-only-until", str(archive[-1]["timestamp"]))) == actions
    assert _freezes(score(alone)) == []


def test_archive_events_the_topic_holds_are_left_to_the_worker(broker, tmp_path):
    # mail.events already holds the last bulletin: the archive's copy of it is not learned twice
    produce_lines(broker.bootstrap, lines([_bulletin(2)]))
    path = tmp_path / "archive.jsonl"
    path.write_bytes(b"\n".join(lines(background(200) + [_bulletin(k) for k in range(3)])) + b"\n")
    done = _learn(path, broker, "sg-overlap")
    assert done.returncode == 0, done.stderr
    assert "skipped 1 event(s) at or after" in done.stderr and "learned 202 event(s)" in done.stderr


def test_a_postfix_maillog_is_learned_through_the_ingest_parser(broker, tmp_path):
    here = ROOT / "tests" / "stream_jobs"
    done = subprocess.run(STORMGUARD + ["learn", str(here / "postfix_maillog_delivered.log"), "--broker", broker.url,
                                        "--lists", str(here / "postfix_virtual_lists.txt"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "STORMGUARD_APP_ID": "sg-maillog"})
    assert done.returncode == 0, done.stderr
    keys = {json.loads(r.key) for r in read_topic(broker.bootstrap, "sg-maillog-list_models-changelog")}
    assert "__stormguard_meta__" in keys and len(keys) >= 2  # at least one list from the maillog


def test_nothing_to_learn_is_an_error_that_writes_nothing(broker, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"not json\n{\"message_id\": 1}\n")
    done = _learn(path, broker, "sg-bad")
    assert done.returncode == 1 and "nothing learned" in done.stderr and "rejected:" in done.stderr
    assert read_topic(broker.bootstrap, "sg-bad-list_models-changelog") == []
    missing = _learn(tmp_path / "nope.jsonl", broker, "sg-bad")
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_a_restarted_worker_keeps_every_model_it_saved(broker, start_worker):
    """Each save writes several models and the stream's counters in one batch; the embedded broker reports
    such a partition's end one record short, so without the end marker the counters (written last) were
    lost at every restart and a restarted worker started cold."""
    lists = [f"l{i}@nhs.net" for i in range(5)]
    events = background(150) + [{"message_id": f"p{i}", "timestamp": T0 + 2000 + i, "sender": "comms@nhs.net",
                                 "recipients": [lst], "lists": {lst: 900}, "subject": "news"}
                                for i, lst in enumerate(lists)]
    worker = start_worker(broker.url)
    produce_lines(broker.bootstrap, lines(events))
    seen = wait_for(lambda: (h := worker.get("/healthz"))["events_seen"] >= len(events) and h["events_seen"])
    wait_for(lambda: {json.loads(r.key) for r in read_topic(broker.bootstrap,
                                                              f"{worker.app_id}-list_models-changelog")}
             >= set(lists) | {"__stormguard_meta__"}, what="the models saved")
    worker.stop()
    again = start_worker(broker.url, app_id=worker.app_id)
    assert again.get("/healthz")["events_seen"] == seen  # the counters came back: the detector is warm
