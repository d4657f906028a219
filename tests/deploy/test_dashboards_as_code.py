"""The committed dashboards are what the code generates, and only query metrics the worker exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from stream_jobs import metrics
from stream_jobs.observability import dashboards

ROOT = Path(__file__).resolve().parents[2]
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"


def _models() -> dict[str, dict]:
    return {name: json.loads(text) for name, text in dashboards.generate().items()}


def test_committed_json_equals_generated():
    generated = dashboards.generate()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in dashboards.OUT_DIR.glob("*.json")}
    assert sorted(on_disk) == sorted(generated), "run: python -m stream_jobs.observability.dashboards"
    for name, text in generated.items():
        assert on_disk[name] == text, f"{name} is stale: run python -m stream_jobs.observability.dashboards"
    assert dashboards.main(["--check"]) == 0


def test_check_mode_notices_a_hand_edit(tmp_path):
    dashboards.main(["--out", str(tmp_path)])
    assert dashboards.main(["--out", str(tmp_path), "--check"]) == 0
    path = tmp_path / "overview.json"
    path.write_text(path.read_text().replace("Frozen lists", "Frozen list"))
    assert dashboards.main(["--out", str(tmp_path), "--check"]) == 1


def test_overview_and_drilldown_shape():
    models = _models()
    assert set(models) == {"overview.json", "list.json"}
    for name, model in models.items():
        anns = model["annotations"]["list"]
        tagged = [a for a in anns if a.get("target", {}).get("tags") == ["stormguard"]]
        assert tagged and tagged[0]["datasource"]["type"] == "grafana", name
        assert tagged[0]["enable"] is True
        assert model["uid"].startswith("stormguard-")
    titles = {p["title"] for p in models["overview.json"]["panels"]}
    for needed in ("Frozen lists", "Events per second", "Actions by kind", "Produce → action",
                   "Consumer lag by partition", "Delivery failures", "Busiest lists: reply-alls per minute"):
        assert needed in titles
    variables = models["list.json"]["templating"]["list"]
    assert [v["name"] for v in variables] == ["list"]
    assert variables[0]["query"].startswith("label_values(stormguard_list_")
    for q in dashboards.panel_queries(models["list.json"]):
        if q["where"].startswith("panel"):
            assert 'list="$list"' in q["expr"], q


def _exported_names() -> set[str]:
    names = set()
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
            names.add(family.name + suffix)
    return names


def test_every_queried_metric_is_exported_by_the_worker():
    exported = _exported_names()
    queried = set()
    for model in _models().values():
        for q in [*dashboards.panel_queries(model), *({"expr": v["query"]} for v in dashboards.variable_queries(model))]:
            queried.update(re.findall(r"\b(stormguard_[a-z_]+)", q["expr"]))
    assert queried, "no stormguard metric queried?"
    missing = sorted(queried - exported)
    assert not missing, f"dashboards query metrics the worker does not export: {missing}"


def test_every_panel_uses_the_provisioned_datasource():
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in ds["datasources"] if d["type"] == "prometheus"}
    assert uids == {dashboards.PROMETHEUS_UID}
    for model in _models().values():
        for panel in model["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == dashboards.PROMETHEUS_UID, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == dashboards.PROMETHEUS_UID


def test_dashboard_provider_points_where_compose_mounts_the_json():
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "stormguard.yml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    mount = next(v for v in volumes if v.startswith("./deploy/grafana/dashboards:"))
    assert mount.split(":")[1] == provider["options"]["path"]
    assert provider["type"] == "file"
