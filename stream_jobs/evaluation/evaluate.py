"""``stormguard evaluate``: Stormguard against Exchange's rule and a static threshold.

Each storm scenario is run in a closed loop six times, from the same seed:
with no protection (the storm as it was), with Stormguard as the gateway's
decision maker (list freezes), with Stormguard and ``stormguard milter`` in the
gateway (thread hold: replies into a thread Stormguard holds are held too), with Exchange Online's reply-all rule at its documented default
(10 reply-alls to 2,500+ recipients) and at its tightest setting (5 to 1,000+),
and with a static list rate limit (:mod:`detectors.peers`). Because the simulated storm only
grows from delivered messages, every run is the unstopped one pruned where its
rule started holding mail, so deliveries prevented are like for like.

Benign traffic (a simulated week of a 50,000-person organisation, a first
deployment among lively discussion lists, such lists created in a warm
stream, and the two real traces of ``../shared/data``) is run once through
every rule, to count false freezes and alerts. A storm is then injected into each real trace
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
from stream_jobs.evaluation.simulate import (BENIGN_SCENARIOS, STORM_SCENARIOS, Run, Scenario, scenario,
                                             scenario_events)

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

    def is_storm(t: float, k: Optional[str]) -> bool:
        # a freeze of the storm's list before the storm began is a false freeze (its own first post, days before)
        return t >= t0 and (k in storm_keys or (k or "").startswith("s:") and _thread_is_storm(run, k))

    mine = [t for t, k in freezes if is_storm(t, k)]
    freeze_t = min(mine) if mine else None
    replies = [(t, ok) for t, _, ok, reply in run.storm_log if reply]
    delivered = sum(1 for _, ok in replies if ok)
    before = sum(1 for t, ok in replies if ok and (freeze_t is None or t <= freeze_t))
    made = sum(d for _, d, ok, _ in run.storm_log if ok)
    prevented = max(0, unstopped - made)
    false = [k for t, k in freezes if not is_storm(t, k)]
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
    #: The detector started with no history on the storm's day (issue 14).
    cold: bool = False

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
        gws.pop("thread-hold")  # the live run sends Stormguard's gateway only
    guards = {"unstopped": GuardResult("unstopped", None, sum(1 for r in open_run.storm_log if r[3]),
                                       sum(1 for r in open_run.storm_log if r[3]), unstopped, 0, 0.0, 0, 0,
                                       _curve(open_run, t0))}
    events = open_run.events
    for name, gw in gws.items():
        run = scenario_events(sc, gw)
        guards[name] = measure(run, gw, unstopped, t0, sc.storm.list_address)
    return ScenarioResult(sc.name, sc.description, sc.seed, sc.criterion, sc.storm.members, events,
                          open_run.storm_messages, unstopped, guards, sc.cold)


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
    #: Benign messages the thread-hold gateway held because they replied into a held thread (every one
    #: held needlessly: a moderator releases it, or ``stormguard milter`` does when the hold ends).
    thread_held: int = 0


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
                        {n: sorted({str(k) for _, k in g.freezes()})[:20] for n, g in gws.items()},
                        getattr(gws.get("thread-hold"), "thread_held", 0))


# -- the whole evaluation --------------------------------------------------------------------------
def _jobs(scenarios: list[str], seed: int, benign_days: float, traces: bool, data_dir: Path) -> list[tuple[str, Any]]:
    """(kind, scenario builder) for one seed; scenarios are built when their turn comes (the traces are big)."""
    jobs: list[tuple[str, Any]] = []
    for name in scenarios:
        days = benign_days if name == "benign-week" else None
        jobs.append(("benign" if name in BENIGN_SCENARIOS else "storm",
                     lambda name=name, days=days: scenario(name, seed, days)))
        jobs[-1][1]()  # an unknown name fails now, not halfway through
    if traces:
        from stream_jobs.evaluation.traces import TRACES, trace_scenario

        for tname in TRACES:
            path = data_dir / TRACES[tname].file
            if path.exists():
                for storm in (False, True):
                    jobs.append(("storm" if storm else "benign",
                                 lambda tname=tname, path=path, storm=storm: trace_scenario(tname, path, seed=seed,
                                                                                             storm=storm)))
            else:
                print(f"stormguard evaluate: {path} not found; skipping the {tname} trace", file=sys.stderr)
    return jobs


def _run_job(kind: str, build, config: Optional[PolicyConfig], live) -> Any:
    sc = build()
    if kind == "benign":
        return evaluate_benign(sc, config)
    return evaluate_storm(sc, config, live.gateway(sc) if live is not None else None)


def evaluate_all(scenarios: list[str], seed: int = 0, benign_days: float = 7.0, traces: bool = True,
                 data_dir: Path = DEFAULT_DATA, config: Optional[PolicyConfig] = None, progress: bool = True,
                 live=None) -> dict:
    from tqdm import tqdm

    jobs = _jobs(scenarios, seed, benign_days, traces, data_dir)
    started = time.monotonic()
    results = [_run_job(kind, build, config, live)
               for kind, build in tqdm(jobs, desc="evaluate", unit="scenario", disable=not progress, file=sys.stderr)]
    return to_json([r for r in results if isinstance(r, ScenarioResult)],
                   [r for r in results if isinstance(r, BenignResult)], seed, time.monotonic() - started,
                   live is not None)


def evaluate_seeds(scenarios: list[str], seeds: list[int], benign_days: float = 7.0, traces: bool = True,
                   data_dir: Path = DEFAULT_DATA, config: Optional[PolicyConfig] = None,
                   progress: bool = True) -> dict:
    """:func:`evaluate_all` for each seed (offline), with one progress bar over every scenario of every seed."""
    from tqdm import tqdm

    jobs = [(seed, kind, build) for seed in seeds for kind, build in _jobs(scenarios, seed, benign_days, traces,
                                                                          data_dir)]
    started = time.monotonic()
    per_seed: dict[int, list] = {seed: [] for seed in seeds}
    with tqdm(total=len(jobs), desc=f"evaluate {len(seeds)} seeds", unit="scenario", disable=not progress,
              file=sys.stderr) as bar:
        for seed, kind, build in jobs:
            bar.set_postfix_str(f"seed {seed}", refresh=False)
            per_seed[seed].append(_run_job(kind, build, config, None))
            bar.update()
    runs = [to_json([r for r in rs if isinstance(r, ScenarioResult)], [r for r in rs if isinstance(r, BenignResult)],
                    seed, 0.0) for seed, rs in per_seed.items()]
    for run in runs:
        for s in run["storms"]:
            s.pop("curves")  # 20 seeds of plot data is megabytes nobody reads
    return {"seeds": list(seeds), "mode": "offline", "seconds": round(time.monotonic() - started, 1), "runs": runs}


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
            "criterion_max_replies": s.criterion, "passed": s.passed, "cold": s.cold, "events": s.events,
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
    p.add_argument("--scenarios", default=",".join(STORM_SCENARIOS + BENIGN_SCENARIOS),
                   help="comma-separated scenario names (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--seeds", type=_seed_list, metavar="A-B|A,B,...",
                   help="evaluate every one of these seeds (offline) and report them seed by seed, e.g. 0-19")
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


def _seed_list(text: str) -> list[int]:
    """``0-19`` or ``0,3,7`` (or both: ``0-4,9``).

    >>> _seed_list("0-3,9")
    [0, 1, 2, 3, 9]
    """
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are A-B or A,B,...: {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds")
    return list(dict.fromkeys(seeds))


def _evaluate(args) -> int:
    from stream_jobs.settings import policy_from_env

    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    config = policy_from_env()
    if args.seeds:
        return _evaluate_seeds(args, names, config)
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


def _evaluate_seeds(args, names: list[str], config: PolicyConfig) -> int:
    from stream_jobs.evaluation.report import seeds_markdown

    if args.live:
        print("stormguard evaluate: --seeds runs offline only", file=sys.stderr)
        return 2
    try:
        result = evaluate_seeds(names, args.seeds, benign_days=args.benign_days, traces=not args.no_traces,
                                data_dir=Path(args.data), config=config, progress=not args.no_progress)
    except ValueError as exc:
        print(f"stormguard evaluate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    md = seeds_markdown(result)
    if args.report:
        directory = Path(args.report)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "seeds.md").write_text(md)
        print(f"stormguard evaluate: report written to {directory / 'seeds.md'}", file=sys.stderr)
    print(md, file=sys.stderr)
    return 0
