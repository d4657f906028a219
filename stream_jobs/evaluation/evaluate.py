"""``stormguard evaluate``: Stormguard against Exchange's rule and a static threshold.

Each storm scenario is run in a closed loop four times, from the same seed:
with no protection (the storm as it was), with Stormguard as the gateway's
decision maker, with Exchange Online's default reply-all rule and with a static
list rate limit (:mod:`detectors.peers`). Because the simulated storm only
grows from delivered messages, every run is the unstopped one pruned where its
rule started holding mail, so deliveries prevented are like for like.

Benign traffic (a simulated week of a 50,000-person organisation, and the
two real traces of ``../shared/data``) is run once through all three rules, to
count false freezes and alerts. A storm is then injected into each real trace
on an all-members list.

Offline (default) the detectors run in-process, exactly as ``stormguard
score`` runs them. ``--live`` sends the storm scenarios through a broker and a
running worker (``stormguard run``) instead, holding posts to the lists that
``stormguard.actions`` froze.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from detectors.events import MailEvent
from detectors.policy import PolicyConfig
from stream_jobs.evaluation.gateways import FanGateway, OpenGateway, make_gateways
from stream_jobs.evaluation.simulate import (STORM_SCENARIOS, Run, Scenario, scenario, scenario_events)

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


# -- measuring a storm ----------------------------------------------------------------------------
@dataclass
class GuardResult:
    guard: str
    freeze_after_s: Optional[float]
    replies_delivered_before_freeze: int
    replies_delivered: int
    deliveries: int
    prevented: int
    prevented_pct: float
    false_freezes: int
    alerts: int
    #: (minutes since the first post, cumulative storm deliveries), for the plot.
    curve: list[tuple[float, int]] = field(default_factory=list, repr=False)


def _curve(run: Run, t0: float) -> list[tuple[float, int]]:
    out, total = [(0.0, 0)], 0
    for t, d, ok, _ in run.storm_log:
        if ok:
            total += d
            out.append((round((t - t0) / 60.0, 3), total))
    return out


def measure(run: Run, gateway, unstopped: int, t0: float, storm_list: str) -> GuardResult:
    freezes = [(t, k) for t, k in gateway.freezes()]
    storm_keys = (storm_list, )
    mine = [t for t, k in freezes if k in storm_keys or (k or "").startswith("s:") and _thread_is_storm(run, k)]
    freeze_t = min(mine) if mine else None
    replies = [(t, ok) for t, _, ok, reply in run.storm_log if reply]
    delivered = sum(1 for _, ok in replies if ok)
    before = sum(1 for t, ok in replies if ok and (freeze_t is None or t <= freeze_t))
    made = sum(d for _, d, ok, _ in run.storm_log if ok)
    prevented = max(0, unstopped - made)
    false = [k for t, k in freezes if not (k in storm_keys or (k or "").startswith("s:") and _thread_is_storm(run, k))]
    alerts = [k for _, k in gateway.alerts() if k != storm_list]
    return GuardResult(gateway.name, None if freeze_t is None else round(freeze_t - t0, 1), before, delivered, made,
                       prevented, round(100.0 * prevented / unstopped, 2) if unstopped else 0.0, len(false),
                       len(alerts), _curve(run, t0))


def _thread_is_storm(run: Run, key: str) -> bool:
    from detectors.events import normalise_subject

    storm = run.scenario.storm
    return storm is not None and key == "s:" + normalise_subject(storm.subject)


@dataclass
class ScenarioResult:
    name: str
    description: str
    seed: int
    criterion: Optional[int]
    members: int
    events: int
    unstopped_messages: int
    unstopped_deliveries: int
    guards: dict[str, GuardResult]

    @property
    def passed(self) -> Optional[bool]:
        sg = self.guards.get("stormguard")
        if self.criterion is None or sg is None:
            return None
        return sg.freeze_after_s is not None and sg.replies_delivered_before_freeze <= self.criterion


def evaluate_storm(sc: Scenario, config: Optional[PolicyConfig] = None, live_gateway=None) -> ScenarioResult:
    """Run one storm scenario unstopped and under each rule."""
    assert sc.storm is not None
    open_run = scenario_events(sc, OpenGateway())
    unstopped = sum(d for _, d, _, _ in open_run.storm_log)
    t0 = sc.storm.at
    gws = make_gateways(config)
    if live_gateway is not None:
        gws["stormguard"] = live_gateway
    guards = {"unstopped": GuardResult("unstopped", None, sum(1 for r in open_run.storm_log if r[3]),
                                       sum(1 for r in open_run.storm_log if r[3]), unstopped, 0, 0.0, 0, 0,
                                       _curve(open_run, t0))}
    events = open_run.events
    for name, gw in gws.items():
        run = scenario_events(sc, gw)
        guards[name] = measure(run, gw, unstopped, t0, sc.storm.list_address)
    return ScenarioResult(sc.name, sc.description, sc.seed, sc.criterion, sc.storm.members, events,
                          open_run.storm_messages, unstopped, guards)


@dataclass
class BenignResult:
    name: str
    description: str
    events: int
    list_posts: int
    lists: int
    freezes: dict[str, int]
    alerts: dict[str, int]
    frozen_lists: dict[str, list[str]]


def evaluate_benign(sc: Scenario, config: Optional[PolicyConfig] = None) -> BenignResult:
    gws = make_gateways(config)
    list_posts = 0
    lists: set[str] = set()

    def sink(ev: MailEvent, ok: bool) -> None:
        nonlocal list_posts
        if ev.lists:
            list_posts += 1
            lists.update(ev.lists)

    run = scenario_events(sc, FanGateway(list(gws.values())), sink=sink)
    return BenignResult(sc.name, sc.description, run.events, list_posts, len(lists),
                        {n: len(g.freezes()) for n, g in gws.items()},
                        {n: len(g.alerts()) for n, g in gws.items()},
                        {n: sorted({str(k) for _, k in g.freezes()})[:20] for n, g in gws.items()})


# -- the whole evaluation --------------------------------------------------------------------------
def evaluate_all(scenarios: list[str], seed: int = 0, benign_days: float = 7.0, traces: bool = True,
                 data_dir: Path = DEFAULT_DATA, config: Optional[PolicyConfig] = None, progress: bool = True,
                 live=None) -> dict:
    from tqdm import tqdm

    storms: list[ScenarioResult] = []
    benign: list[BenignResult] = []
    jobs: list[tuple[str, Any]] = []
    for name in scenarios:
        jobs.append(("benign" if name == "benign-week" else "storm", scenario(name, seed,
                     benign_days if name == "benign-week" else None)))
    if traces:
        from stream_jobs.evaluation.traces import TRACES, trace_scenario

        for tname in TRACES:
            path = data_dir / TRACES[tname].file
            if path.exists():
                jobs.append(("benign", trace_scenario(tname, path, seed=seed, storm=False)))
                jobs.append(("storm", trace_scenario(tname, path, seed=seed, storm=True)))
            else:
                print(f"stormguard evaluate: {path} not found; skipping the {tname} trace", file=sys.stderr)
    started = time.monotonic()
    for kind, sc in tqdm(jobs, desc="evaluate", unit="scenario", disable=not progress, file=sys.stderr):
        if kind == "benign":
            benign.append(evaluate_benign(sc, config))
        else:
            lg = live.gateway(sc) if live is not None else None
            storms.append(evaluate_storm(sc, config, lg))
    return to_json(storms, benign, seed, time.monotonic() - started, live is not None)


def to_json(storms: list[ScenarioResult], benign: list[BenignResult], seed: int, seconds: float,
            live: bool = False) -> dict:
    def guard(g: GuardResult) -> dict:
        return {k: v for k, v in g.__dict__.items() if k != "curve"}

    return {
        "seed": seed,
        "mode": "live" if live else "offline",
        "seconds": round(seconds, 1),
        "storms": [{
            "scenario": s.name, "description": s.description, "seed": s.seed, "members": s.members,
            "criterion_max_replies": s.criterion, "passed": s.passed, "events": s.events,
            "unstopped_messages": s.unstopped_messages, "unstopped_deliveries": s.unstopped_deliveries,
            "guards": {n: guard(g) for n, g in s.guards.items()},
            "curves": {n: g.curve for n, g in s.guards.items()},
        } for s in storms],
        "benign": [b.__dict__ for b in benign],
    }


# -- CLI ------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure Stormguard against Exchange's reply-all rule and a static "
                                        "threshold on simulated storms, benign traffic and the real traces")
    p.add_argument("--scenarios", default=",".join(STORM_SCENARIOS + ["benign-week"]),
                   help="comma-separated scenario names (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--benign-days", type=float, default=7.0, help="days of the benign week (default 7)")
    p.add_argument("--no-traces", action="store_true", help="skip the real traces")
    p.add_argument("--data", default=str(DEFAULT_DATA), help=f"directory of the real traces (default {DEFAULT_DATA})")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE (- for stdout)")
    p.add_argument("--report", metavar="DIR", default="out/report",
                   help="write report.md and PNG plots to DIR (default out/report); '' to skip")
    p.add_argument("--live", action="store_true", help="run the storm scenarios through a broker and a worker")
    p.add_argument("--broker", help="with --live: kafka://HOST:PORT of a broker with a running worker "
                                    "(default: start an embedded broker and a worker)")
    p.add_argument("--web-port", type=int, help="with --live and --broker: the worker's HTTP port (default 6066)")
    p.add_argument("--speed", type=float, default=0.0,
                   help="with --live: event-time seconds per wall second for storm posts (default 0: as fast as "
                        "the worker keeps up)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from stream_jobs.settings import policy_from_env

    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    config = policy_from_env()
    live = None
    try:
        if args.live:
            from stream_jobs.evaluation.gateways import LiveSession

            live = LiveSession(broker=args.broker, web_port=args.web_port, speed=args.speed,
                               progress=not args.no_progress).start()
        result = evaluate_all(names, seed=args.seed, benign_days=args.benign_days, traces=not args.no_traces,
                              data_dir=Path(args.data), config=config, progress=not args.no_progress, live=live)
    except ValueError as exc:
        print(f"stormguard evaluate: {exc}", file=sys.stderr)
        return 2
    finally:
        if live is not None:
            live.stop()
    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    if args.report:
        from stream_jobs.evaluation.report import write_report

        path = write_report(result, Path(args.report))
        print(f"stormguard evaluate: report written to {path}", file=sys.stderr)
    from stream_jobs.evaluation.report import summary_table

    print(summary_table(result), file=sys.stderr)
    return 0
