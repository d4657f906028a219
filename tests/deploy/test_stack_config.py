"""docker-compose.yml against the Compose specification's JSON schema; Prometheus configs by promtool."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from stream_jobs.observability.localstack import scrape_config

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "deploy" / "schemas" / "compose-spec.json").read_text())
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_schema_is_the_compose_specification():
    assert SCHEMA["title"] == "Compose Specification"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_compose_file_is_valid_compose():
    assert _errors(_compose()) == []


def test_the_schema_check_rejects_broken_compose():
    bad = copy.deepcopy(_compose())
    bad["services"]["kafka"]["restart_policy"] = "always"  # not a service key
    assert _errors(bad)
    bad = copy.deepcopy(_compose())
    bad["services"]["grafana"]["ports"] = "3000:3000"  # must be a list
    assert _errors(bad)


def test_stack_has_the_production_shape():
    services = _compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert not any("zookeeper" in name for name in services)
    workers = [s for name, s in services.items() if name in ("stormguard-1", "stormguard-2")]
    assert len(workers) == 2
    assert {w["environment"]["STORMGUARD_APP_ID"] for w in workers} == {"stormguard"}  # one group: shared partitions
    assert int(workers[0]["environment"]["STORMGUARD_PARTITIONS"]) >= 2
    assert all(w["command"][:1] == ["run"] and "kafka://kafka:9092" in w["command"] for w in workers)
    sim = services["simulator"]["command"]
    assert sim[0] == "simulate" and sim[sim.index("--scenario") + 1] == "nhsmail"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    assert "mailman-core" in services["mailman-core"]["image"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["stormguard"]' in dockerfile


def test_prometheus_scrapes_both_workers_as_the_dashboards_expect():
    from stream_jobs.observability.dashboards import JOB

    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == JOB)
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    services = _compose()["services"]
    assert sorted(targets) == sorted(f"{name}:6066" for name in services if name.startswith("stormguard-"))
    assert services["stormguard-deliver"]["command"][0] == "deliver"  # outbox metrics come from here
    assert "6066" in services["stormguard-deliver"]["command"]


def _promtool(path: Path) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: Debian's prometheus package is not installed (make install installs it)")
    return subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_stack_config():
    result = _promtool(PROMETHEUS_YML)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_live_test_config_and_rejects_a_broken_one(tmp_path):
    good = tmp_path / "good.yml"
    good.write_text(scrape_config(["127.0.0.1:6066"]))
    assert _promtool(good).returncode == 0
    bad = tmp_path / "bad.yml"
    bad.write_text(PROMETHEUS_YML.read_text().replace("scrape_interval: 5s", "scrape_interval: often", 1))
    assert _promtool(bad).returncode != 0


ALERTMANAGER_YML = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


def _amtool(path: Path) -> subprocess.CompletedProcess:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.fail("amtool missing: Debian's prometheus-alertmanager package is not installed (make install does)")
    return subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True, timeout=60)


def test_amtool_accepts_the_example_route_and_rejects_a_broken_one(tmp_path):
    result = _amtool(ALERTMANAGER_YML)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "alertmanager.yml"
    bad.write_text(ALERTMANAGER_YML.read_text().replace("receiver: mail-on-call", "receiver: nobody", 1))
    assert _amtool(bad).returncode != 0  # a route to a receiver that does not exist


def test_alerts_flow_to_the_stack_s_alertmanager():
    services = _compose()["services"]
    am = services["alertmanager"]
    assert am["image"].startswith("prom/alertmanager:")
    assert "--cluster.listen-address=" in am["command"]
    assert any(v.startswith("./deploy/alertmanager/alertmanager.yml:") for v in am["volumes"])
    # Prometheus sends its rules' alerts there, and loads the rules compose mounts next to its config.
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = [t for a in config["alerting"]["alertmanagers"] for sc in a["static_configs"] for t in sc["targets"]]
    assert targets == ["alertmanager:9093"]
    assert config["rule_files"] == ["rules.yml"]
    assert "./deploy/prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in services["prometheus"]["volumes"]
    # stormguard deliver posts its storm alerts to the same one.
    deliver = services["stormguard-deliver"]["environment"]
    assert deliver["STORMGUARD_ALERTMANAGER_URLS"] == "http://alertmanager:9093"
    from stream_jobs.actions.sinks import sinks_from_env

    env = {k: str(v) for k, v in deliver.items() if not k.endswith(("_FILE", "PASSWORD"))}
    assert "alertmanager" in [s.kind for s in sinks_from_env(env)]
