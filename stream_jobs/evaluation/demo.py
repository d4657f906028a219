"""``make demo``: the NHSmail storm of 14 November 2016, replayed live through Stormguard.

``python -m stream_jobs.evaluation.demo`` starts an embedded broker and a worker
(``stormguard run``), then plays the ``nhsmail`` scenario through Kafka with
the simulator acting as the mail gateway: every message is produced to
``mail.events``; posts to lists that ``stormguard.actions`` froze are held,
so the storm really stops. It prints the freeze as it happens, a summary
against Exchange Online's default rule on the same traffic, writes the
report (``out/demo/report.md`` with plots) and stops everything it started.

The live machinery (:class:`~stream_jobs.evaluation.gateways.LiveGateway`,
:class:`~stream_jobs.evaluation.gateways.LiveSession`) is also what
``stormguard evaluate --live`` and ``stormguard simulate --broker`` use.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Optional

from detectors.policy import Action
from stream_jobs.evaluation.gateways import LiveError, LiveGateway, LiveSession, OpenGateway


def run_demo(seed: int = 0, speed: float = 150.0, out: Path = Path("out/demo"), progress: bool = True) -> int:
    from tqdm import tqdm

    from stream_jobs.evaluation.evaluate import evaluate_storm, to_json
    from stream_jobs.evaluation.report import _dur, _num, write_report
    from stream_jobs.evaluation.simulate import scenario, scenario_events

    started = time.monotonic()
    sc = scenario("nhsmail", seed)
    print("Stormguard demo: the NHSmail reply-all storm of 14 November 2016, live.", flush=True)
    print(f"  {sc.description}.", flush=True)
    total = scenario_events(sc, OpenGateway()).events
    bar = None

    def say(text: str) -> None:
        (bar.write if bar is not None else print)(text)

    def on_action(a: Action) -> None:
        when = _dt.datetime.fromtimestamp(a.event_time, _dt.timezone.utc).strftime("%a %d %b %H:%M:%S")
        if a.kind == "freeze" and a.list == sc.storm.list_address:
            say(f"  *** FROZEN {a.list} ({when}, {_dur(a.event_time - sc.storm.at)} after the first post) "
                f"by {a.detector}: {a.reason}")
        elif a.kind == "freeze":
            say(f"  freeze of {a.list} ({when}; background traffic, not the storm): {a.reason}")
        elif a.kind == "alert" and a.list == sc.storm.list_address:
            say(f"  alert on {a.list} ({when}): {a.reason}")

    session = LiveSession(speed=speed, progress=progress, on_action=on_action).start()
    try:
        print("  starting an embedded broker and a worker (stormguard run) ...", flush=True)
        t = time.monotonic()
        gw = session.gateway(sc)
        print(f"  worker ready in {time.monotonic() - t:.1f} s at {session.worker.url}; replaying "
              f"{sc.storm.members:,}-member storm after {(sc.storm.at - sc.start) / 86400:.1f} days of "
              "background mail ...", flush=True)
        bar = tqdm(total=total, unit="msg", desc="gateway → mail.events", file=sys.stdout, disable=not progress,
                   dynamic_ncols=True, mininterval=0.3)
        counting = _Counting(gw, bar)
        result = evaluate_storm(sc, live_gateway=counting)
    finally:
        if bar is not None:
            bar.close()
        session.stop()
    sg, ex = result.guards["stormguard"], result.guards["exchange"]
    print()
    print(f"Summary (seed {seed}, {time.monotonic() - started:.0f} s wall):")
    print(f"  unstopped:  {result.unstopped_messages:,} storm messages, {_num(result.unstopped_deliveries)} "
          "deliveries in 75 min")
    print(f"  Stormguard (live): froze the list {_dur(sg.freeze_after_s)} after the first post, "
          f"{sg.replies_delivered_before_freeze} reply-all(s) delivered; {_num(sg.deliveries)} deliveries made, "
          f"{_num(sg.prevented)} prevented ({sg.prevented_pct:.2f}%)")
    print(f"  Exchange default rule: blocked the thread after {_dur(ex.freeze_after_s)}, "
          f"{ex.replies_delivered_before_freeze} reply-alls delivered; {_num(ex.deliveries)} deliveries made, "
          f"{_num(ex.prevented)} prevented ({ex.prevented_pct:.2f}%)")
    print(f"  Stormguard prevented {_num(sg.prevented - ex.prevented)} more deliveries than Exchange's rule "
          "on the same traffic.")
    report = write_report(to_json([result], [], seed, time.monotonic() - started, live=True), out)
    print(f"  report: {report}")
    ok = bool(result.passed) and sg.replies_delivered == sg.replies_delivered_before_freeze
    if not ok:
        print("Stormguard did not stop the storm within 1 reply-all (or a reply-all got through after the "
              "freeze).", file=sys.stderr)
    return 0 if ok else 1


class _Counting:
    """A gateway wrapper that ticks the progress bar."""

    def __init__(self, gw: LiveGateway, bar):
        self.gw, self.bar, self.name = gw, bar, gw.name

    def submit(self, event: MailEvent) -> bool:
        self.bar.update(1)
        return self.gw.submit(event)

    def freezes(self):
        return self.gw.freezes()

    def alerts(self):
        return self.gw.alerts()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream_jobs.evaluation.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="scenario seed (default 0)")
    p.add_argument("--speed", type=float, default=150.0,
                   help="event-time seconds per wall second for posts to the storm list (default 150)")
    p.add_argument("--out", default="out/demo", help="report directory (default out/demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        return run_demo(args.seed, args.speed, Path(args.out), not args.no_progress)
    except LiveError as exc:
        print(f"stormguard demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
