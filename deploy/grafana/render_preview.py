"""Render the main dashboard panels from real Prometheus data into docs/dashboard.png.

No Grafana server can run on the development machines, so this draws the
overview's main panels (and the list drill-down's key panel) with matplotlib,
from the very PromQL the generated dashboards hold, answered by a real
Prometheus that scraped a real worker during a storm replay:

    .venv/bin/python deploy/grafana/render_preview.py [--out docs/dashboard.png]

It starts an embedded broker, one ``stormguard run`` worker and Debian's
``prometheus`` (1 s scrapes) on loopback ports, replays a small NHSmail-shaped
stream (background traffic fast, then the storm at 8 events/s), queries
``/api/v1/query_range`` for each panel, and stops everything. About 90 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stream_jobs.observability import dashboards  # noqa: E402
from stream_jobs.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from stream_jobs.observability.localstack import STORM_LIST, Prometheus, Worker, produce, storm_events  # noqa: E402

#: (dashboard, panel title) in the order drawn: 2 columns.
PANELS = [
    ("overview.json", "Events per second"),
    ("overview.json", "Deliveries and reply-alls per second"),
    ("overview.json", "Busiest lists: deliveries per minute"),
    ("overview.json", "Busiest lists: reply-alls per minute"),
    ("overview.json", "Actions by kind"),
    ("list.json", "Reply-alls: window count vs learned norm"),
    ("overview.json", "Produce → action"),
    ("overview.json", "Consumer lag by partition"),
]
BG, PANEL, GRID, TEXT = "#111217", "#181b1f", "#2c3235", "#ccccdc"
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]


def _legend(fmt: str, metric: dict) -> str:
    if fmt in ("", "__auto"):
        return ",".join(f"{k}={v}" for k, v in sorted(metric.items()) if k not in ("job", "instance")) or "value"
    out = fmt
    for k, v in metric.items():
        out = out.replace("{{" + k + "}}", v).replace("{{ " + k + " }}", v)
    return out


def collect(prom: Prometheus, start: float, end: float, rate_interval: str = "10s") -> dict:
    models = {name: json.loads(text) for name, text in dashboards.generate().items()}
    out = {"start": start, "end": end, "panels": []}
    for board, title in PANELS:
        panel = next(p for p in models[board]["panels"] if p.get("title") == title)
        series = []
        for target in panel["targets"]:
            expr = dashboards.substitute(target["expr"], {"list": STORM_LIST}, rate_interval)
            body = prom.query_range(expr, start, end, step=1.0)
            if body.get("status") != "success":
                raise RuntimeError(f"{title}: {expr}: {body.get('error')}")
            for r in body["data"]["result"]:
                series.append({"label": _legend(target.get("legendFormat", ""), r["metric"]),
                               "points": [(float(t), float(v)) for t, v in r["values"]]})
        out["panels"].append({"title": title, "unit": panel["fieldConfig"]["defaults"].get("unit", ""),
                              "board": board, "series": series})
    freeze = prom.query_range('sum(stormguard_actions_total{job="stormguard",kind="freeze"})', start, end, 1.0)
    times = [float(t) for r in freeze["data"]["result"] for t, v in r["values"] if float(v) >= 1]
    out["freeze_at"] = min(times) if times else None
    return out


def draw(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = data["start"]
    panels = data["panels"]
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 3.1 * rows), facecolor=BG)
    fig.suptitle("Stormguard — overview and list drill-down during a replayed reply-all storm "
                 f"(real Prometheus, list {STORM_LIST})", color=TEXT, fontsize=13, x=0.01, ha="left")
    for ax, panel in zip(axes.flat, panels):
        ax.set_facecolor(PANEL)
        for spine in ax.spines.values():
            spine.set_color(GRID)
        ax.tick_params(colors=TEXT, labelsize=8)
        ax.grid(True, color=GRID, linewidth=0.6)
        title = panel["title"] + ("  [drill-down]" if panel["board"] == "list.json" else "")
        ax.set_title(title, color=TEXT, fontsize=10, loc="left")
        shown = panel["series"]
        if len(shown) > 3:  # e.g. invalid records by reason: only the reasons that occurred
            shown = [s for s in shown if any(v for _, v in s["points"] if v == v)] or shown[:1]
        for i, s in enumerate(shown[:8]):
            xs = [t - t0 for t, v in s["points"] if v == v]
            ys = [v for t, v in s["points"] if v == v]
            if xs:
                ax.plot(xs, ys, color=COLORS[i % len(COLORS)], linewidth=1.6, label=s["label"][:40])
        if data.get("freeze_at"):
            ax.axvline(data["freeze_at"] - t0, color="#f2495c", linestyle="--", linewidth=1.2)
        unit = {"s": "seconds", "reqps": "per second"}.get(panel["unit"], "")
        if unit:
            ax.set_ylabel(unit, color=TEXT, fontsize=8)
        ax.set_xlim(0, data["end"] - t0)
        ax.set_ylim(bottom=0)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))
        ax.yaxis.get_offset_text().set_color(TEXT)
        if panel["series"]:
            ax.legend(loc="upper left", fontsize=7, facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT)
        else:
            ax.text(0.5, 0.5, "no data", color=TEXT, transform=ax.transAxes, ha="center")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the replay started  (red dashed line: the freeze)", color=TEXT, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, facecolor=BG)
    plt.close(fig)


def record(workdir: Path) -> dict:
    records = storm_events(end=time.time() + 60)
    split = next(i for i, r in enumerate(records) if b'"message_id": "root"' in r)
    with EmbeddedBroker(port=free_port()) as broker:
        worker = Worker(broker.url, workdir).start()
        try:
            with Prometheus([worker.target], workdir=workdir / "prom") as prom:
                prom.wait_for('up{job="stormguard"} == 1', timeout=30)
                start = time.time()
                time.sleep(5)
                produce(broker.url, records[:split], rate=40.0)
                time.sleep(5)
                produce(broker.url, records[split:], rate=8.0)
                prom.wait_for(f'sum(stormguard_events_processed_total{{job="stormguard"}}) >= {len(records)}', 60)
                time.sleep(10)
                return collect(prom, start, time.time())
        finally:
            worker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--data", type=Path, help="also save (or, with --from-data, read) the query results here")
    parser.add_argument("--from-data", action="store_true", help="redraw from --data without a replay")
    args = parser.parse_args(argv)
    if args.from_data:
        data = json.loads(args.data.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="sg-preview-") as tmp:
            data = record(Path(tmp))
        if args.data:
            args.data.write_text(json.dumps(data))
    empty = [p["title"] for p in data["panels"] if not p["series"]]
    draw(data, args.out)
    print(f"wrote {args.out}" + (f" (panels without data: {empty})" if empty else ""), file=sys.stderr)
    return 1 if empty else 0


if __name__ == "__main__":
    sys.exit(main())
