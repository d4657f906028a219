"""The bench's figures: the ratios it reports, the machine it ran on, and the table it prints."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

#: ratio name -> (numerator, denominator), as dotted paths into the results.
RATIOS: dict[str, tuple[str, str]] = {
    # Detection's cost: the worker against a no-op agent with the same consumer (batched drain, raw schema).
    "worker_vs_noop": ("throughput.worker.events_per_s", "throughput.faust_noop.events_per_s"),
    # Past the framework's own ceiling: the worker against a no-op agent on stock Faust.
    "worker_vs_stock_noop": ("throughput.worker.events_per_s", "throughput.faust_noop_stock.events_per_s"),
    "noop_vs_stock_noop": ("throughput.faust_noop.events_per_s", "throughput.faust_noop_stock.events_per_s"),
    "worker_vs_bare": ("throughput.worker.events_per_s", "throughput.bare_aiokafka.events_per_s"),
    "noop_vs_bare": ("throughput.faust_noop.events_per_s", "throughput.bare_aiokafka.events_per_s"),
    "two_workers_vs_one": ("throughput.two_workers.events_per_s", "throughput.worker.events_per_s"),
    # What routing list posts through the by-list topic costs: the same events keyed by sender.
    "sender_keyed_vs_list_keyed": ("throughput.worker_sender_keyed.events_per_s", "throughput.worker.events_per_s"),
    # Scoring while `stormguard deliver` retries against a webhook receiver and a Grafana that are down.
    "worker_sinks_down_vs_worker": ("throughput.worker_sinks_down.events_per_s", "throughput.worker.events_per_s"),
    # What Kafka transactions cost (bench --exactly-once, on Apache Kafka): the same worker, the same events.
    "exactly_once_vs_at_least_once": ("exactly_once.exactly_once.events_per_s", "exactly_once.at_least_once.events_per_s"),
    "exactly_once_vs_at_least_once_per_cpu": ("exactly_once.exactly_once.events_per_cpu_s",
                                              "exactly_once.at_least_once.events_per_cpu_s"),
    "offline_vs_worker": ("throughput.offline_score.events_per_s", "throughput.worker.events_per_s"),
    # The milter's decision per message (event + hold lookup) against scoring one event offline, per CPU-second.
    "milter_decide_vs_offline_score_per_cpu": ("milter.events_per_cpu_s", "throughput.offline_score.events_per_cpu_s"),
    "offline_cli_vs_in_process": ("throughput.offline_score_cli.events_per_s",
                                  "throughput.offline_score.events_per_s"),
    # The same comparisons per CPU-second the consumers burnt: steadier on a shared machine.
    "worker_vs_noop_per_cpu": ("throughput.worker.events_per_cpu_s", "throughput.faust_noop.events_per_cpu_s"),
    "worker_vs_stock_noop_per_cpu": ("throughput.worker.events_per_cpu_s",
                                     "throughput.faust_noop_stock.events_per_cpu_s"),
    "two_workers_vs_one_per_cpu": ("throughput.two_workers.events_per_cpu_s",
                                   "throughput.worker.events_per_cpu_s"),
    "sender_keyed_vs_list_keyed_per_cpu": ("throughput.worker_sender_keyed.events_per_cpu_s",
                                           "throughput.worker.events_per_cpu_s"),
}


def lookup(results: dict, dotted: str) -> float:
    node = results
    for part in dotted.split("."):
        node = node[part]
    return node


def machine() -> dict:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_start": list(os.getloadavg()),
            "note": "2 cores shared with other engineers' test runs: compare ratios, not absolute numbers"}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(r: dict) -> str:
    tp = r["throughput"]
    m = r["machine"]
    rows = [
        ("bare aiokafka + JSON decode", tp["bare_aiokafka"]),
        ("Faust no-op agent, stock Faust", tp["faust_noop_stock"]),
        ("Faust no-op agent, worker's consumer", tp["faust_noop"]),
        ("Stormguard worker (1)", tp["worker"]),
        ("Stormguard worker (1), keyed by sender", tp["worker_sender_keyed"]),
        ("Stormguard workers (2, same group)", tp["two_workers"]),
        ("worker, receivers down (deliver retrying)", tp["worker_sinks_down"]),
        ("offline score, in-process", tp["offline_score"]),
        ("offline score, CLI", tp["offline_score_cli"]),
    ]
    if "exactly_once" in r:
        rows += [("worker, at-least-once, Apache Kafka", r["exactly_once"]["at_least_once"]),
                 ("worker, exactly-once, Apache Kafka", r["exactly_once"]["exactly_once"])]
    out = [f"Stormguard bench — {r['events']['count']:,} events ({r['events']['mean_bytes']:.0f} B mean), "
           f"{r['events']['partitions']} partitions, broker {r.get('broker', 'tansu')}; {m['cpus']} × {m['cpu_model']}, "
           f"Python {m['python']}",
           f"(shared machine: load {m['load_avg_start'][0]:.1f} at start, {m['load_avg_end'][0]:.1f} at end)",
           "", f"{'consumer':38} {'events/s':>10} {'seconds':>8} {'events/CPU-s':>13}"]
    for name, row in rows:
        per_cpu = f"{row['events_per_cpu_s']:>13,.0f}" if "events_per_cpu_s" in row else f"{'-':>13}"
        out.append(f"{name:38} {row['events_per_s']:>10,.0f} {row['seconds']:>8.2f} {per_cpu}")
    out.append("")
    out.append(f"{'ratio':38} {'value':>10}")
    for name, ratio in r["ratios"].items():
        out.append(f"{name:38} {ratio['value']:>10.3f}")
    lat, st, mem = r["latency"], r["startup"], r["memory"]
    light = r["latency_light"]
    out += ["",
            f"produce→freeze under {light['produced_eps']:,.0f} ev/s background: p50 {light['p50_ms']:.0f} ms, "
            f"p99 {light['p99_ms']:.0f} ms, max {light['max_ms']:.0f} ms ({light['frozen']}/{light['storms']} storms "
            f"frozen; backlog when production stopped {light['backlog_when_production_stopped']:,} events)",
            f"produce→freeze under {lat['produced_eps']:,.0f} ev/s background: p50 {lat['p50_ms']:.0f} ms, "
            f"p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']:.0f} ms ({lat['frozen']}/{lat['storms']} storms frozen; "
            f"frozen on reply-all #: {lat['frozen_on_reply']}; backlog when production stopped "
            f"{lat['backlog_when_production_stopped']:,} events)",
            f"milter decision per message (event + hold lookup, in-process): p50 {r['milter']['p50_ms']:.3f} ms, "
            f"p99 {r['milter']['p99_ms']:.3f} ms, max {r['milter']['max_ms']:.1f} ms "
            f"({r['milter']['events_per_cpu_s']:,.0f} decisions per CPU-s; {r['milter']['held']:,} held)",
            f"worker start-up to /healthz 200: median {st['median_s']:.2f} s "
            f"(min {st['min_s']:.2f}, max {st['max_s']:.2f}, {len(st['samples_s'])} samples)",
            f"state: {mem['bytes_per_sender']:.0f} B per sender, {mem['bytes_per_list']:.0f} B per list (one post), "
            f"{mem['bytes_per_busy_list']:,.0f} B per busy list (buffers full)",
            f"bench took {r['duration_s']:.0f} s"]
    return "\n".join(out)
