"""``python -m stream_jobs.bench.ab`` (``make bench-ab``): consumers side by side, in interleaved rounds.

Issue 19 asks for the worker's throughput as a ratio to bare aiokafka *measured in one run*: on a
shared machine a single phase moves by ±30%, so one figure beside a figure from another run says
little. This harness fills one broker once (default: 100,000 bench events of ~200 B on 8 partitions,
keyed by sender, so every list post also takes the by-list hop), then runs each variant in turn,
round after round, every variant started fresh and timed from its first record as ``make bench``
times it (:meth:`~stream_jobs.bench.phases.Bench.drain`), in the order given in odd rounds and reversed in
even ones. Variants:

* ``bare``: aiokafka ``getmany`` + ``msgspec.json.decode`` in this process (the ceiling);
* ``noop-stock``: the no-op Faust agent on stock Faust (``STORMGUARD_FAST_DRAIN=false``);
* ``noop``: the no-op batch agent on the worker's consumer;
* ``worker-stock``: ``stormguard run`` with ``STORMGUARD_FAST_DRAIN=false`` (stock Faust's consumer);
* ``worker``: ``stormguard run`` on the batch path (this checkout's code);
* ``worker@LABEL``: the same, on the code of a git commit given with ``--code LABEL=REF`` (a
  ``git archive`` snapshot run with ``PYTHONSAFEPATH=1 PYTHONPATH=<snapshot>``): before/after A/Bs
  of one change in one run;
* ``VARIANT~NAME`` (any of the above but ``bare``): with the settings given by ``--env NAME:KEY=VALUE``
  (repeatable), e.g. ``worker~nowait`` with ``--env nowait:STORMGUARD_ORDER_WAIT_MS=0``.

Each round reports events/s (events of ``mail.events``: a sender-keyed run's by-list shares are
counted by the worker as records and converted back, as the bench's sender-keyed phase does), events
per CPU-second of the consumer process, and the ratio to the bare aiokafka run of the same round.
The JSON (``--out``) keeps every round; the table gives medians. ``uptime``'s load average is
recorded before and after each round: quote it with the figures.

With a reference variant (``--reference``; by default the first ``worker@LABEL``, the code before a
change), each other variant is also divided by it *within each round*, and the median of those paired
ratios is reported (``vs_reference``, ``vs_reference_per_cpu``). This shared machine's speed swings by
half from one minute to the next, which moves bare aiokafka's figure and so every ratio to it; two
variants run back to back in one round see much the same speed, so the paired ratio is the steadier
before/after figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Optional

from stream_jobs.bench.phases import ROOT, Bench, noop_count
from stream_jobs.bench.report import machine, say
from stream_jobs.bench.traffic import by_list_shares, encode_all, realistic_events, sender_key

BASE_VARIANTS = ("bare", "noop-stock", "noop", "worker-stock", "worker")
DEFAULT_VARIANTS = "bare,noop-stock,worker-stock,worker"


def snapshot(ref: str, into: Path) -> Path:
    """The tree of git ``ref`` of this checkout, extracted into ``into`` (the harness runs its workers from it)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = into.with_suffix(".tar")
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), ref], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into)
    archive.unlink()
    return into


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stream_jobs.bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--keyed", choices=("sender", "list"), default="sender",
                   help="sender: every list post takes the by-list hop (default); list: as `replay` keys")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, run in this order each round (default {DEFAULT_VARIANTS}); "
                        f"any of {', '.join(BASE_VARIANTS)} or worker@LABEL (--code)")
    p.add_argument("--code", action="append", default=[], metavar="LABEL=REF",
                   help="a git commit whose worker runs as variant worker@LABEL (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="a setting of variants named VARIANT~NAME (repeatable)")
    p.add_argument("--reference", metavar="VARIANT",
                   help="the variant every other is divided by, round by round (default: the first worker@LABEL, "
                        "the code before; none without one)")
    p.add_argument("--engine", choices=("tansu", "kafka"), default="tansu")
    p.add_argument("--seed", type=int, default=2016)
    p.add_argument("--phase-timeout", type=float, default=300.0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench-ab.json"))
    return p


def _median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _divide(rnd: dict, variants: list, by: str, name: str) -> None:
    """Each variant of round ``rnd`` but ``bare`` and ``by``, divided by ``by``: events/s as ``name``, events
    per CPU-second as ``name``_per_cpu (when both have it)."""
    for v in variants:
        if v in ("bare", by):
            continue
        rnd[v][name] = rnd[v]["events_per_s"] / rnd[by]["events_per_s"]
        if rnd[v].get("events_per_cpu_s") and rnd[by].get("events_per_cpu_s"):
            rnd[v][f"{name}_per_cpu"] = rnd[v]["events_per_cpu_s"] / rnd[by]["events_per_cpu_s"]


def run(args: argparse.Namespace) -> dict:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    codes = dict(c.split("=", 1) for c in args.code)
    envs: dict[str, dict] = {}
    for spec in args.env:
        name, _, setting = spec.partition(":")
        k, _, val = setting.partition("=")
        envs.setdefault(name, {})[k] = val
    for v in variants:
        rest, _, env_name = v.partition("~")
        base, _, label = rest.partition("@")
        if base not in BASE_VARIANTS or (label and (base != "worker" or label not in codes)) \
                or (env_name and (base == "bare" or env_name not in envs)):
            raise SystemExit(f"unknown variant {v!r} (worker@LABEL needs --code LABEL=REF, X~NAME needs --env NAME:K=V)")
    reference = args.reference or next((v for v in variants if "@" in v.partition("~")[0]), None)
    if reference is not None and (reference not in variants or reference == "bare"):
        raise SystemExit(f"--reference {reference!r} is not one of the variants run (bare is not a reference)")
    bench = Bench(args)
    results: dict = {"command": " ".join(["python -m stream_jobs.bench.ab"] + sys.argv[1:]), "machine": machine(),
                     "events": args.events, "partitions": args.partitions, "keyed_by": args.keyed,
                     "engine": args.engine, "variants": variants, "reference": reference, "rounds": []}
    try:
        code_env = {}
        for label, ref in codes.items():
            commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True,
                                    text=True).stdout.strip()
            tree = snapshot(commit, bench.tmp / f"code-{label}")
            code_env[label] = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
            results.setdefault("code", {})[label] = commit
        say(f"bench-ab: generating {args.events:,} events (seed {args.seed})")
        records = encode_all(realistic_events(args.events, seed=args.seed))
        key = sender_key if args.keyed == "sender" else None
        shares = by_list_shares(records, key or (lambda raw: _routing_key(raw)), args.partitions)
        n = len(records)
        broker = bench.broker()
        results["fill"] = bench.fill(broker, records, key=key)
        results["by_list_shares"] = shares
        for r in range(args.rounds):
            rnd: dict = {"load_before": list(os.getloadavg())}
            # reversed every other round: a variant always in the same slot carries that slot's bias
            for v in (variants if r % 2 == 0 else variants[::-1]):
                rest, _, env_name = v.partition("~")
                base, _, label = rest.partition("@")
                extra = dict(code_env.get(label, {}), **envs.get(env_name, {}))
                say(f"bench-ab: round {r + 1}/{args.rounds}, {v}")
                if base == "bare":
                    out = bench.bare_aiokafka(broker, n, passes=1)  # the rounds repeat it
                elif base.startswith("noop"):
                    # the no-op agent reads mail.events only: no by-list shares to count
                    extra.setdefault("STORMGUARD_FAST_DRAIN", "false" if base == "noop-stock" else "true")
                    p = bench.noop(broker, **extra).start()
                    try:
                        p.wait_ready()
                        out = bench.drain([p], noop_count, n, v, args.phase_timeout, interval=0.1)
                    finally:
                        p.stop()
                else:
                    if base == "worker-stock":
                        extra.setdefault("STORMGUARD_FAST_DRAIN", "false")
                    out = bench.run_workers(broker, n + shares, 1, v, **extra)
                    # the worker counts by-list shares as records: report events of mail.events
                    per_event = n / (n + shares)
                    out["records_per_s"] = out["events_per_s"]
                    out["events_per_s"] = out["timed_events"] * per_event / out["seconds"]
                    if "cpu_s" in out:
                        out["events_per_cpu_s"] = out["timed_events"] * per_event / out["cpu_s"]
                rnd[v] = {k: out.get(k) for k in ("events_per_s", "events_per_cpu_s", "seconds", "cpu_s",
                                                  "records_per_s", "duplicates")}
            rnd["load_after"] = list(os.getloadavg())
            if reference is not None:
                # paired within the round: both ran minutes apart at most, on the same broker and machine speed
                _divide(rnd, variants, reference, "vs_reference")
            if "bare" in rnd:
                _divide(rnd, variants, "bare", "vs_bare")
            results["rounds"].append(rnd)
        results["median"] = {v: {k: _median([rnd[v].get(k) for rnd in results["rounds"]])
                                 for k in ("events_per_s", "events_per_cpu_s", "vs_bare", "vs_bare_per_cpu",
                                           "vs_reference", "vs_reference_per_cpu")}
                             for v in variants}
    finally:
        bench.close()
    import shutil

    shutil.rmtree(bench.tmp, ignore_errors=True)
    return results


def _routing_key(raw: bytes):
    from stream_jobs.kafka.replay import routing_key

    return routing_key(raw)


def table(results: dict) -> str:
    variants = results["variants"]
    rounds = results["rounds"]
    head = "| variant | events/s (rounds) | events per CPU-s (rounds) | ÷ bare (rounds) | median ÷ bare | median ÷ bare per CPU-s |"
    lines = [head, "|---|---|---|---|---:|---:|"]

    def fmt(x, spec=",.0f"):
        return "–" if x is None else format(x, spec)

    def row(v: str, per_round: list[tuple[str, str]], medians: list[str]) -> str:
        cells = [" · ".join(fmt(r[v].get(key), spec) for r in rounds) for key, spec in per_round]
        cells += [fmt(results["median"][v].get(key), ".3f") for key in medians]
        return f"| {v} | " + " | ".join(cells) + " |"

    lines += [row(v, [("events_per_s", ",.0f"), ("events_per_cpu_s", ",.0f"), ("vs_bare", ".3f")],
                  ["vs_bare", "vs_bare_per_cpu"]) for v in variants]
    reference = results.get("reference")
    if reference is not None:
        lines += ["", f"| variant ÷ {reference}, paired in each round | events/s (rounds) | per CPU-s (rounds) "
                      "| median | median per CPU-s |", "|---|---|---|---:|---:|"]
        lines += [row(v, [("vs_reference", ".3f"), ("vs_reference_per_cpu", ".3f")],
                      ["vs_reference", "vs_reference_per_cpu"]) for v in variants if v not in ("bare", reference)]
    loads = ", ".join(f"{r['load_before'][0]:.1f}→{r['load_after'][0]:.1f}" for r in rounds)
    lines.append(f"\n{results['events']:,} events, {results['partitions']} partitions, keyed by "
                 f"{results['keyed_by']} ({results['by_list_shares']:,} by-list shares), {results['engine']}; "
                 f"load average (1 min) per round: {loads}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    results = run(args)
    results["duration_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nfigures written to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
