"""Every panel query of the generated dashboards, answered by a real Prometheus during a storm replay.

A real embedded broker, a real ``stormguard run`` worker and Debian's
``prometheus`` binary scraping it every second; no mocks anywhere.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from stream_jobs.observability import dashboards
from stream_jobs.kafka.broker import EmbeddedBroker, free_port
from stream_jobs.observability.localstack import STORM_LIST, Prometheus, Worker, produce, storm_events

pytestmark = pytest.mark.live

BAD = [b"not json at all", b'{"message_id": "m", "timestamp": 5}']


def _value(result: list) -> float:
    return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.fail("Debian's prometheus package is not installed (make install installs it)")
    tmp = tmp_path_factory.mktemp("promlive")
    with EmbeddedBroker(port=free_port()) as broker:
        worker = Worker(broker.url, tmp).start()
        try:
            with Prometheus([worker.target], workdir=tmp / "prom") as prom:
                prom.wait_for('up{job="stormguard"} == 1', timeout=30)
                records = storm_events(end=time.time())
                started = time.time()
                produce(broker.url, records[:300] + BAD + records[300:], rate=200.0)
                expected = len(records)
                prom.wait_for(f'sum(stormguard_events_processed_total{{job="stormguard"}}) >= {expected}', 60)
                prom.wait_for('sum(stormguard_frozen_lists{job="stormguard"}) >= 1', 30)
                time.sleep(3)  # a few more scrapes, so rates over the last minute have two points
                yield {"prom": prom, "worker": worker, "events": expected, "started": started}
        finally:
            worker.stop()


def test_worker_exports_what_the_storm_did(stack):
    prom = stack["prom"]
    j = 'job="stormguard"'
    assert _value(prom.wait_for(f"sum(stormguard_events_processed_total{{{j}}})")) == stack["events"]
    assert _value(prom.wait_for(f'sum(stormguard_events_invalid_total{{{j}}})')) == len(BAD)
    assert _value(prom.wait_for(f'sum(stormguard_actions_total{{{j},kind="freeze"}})')) == 1
    assert _value(prom.wait_for(f"sum(stormguard_frozen_lists{{{j}}})")) == 1
    frozen = prom.wait_for(f"max by (list) (stormguard_list_frozen{{{j}}}) == 1")
    assert [r["metric"]["list"] for r in frozen] == [STORM_LIST]
    busiest = prom.wait_for(f"topk(1, max by (list) (stormguard_list_deliveries_per_minute{{{j}}}))")
    assert busiest[0]["metric"]["list"] == STORM_LIST
    # everything was read: the lag drops to zero once the worker caught up
    deadline = time.monotonic() + 20
    while _value(prom.wait_for(f"sum(stormguard_consumer_lag{{{j}}})")) != 0:
        assert time.monotonic() < deadline, "consumer lag never came back to 0"
        time.sleep(1)
    # latency is real: the freeze came well inside the 1 s promise (slack for a busy 2-core machine),
    # and every record was scored within seconds of being produced
    p99 = prom.wait_for(f"histogram_quantile(0.99, sum by (le) (stormguard_produce_to_action_seconds_bucket{{{j}}}))")
    assert 0 <= _value(p99) <= 2.5, p99
    p50 = prom.wait_for(f"histogram_quantile(0.5, sum by (le) (stormguard_record_latency_seconds_bucket{{{j}}}))")
    assert 0 <= _value(p50) <= 5, p50
    # bounded cardinality: one series per exported list, far fewer than senders
    series = prom.wait_for(f"count(stormguard_list_deliveries_per_minute{{{j}}})")
    assert _value(series) <= 20


@pytest.mark.parametrize("name", sorted(dashboards.DASHBOARDS))
def test_every_panel_query_returns_data(stack, name):
    prom = stack["prom"]
    model = json.loads(dashboards.generate()[f"{name}.json"])
    variables = {}
    for var in dashboards.variable_queries(model):
        # label_values(METRIC, LABEL), as Grafana resolves it: the label's values among METRIC's series
        inner = var["query"][len("label_values("):-1]
        metric, label = (s.strip() for s in inner.rsplit(",", 1))
        body = prom.api(f"label/{label}/values", **{"match[]": metric})
        assert body["status"] == "success", body
        assert STORM_LIST in body["data"], (var, body["data"])
        variables[var["name"]] = STORM_LIST
    # the check below can see absence: a metric nobody exports answers with nothing
    assert prom.query('stormguard_no_such_metric{job="stormguard"}')["data"]["result"] == []
    queries = list(dashboards.panel_queries(model))
    assert len(queries) >= 8
    failures = []
    for q in queries:
        expr = dashboards.substitute(q["expr"], variables)
        assert "$" not in expr, expr
        if q["where"].startswith("annotation"):
            body = prom.query_range(expr, stack["started"] - 60, time.time(), step=1.0)
        else:
            body = prom.query(expr)
        if body.get("status") != "success":
            failures.append(f"{q['where']}: {expr}: error {body.get('error')}")
        elif not body["data"]["result"]:
            failures.append(f"{q['where']}: {expr}: no data")
    assert not failures, "\n".join(failures)
