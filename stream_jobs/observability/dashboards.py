"""Grafana dashboards as code, built with Grafana's own grafana-foundation-sdk.

``python -m stream_jobs.observability.dashboards`` writes ``deploy/grafana/dashboards/*.json``;
``--check`` exits 1 if the committed files differ from what this code builds
(the test suite checks the same). Edit the code, never the JSON.

Two dashboards, both carrying the Stormguard annotations (Grafana annotations
tagged ``stormguard``, posted by the action sinks, and freezes seen in the
metrics themselves):

* ``stormguard-overview``: traffic, storms, frozen lists, latency, delivery;
* ``stormguard-list``: one list (template variable ``list``) in detail.

Every panel query uses only metrics that :mod:`stream_jobs.metrics` exports;
the live test evaluates each of them against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

#: The Prometheus datasource, as provisioned in deploy/grafana/provisioning/datasources/.
PROMETHEUS_UID = "stormguard-prometheus"
#: The scrape job of the workers (deploy/prometheus/prometheus.yml).
JOB = "stormguard"
ANNOTATION_TAG = "stormguard"
OUT_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"


def _sdk():
    from grafana_foundation_sdk.builders import dashboard as dash
    from grafana_foundation_sdk.builders import prometheus, stat, timeseries
    from grafana_foundation_sdk.builders.common import VizLegendOptions
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    return dash, prometheus, stat, timeseries, VizLegendOptions, common, DataSourceRef


def _prom():
    *_, DataSourceRef = _sdk()
    return DataSourceRef(type_val="prometheus", uid=PROMETHEUS_UID)


def _query(expr: str, legend: str = "__auto", ref: str = "A", instant: bool = False):
    _, prometheus, *_ = _sdk()
    q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(_prom())
    return q.instant() if instant else q.range()


def _timeseries(title: str, description: str, unit: str, queries: list[tuple[str, str]], *,
                width: int = 8, height: int = 8, bars: bool = False):
    dash, _, _, timeseries, VizLegendOptions, common, _ = _sdk()
    panel = (timeseries.Panel().title(title).description(description).unit(unit).min(0)
             .span(width).height(height).datasource(_prom()).fill_opacity(15 if not bars else 80)
             .legend(VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM)))
    if bars:
        panel = panel.draw_style(common.GraphDrawStyle.BARS)
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    return panel


def _stat(title: str, description: str, unit: str, expr: str, *, width: int = 4, height: int = 4,
          red_at: float | None = None, legend: str = "__auto"):
    dash, _, stat, _, _, common, _ = _sdk()
    from grafana_foundation_sdk.builders.common import ReduceDataOptions
    from grafana_foundation_sdk.models.dashboard import Threshold, ThresholdsMode

    panel = (stat.Panel().title(title).description(description).unit(unit).span(width).height(height)
             .datasource(_prom()).graph_mode(common.BigValueGraphMode.AREA)
             .color_mode(common.BigValueColorMode.BACKGROUND)
             .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
             .with_target(_query(expr, legend, instant=False)))
    steps = [Threshold(color="green", value=None)]
    if red_at is not None:
        steps.append(Threshold(color="red", value=red_at))
    return panel.thresholds(dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps))


def _annotations(dash):
    """Both dashboards: actions posted to Grafana (tag ``stormguard``) and freezes seen in metrics."""
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    tagged = (dash.AnnotationQuery().name("Stormguard actions").enable(True).icon_color("red")
              .datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --"))
              .target(dash.AnnotationTarget().type("tags").tags([ANNOTATION_TAG]).match_any(True).limit(200))
              .type("tags"))
    from_metrics = (dash.AnnotationQuery().name("Freezes (metrics)").enable(True).icon_color("orange")
                    .datasource(_prom())
                    .expr(f'sum(increase(stormguard_actions_total{{job="{JOB}",kind="freeze"}}[1m])) > 0'))
    return [tagged, from_metrics]


def _rate(metric: str, by: str = "", selector: str = "") -> str:
    inner = f'rate({metric}{{job="{JOB}"{selector}}}[$__rate_interval])'
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def _quantile(q: float, metric: str) -> str:
    return (f'histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{job="{JOB}"}}[$__rate_interval])))')


def overview():
    """Traffic, storms, frozen lists, latency, delivery: what an operator watches."""
    dash, *_ = _sdk()
    from grafana_foundation_sdk.models.dashboard import DashboardCursorSync

    j = f'job="{JOB}"'
    board = (dash.Dashboard("Stormguard — overview").uid("stormguard-overview")
             .description("Reply-all storms building and being stopped: traffic, storms, frozen lists, latency.")
             .tags(["stormguard"]).refresh("10s").time("now-30m", "now").timezone("browser")
             .tooltip(DashboardCursorSync.CROSSHAIR).editable()
             .annotations(_annotations(dash))
             .link(dash.DashboardLink("List drill-down").type("link").url("/d/stormguard-list")
                   .include_vars(False).keep_time(True)))

    board = board.with_row(dash.Row("Storms"))
    board = board.with_panel(_stat("Frozen lists", "Lists frozen right now, all workers.", "none",
                                   f"sum(stormguard_frozen_lists{{{j}}})", red_at=1, legend="frozen"))
    board = board.with_panel(_stat("Freezes (1 h)", "Freeze actions published in the last hour.", "none",
                                   f'sum(increase(stormguard_actions_total{{{j},kind="freeze"}}[1h]))',
                                   red_at=1, legend="freezes"))
    board = board.with_panel(_stat("Processes up", "Stormguard workers and deliverer that Prometheus can scrape.", "none",
                                   f"sum(up{{{j}}})", legend="up"))
    board = board.with_panel(_stat("Consumer lag", "Records of mail.events not yet read, all partitions.",
                                   "none", f"sum(stormguard_consumer_lag{{{j}}})", red_at=10000, legend="lag"))
    board = board.with_panel(_stat("Outbox backlog", "Actions waiting for delivery to webhooks, Grafana, Mailman.",
                                   "none", f"sum(stormguard_outbox_backlog{{{j}}})", red_at=100, legend="backlog"))
    board = board.with_panel(_stat("Tracked lists", "Lists with a learned baseline.", "none",
                                   f"sum(stormguard_tracked_lists{{{j}}})", legend="lists"))
    board = board.with_panel(_timeseries(
        "Actions by kind", "Alerts, freezes and unfreezes published to stormguard.actions.", "none",
        [(f"sum by (kind) (increase(stormguard_actions_total{{{j}}}[$__rate_interval]))", "{{kind}}")],
        bars=True))
    board = board.with_panel(_timeseries(
        "Busiest lists: deliveries per minute", "Top lists by mailbox deliveries per minute (event time).",
        "short", [(f"topk(10, max by (list) (stormguard_list_deliveries_per_minute{{{j}}}))", "{{list}}")]))
    board = board.with_panel(_timeseries(
        "Busiest lists: reply-alls per minute", "Reply velocity of the busiest lists (event time).", "short",
        [(f"topk(10, max by (list) (stormguard_list_reply_velocity{{{j}}}))", "{{list}}")]))
    board = board.with_panel(_timeseries(
        "Frozen lists", "Which lists are frozen (1) among the exported ones.", "none",
        [(f"max by (list) (stormguard_list_frozen{{{j}}}) == 1", "{{list}}")], width=24, height=6))

    board = board.with_row(dash.Row("Traffic"))
    board = board.with_panel(_timeseries(
        "Events per second", "Records scored, and records dead-lettered by reason.", "reqps",
        [(_rate("stormguard_events_processed_total"), "scored"),
         (_rate("stormguard_events_invalid_total", "reason"), "invalid: {{reason}}")]))
    board = board.with_panel(_timeseries(
        "Deliveries and reply-alls per second", "Mailbox deliveries after list expansion; reply-alls to lists.",
        "short", [(_rate("stormguard_deliveries_total"), "deliveries"),
                  (_rate("stormguard_list_replies_total"), "reply-alls")]))
    board = board.with_panel(_timeseries(
        "Consumer lag by partition", "Records behind the log end, per partition of mail.events.", "none",
        [(f"sum by (partition) (stormguard_consumer_lag{{{j}}})", "partition {{partition}}"),
         (f"sum by (instance) (stormguard_assigned_partitions{{{j}}})", "partitions @ {{instance}}")]))

    board = board.with_row(dash.Row("Latency"))
    board = board.with_panel(_timeseries(
        "Produce → action", "Kafka record timestamp to action published (the ≤ 1 s freeze promise).", "s",
        [(_quantile(0.5, "stormguard_produce_to_action_seconds"), "p50"),
         (_quantile(0.99, "stormguard_produce_to_action_seconds"), "p99")]))
    board = board.with_panel(_timeseries(
        "Produce → scored", "Kafka record timestamp to scored by a worker, every record.", "s",
        [(_quantile(0.5, "stormguard_record_latency_seconds"), "p50"),
         (_quantile(0.99, "stormguard_record_latency_seconds"), "p99")]))
    board = board.with_panel(_timeseries(
        "Event-time lag", "Worker clock minus the event's own timestamp (replays of old traffic read high).",
        "s", [(_quantile(0.5, "stormguard_event_time_lag_seconds"), "p50"),
              (_quantile(0.99, "stormguard_event_time_lag_seconds"), "p99")]))

    board = board.with_row(dash.Row("Delivery of actions"))
    board = board.with_panel(_timeseries(
        "Delivery failures", "Failed deliveries of actions per sink (webhook, Grafana, Mailman).", "short",
        [(_rate("stormguard_delivery_failures_total", "sink"), "{{sink}}")], width=12))
    board = board.with_panel(_timeseries(
        "Outbox backlog", "Actions waiting for delivery.", "none",
        [(f"sum(stormguard_outbox_backlog{{{j}}})", "backlog")], width=12))
    return board


def list_drilldown():
    """One list: its reply velocity against its learned norm, its deliveries, its freeze."""
    dash, *_ = _sdk()
    from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, VariableRefresh, VariableSort

    j = f'job="{JOB}"'
    sel = f'{j},list="$list"'
    variable = (dash.QueryVariable("list").label("List").datasource(_prom())
                .query(f"label_values(stormguard_list_deliveries_per_minute{{{j}}}, list)")
                .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                .description("Lists Stormguard exports per-list series for: the busiest, and the frozen."))
    board = (dash.Dashboard("Stormguard — list").uid("stormguard-list")
             .description("One distribution list: reply-all velocity against its norm, deliveries, freeze.")
             .tags(["stormguard"]).refresh("10s").time("now-30m", "now").timezone("browser")
             .tooltip(DashboardCursorSync.CROSSHAIR).editable()
             .with_variable(variable)
             .annotations(_annotations(dash))
             .link(dash.DashboardLink("Overview").type("link").url("/d/stormguard-overview").keep_time(True)))
    board = board.with_panel(_stat("Frozen", "1 while the list is frozen.", "none",
                                   f"max(stormguard_list_frozen{{{sel}}})", red_at=1, legend="frozen", width=6))
    board = board.with_panel(_stat("Members", "Members at the list's last expansion.", "short",
                                   f"max(stormguard_list_members{{{sel}}})", legend="members", width=6))
    board = board.with_panel(_stat("Reply-alls in window", "What the policy counts against the norm.", "none",
                                   f"max(stormguard_list_replies_in_window{{{sel}}})", legend="replies", width=6))
    board = board.with_panel(_stat("Deliveries / min", "Mailbox deliveries per minute from posts to this list.",
                                   "short", f"max(stormguard_list_deliveries_per_minute{{{sel}}})",
                                   legend="deliveries/min", width=6))
    board = board.with_panel(_timeseries(
        "Reply-alls: window count vs learned norm", "Reply-alls in the velocity window against the most the "
        "list's own history makes unremarkable; a freeze needs the count above the norm.", "none",
        [(f"max(stormguard_list_replies_in_window{{{sel}}})", "reply-alls in window"),
         (f"max(stormguard_list_reply_norm{{{sel}}})", "learned norm")], width=12, height=9))
    board = board.with_panel(_timeseries(
        "Reply velocity", "Reply-alls per minute (event time).", "short",
        [(f"max(stormguard_list_reply_velocity{{{sel}}})", "reply-alls / min")], width=12, height=9))
    board = board.with_panel(_timeseries(
        "Deliveries per minute", "Mailbox deliveries per minute caused by posts to this list (event time).",
        "short", [(f"max(stormguard_list_deliveries_per_minute{{{sel}}})", "deliveries / min")],
        width=12, height=9))
    board = board.with_panel(_timeseries(
        "Frozen", "1 while frozen.", "none", [(f"max(stormguard_list_frozen{{{sel}}})", "frozen")],
        width=12, height=9))
    return board


DASHBOARDS = {"overview": overview, "list": list_drilldown}


def render(builder) -> str:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    return json.dumps(builder.build(), sort_keys=True, indent=2, cls=JSONEncoder, ensure_ascii=False) + "\n"


def generate() -> dict[str, str]:
    """File name → JSON text of every dashboard."""
    return {f"{name}.json": render(build()) for name, build in DASHBOARDS.items()}


def panel_queries(model: dict) -> Iterator[dict]:
    """Every PromQL expression of a dashboard JSON model: panels' targets and Prometheus annotations.

    Yields ``{"where": ..., "expr": ...}``.
    """
    for panel in model.get("panels", []):
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []) or []:
                if target.get("expr"):
                    yield {"where": f"panel {sub.get('title')!r} {target.get('refId')}", "expr": target["expr"]}
    for ann in model.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            yield {"where": f"annotation {ann.get('name')!r}", "expr": ann["expr"]}


def variable_queries(model: dict) -> Iterator[dict]:
    for var in model.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if query:
            yield {"name": var["name"], "query": query}


def substitute(expr: str, variables: dict[str, str], rate_interval: str = "1m") -> str:
    """A panel query as Grafana would send it: ``$list`` and ``$__rate_interval`` filled in."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    for name in sorted(variables, key=len, reverse=True):
        out = out.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stream_jobs.observability.dashboards", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"directory (default {OUT_DIR})")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files differ from the code")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generate().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    if stale:
        print("out of date (run python -m stream_jobs.observability.dashboards): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
