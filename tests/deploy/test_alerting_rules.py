"""deploy/prometheus/rules.yml: valid for promtool, and every alert fires and stays quiet as its unit tests say."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules.test.yml"


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool missing: Debian's prometheus package is not installed (make install installs it)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}


def test_promtool_check_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alerts())} rules found" in result.stdout


def test_promtool_check_rules_rejects_a_broken_rule(tmp_path):
    broken = tmp_path / "rules.yml"
    broken.write_text(RULES.read_text().replace("expr: up{job=\"stormguard\"} == 0", "expr: up{job=\"stormguard\" == 0", 1))
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_the_unit_tests_would_catch_a_rule_that_never_fires(tmp_path):
    """Loosen nothing, break one threshold: promtool test rules must fail (the tests are not vacuous)."""
    (tmp_path / "rules.yml").write_text(RULES.read_text().replace(
        "increase(stormguard_freezes_capped_total{job=\"stormguard\"}[1h])) > 0",
        "increase(stormguard_freezes_capped_total{job=\"stormguard\"}[1h])) > 1000", 1))
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0 and "StormguardFreezeCapReached" in result.stdout + result.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_stays_quiet():
    fires, quiet = set(), set()
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == set(alerts()), set(alerts()) ^ fires
    assert quiet == set(alerts()), set(alerts()) ^ quiet


def test_the_issue_s_conditions_are_all_covered():
    names = set(alerts())
    for wanted in ("StormguardDown", "StormguardNotReady", "StormguardConsumerLagGrowing", "StormguardDeadLettersFast",
                   "StormguardOutboxBacklogGrowing", "StormguardFreezeCapReached", "StormguardHistoryLearningSlow"):
        assert wanted in names
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_metric_the_rules_use_is_exported():
    """Names in the rules exist in the registry the worker and stormguard deliver serve (no typo'd metric)."""
    from stream_jobs import metrics
    from stream_jobs.actions import deliver

    deliver._metrics()  # registers stormguard_actions_delivered_total
    families = list(metrics.REGISTRY.collect())
    exported = {s.name for family in families for s in family.samples}
    exported |= {f"{f.name}_total" for f in families if f.type == "counter"}  # labelled, no child yet
    exported |= {"stormguard_consumer_lag"}  # per assigned partition: no series until a worker holds one
    used = set()
    for rule in alerts().values():
        used |= set(re.findall(r"\b(stormguard_[a-z_]+)", rule["expr"]))
    assert used and used <= exported, used - exported


@pytest.mark.live
def test_prometheus_evaluates_the_rules_on_a_real_worker_and_alerts_alertmanager(tmp_path):
    """Debian's Prometheus loads rules.yml, scrapes a real worker and a dead port, and sends
    StormguardDown to Debian's Alertmanager; the healthy worker raises nothing."""
    from stream_jobs.kafka.broker import EmbeddedBroker, free_port
    from stream_jobs.observability.localstack import Prometheus, Worker
    from tests.stream_jobs.receivers import Alertmanager, RecordingServer, alertmanager_config

    # The shipped rules, with StormguardDown's `for:` cut to nothing so that it fires within seconds.
    doc = yaml.safe_load(RULES.read_text())
    for rule in doc["groups"][0]["rules"]:
        if rule["alert"] == "StormguardDown":
            rule["for"] = "0s"
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(doc))
    dead = f"127.0.0.1:{free_port()}"
    with EmbeddedBroker(port=free_port()) as broker, RecordingServer(status=200) as rx, \
            Alertmanager(tmp_path, alertmanager_config(rx.url + "/notify", group_wait="1s")) as am:
        worker = Worker(broker.url, tmp_path).start()
        try:
            with Prometheus([worker.target, dead], workdir=tmp_path / "prom", rule_files=[str(rules)],
                            alertmanagers=[am.url.split("//", 1)[1]]) as prom:
                prom.wait_for(f'up{{instance="{worker.target}"}} == 1', 30)
                assert prom.wait_for(f'stormguard_ready{{instance="{worker.target}"}} == 1', 30)
                firing = prom.wait_for('ALERTS{alertstate="firing"}', 60)
                assert [(a["metric"]["alertname"], a["metric"]["instance"]) for a in firing] == \
                    [("StormguardDown", dead)]
                # Every rule was evaluated without error on the real series.
                groups = prom.api("rules")["data"]["groups"]
                assert {r["health"] for g in groups for r in g["rules"]} == {"ok"}, groups
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not am.alerts(alertname="StormguardDown"):
                    time.sleep(0.5)
                (alert,) = am.alerts(alertname="StormguardDown")
                assert alert["labels"]["instance"] == dead and alert["labels"]["severity"] == "critical"
                assert alert["annotations"]["summary"] == f"Stormguard process {dead} is down"
        finally:
            worker.stop()
