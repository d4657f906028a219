"""A first deployment on a topic that already holds days of mail: learned from, never acted on (issue 14)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT, STORMGUARD, produce_lines, read_topic, wait_for
from tests.scenarios import T0, background, lines, nhsmail_storm

pytestmark = pytest.mark.live


def _actions(broker) -> list[dict]:
    return [json.loads(r.value) for r in read_topic(broker.bootstrap, "stormguard.actions")]


def test_history_in_the_topic_is_learned_then_the_worker_goes_live(broker, start_worker, tmp_path):
    # days ago: ordinary mail and a storm that was dealt with then; it must not be frozen now
    history = background(300) + nhsmail_storm(T0 + 4000, replies=6)
    produce_lines(broker.bootstrap, lines(history))
    worker = start_worker(broker.url)
    health = wait_for(lambda: (h := worker.get("/healthz"))["records"] >= len(history) and h)
    assert health["history"]["learn_only_until"] == T0 + 4000 + 40 + 5 * 7  # the newest event in the topic
    assert health["history"]["events_learned"] == len(history) and health["history"]["live"] is False
    assert _actions(broker) == []
    assert read_topic(broker.bootstrap, "stormguard.list-state") == []
    assert worker.get("/api/lists/all@nhs.net")["frozen"] is False

    # a restart (before or after any commit) keeps the same cut-off: history stays history
    worker.kill()
    worker = start_worker(broker.url, app_id=worker.app_id)
    assert worker.get("/healthz")["history"]["learn_only_until"] == health["history"]["learn_only_until"]

    # today: a new storm on a bigger list; it is acted on
    today = nhsmail_storm(T0 + 90_000, replies=3, members=900_000, lst="everyone@nhs.net")
    for e in today:
        e["message_id"] = "today-" + e["message_id"]
        if e.get("in_reply_to"):
            e["in_reply_to"] = "today-" + e["in_reply_to"]
    produce_lines(broker.bootstrap, lines(today))
    freeze = wait_for(lambda: [a for a in _actions(broker) if a["kind"] == "freeze"])
    assert [(a["list"], a["message_id"]) for a in freeze] == [("everyone@nhs.net", "today-reply0")]
    assert wait_for(lambda: worker.get("/healthz")["history"]["live"])

    # offline with the same cut-off: the same decisions
    path = tmp_path / "all.jsonl"
    path.write_bytes(b"\n".join(lines(history + today)) + b"\n")
    offline = subprocess.run(STORMGUARD + ["score", str(path), "--learn-only-until",
                                           str(health["history"]["learn_only_until"])],
                             cwd=ROOT, capture_output=True, check=True)
    # (scores may differ: a restarted worker re-learns sender habits, which are not in the changelog)
    key = lambda a: (a["kind"], a["list"], a["message_id"], a["detector"], a["action_id"])  # noqa: E731
    assert [key(json.loads(line)) for line in offline.stdout.splitlines()] == [key(a) for a in _actions(broker)]
