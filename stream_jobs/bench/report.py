"""The bench's figures: the ratios it reports, the machine it ran on, and the table it prints."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

#: The latency phases, in the order they run: light load, the load asked for, and the same load again once
#: the low-volume topics' partitions are past their first index entry (``Bench.latency_run``).
LATENCY_PHASES = ("latency_light", "latency", "latency_warm")

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
    st, mem = r["startup"], r["memory"]
    out += latency_lines(r) + variant_lines(r) + [""]
    out += [f"milter decision per message (event + hold lookup, in-process): p50 {r['milter']['p50_ms']:.3f} ms, "
            f"p99 {r['milter']['p99_ms']:.3f} ms, max {r['milter']['max_ms']:.1f} ms "
            f"({r['milter']['events_per_cpu_s']:,.0f} decisions per CPU-s; {r['milter']['held']:,} held)",
            f"worker start-up to /healthz 200: median {st['median_s']:.2f} s "
            f"(min {st['min_s']:.2f}, max {st['max_s']:.2f}, {len(st['samples_s'])} samples)",
            f"state: {mem['bytes_per_sender']:.0f} B per sender, {mem['bytes_per_list']:.0f} B per list (one post), "
            f"{mem['bytes_per_busy_list']:,.0f} B per busy list (buffers full)",
            f"bench took {r['duration_s']:.0f} s"]
    return "\n".join(out)


def latency_lines(r: dict) -> list[str]:
    """Produce->freeze under light and full load, each with its per-stage breakdown (p50 / p99 ms)."""
    out = []
    for key in LATENCY_PHASES:
        lat = r.get(key)
        if lat is None:  # a results file from before the warm phase
            continue
        warm = " (again: partitions past their first index entry)" if key == "latency_warm" else ""
        out += ["", f"produce→freeze under {lat['produced_eps']:,.0f} ev/s background{warm}: p50 {lat['p50_ms']:.0f} ms, "
                    f"p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']:.0f} ms ({lat['frozen']}/{lat['storms']} storms "
                    f"frozen; frozen on reply-all #: {lat['frozen_on_reply']}; backlog when production stopped "
                    f"{lat['backlog_when_production_stopped']:,} events)"]
        stages = lat.get("stages") or {}
        if stages:
            out.append(f"  {'stage (' + str(lat['stages_traced']) + ' traced)':24} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
            for name, st in stages.items():
                out.append(f"  {name:24} {st['p50_ms']:>8.1f} {st['p99_ms']:>8.1f} {st['max_ms']:>8.1f}")
    return out


def _pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def variant_lines(r: dict) -> list[str]:
    """``--latency-variant``: each variant's rounds pooled, light and full load, with the pooled stages."""
    variants = r.get("latency_variants") or {}
    if not variants:
        return []
    out = ["", f"side by side ({r.get('broker', 'tansu')}; each run a fresh broker; rounds pooled): "
               "produce→freeze ms"]
    out.append(f"  {'variant':24} {'ev/s':>6} {'storms':>6} {'p50':>6} {'p99':>6} {'max':>6} {'CPU ms/1k ev':>12}"
               f"  host load")
    for name, runs in variants.items():
        for key in LATENCY_PHASES:
            if key not in runs[0]:
                continue
            samples = [v for run in runs for v in run[key]["samples_ms"]]
            loads = [run[key].get("load_avg", [0])[0] for run in runs]
            cpu = [run[key]["worker_cpu_ms_per_1000_events"] for run in runs
                   if "worker_cpu_ms_per_1000_events" in run[key]]
            cpu_s = f"{sum(cpu) / len(cpu):>12.0f}" if cpu else f"{'-':>12}"
            out.append(f"  {name:24} {runs[0][key]['background_target_eps']:>6.0f} {len(samples):>6} "
                       f"{_pct(samples, 50):>6.0f} {_pct(samples, 99):>6.0f} {max(samples):>6.0f} {cpu_s}  "
                       f"{'/'.join(f'{x:.1f}' for x in loads)}")
    for name, runs in (r.get("throughput_variants") or {}).items():
        eps = [run["events_per_s"] for run in runs]
        per_cpu = [run["events_per_cpu_s"] for run in runs if "events_per_cpu_s" in run]
        out.append(f"  {name} catching up {runs[0]['events']:,} events: "
                   + ", ".join(f"{x:,.0f}" for x in eps) + " events/s"
                   + (" (" + ", ".join(f"{x:,.0f}" for x in per_cpu) + " per CPU-s)" if per_cpu else ""))
    for name, runs in variants.items():
        rows = [row for run in runs for row in run["latency"].get("stage_samples", [])]
        if not rows:
            continue
        stages = [k for k in rows[0] if k not in ("total", "at", "batch_len", "index")]
        out.append(f"  {name} at full load, stages p50/p99 ms ({len(rows)} traced): " + ", ".join(
            f"{k} {_pct([x[k] for x in rows], 50):.1f}/{_pct([x[k] for x in rows], 99):.1f}" for k in stages))
    return out


def latency_table(r: dict) -> str:
    """The table of ``--only latency``."""
    m, st = r["machine"], r["startup"]
    out = [f"Stormguard bench, latency only — broker {r.get('broker', 'tansu')}; {m['cpus']} × {m['cpu_model']}",
           f"(shared machine: load {m['load_avg_start'][0]:.1f} at start, {m['load_avg_end'][0]:.1f} at end)"]
    out += latency_lines(r) + variant_lines(r) + [""]
    out += [f"worker start-up to /healthz 200: median {st['median_s']:.2f} s "
            f"(min {st['min_s']:.2f}, max {st['max_s']:.2f}, {len(st['samples_s'])} samples)",
            f"bench took {r['duration_s']:.0f} s"]
    return "\n".join(out)
