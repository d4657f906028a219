"""``python -m stream_jobs.bench`` (``make bench``): run every phase, write the JSON, print the table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import stream_jobs.bench
from stream_jobs.bench.phases import ROOT, Bench
from stream_jobs.bench.report import latency_table, say, table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stream_jobs.bench", description=stream_jobs.bench.__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("tansu", "kafka"), default="tansu",
                   help="the broker every phase runs on: tansu (embedded, default) or kafka (Apache Kafka, KRaft)")
    p.add_argument("--quick", action="store_true", help="a smaller run (for tests): 20,000 events, short phases")
    p.add_argument("--events", type=int, help="events in the pre-filled topic (default 100,000; quick 20,000)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of mail.events (default 4)")
    p.add_argument("--rate", type=float, default=2000.0, help="background events/s in the latency phase")
    p.add_argument("--light-rate", type=float, default=300.0,
                   help="background events/s of the light-load latency run (default 300)")
    p.add_argument("--latency-seconds", type=float, help="length of the latency phase (default 45; quick 12)")
    p.add_argument("--storm-every", type=float, default=0.75, help="seconds between injected storms")
    p.add_argument("--startup-samples", type=int, help="worker start-ups to time (default 5; quick 2)")
    p.add_argument("--seed", type=int, default=2016)
    p.add_argument("--out", default=str(ROOT / "bench-results.json"), help="JSON results (default bench-results.json)")
    p.add_argument("--phase-timeout", type=float, default=300.0, help="give up on a throughput phase after this")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--exactly-once", action="store_true",
                   help="also time the worker with STORMGUARD_EXACTLY_ONCE against at-least-once, on Apache Kafka")
    p.add_argument("--only", choices=("latency",),
                   help="run only these phases: latency (start-up, then produce->freeze under light and full load)")
    p.add_argument("--latency-env", action="append", metavar="NAME=VALUE",
                   help="a STORMGUARD_* setting for the latency worker (repeatable), e.g. to compare a setting's values")
    p.add_argument("--latency-variant", action="append", metavar="NAME:SETTING=VALUE,...",
                   help="after the latency phases, run them again with these settings, on the same broker "
                        "(repeatable): a before/after side by side in one run")
    p.add_argument("--latency-rounds", type=int, default=1,
                   help="with --latency-variant: rounds of every variant and the settings as given (default 1)")
    p.add_argument("--variant-throughput-events", type=int, default=0,
                   help="with --latency-variant: also time each variant's worker catching up this many events "
                        "(a fresh broker each, interleaved with the latency runs; default 0: not)")
    p.add_argument("--storm-key", choices=("list", "sender"), default="list",
                   help="how the latency phase keys its storm messages: by list (default, as replay keys: scored "
                        "where read) or by sender (every one takes the by-list hop)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    q = args.quick
    args.events = args.events or (20_000 if q else 100_000)
    args.latency_seconds = args.latency_seconds or (12.0 if q else 45.0)
    args.startup_samples = args.startup_samples or (2 if q else 5)
    args.memory_senders = 5_000 if q else 20_000
    args.memory_lists = 1_000 if q else 5_000
    args.memory_busy_lists = 20 if q else 100
    args.history_events = 3_000 if q else 10_000
    bench = Bench(args)
    try:
        results = bench.run()
    except BaseException:
        bench.close()
        say(f"bench: failed; logs of the broker and the workers are in {bench.tmp}")
        raise
    bench.close()
    import shutil

    shutil.rmtree(bench.tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(latency_table(results) if args.only == "latency" else table(results))
    print(f"\nfigures written to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
