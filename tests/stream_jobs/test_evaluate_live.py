"""Live: the nhsmail scenario through a real broker and worker, the simulator as the gateway."""

from __future__ import annotations

import pytest

from stream_jobs.evaluation.evaluate import evaluate_storm
from stream_jobs.evaluation.gateways import StormguardGateway
from stream_jobs.evaluation.simulate import scenario, scenario_events

pytestmark = pytest.mark.live


def test_nhsmail_is_frozen_live_after_one_reply_all_and_live_matches_offline():
    from stream_jobs.evaluation.gateways import LiveSession

    sc = scenario("nhsmail", 0, background_days=0.25)
    session = LiveSession().start()
    try:
        live = session.gateway(sc)
        result = evaluate_storm(sc, live_gateway=live)
    finally:
        session.stop()
    sg, ex = result.guards["stormguard"], result.guards["exchange"]
    assert sg.replies_delivered_before_freeze == 1 and sg.replies_delivered == 1
    assert sg.prevented > ex.prevented
    # the live worker took the same decisions as the detectors in-process
    offline = StormguardGateway()
    run = scenario_events(sc, offline)
    assert sum(d for _, d, ok, _ in run.storm_log if ok) == sg.deliveries
    assert [(a.kind, a.list, a.message_id) for a in live.actions] == \
        [(a.kind, a.list, a.message_id) for a in offline.actions]
