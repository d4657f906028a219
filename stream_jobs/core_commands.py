"""The core sub-commands: ``broker``, ``run``, ``score``, ``replay``."""

from __future__ import annotations

import argparse
import sys

from stream_jobs.settings import EVENTS_TOPIC


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run a local broker in the foreground: Apache Kafka (KRaft, one node) "
                                      "or the embedded Tansu")
    p.add_argument("--engine", choices=("kafka", "tansu"), default="kafka",
                   help="kafka: Apache Kafka, data kept in --data-dir (default); tansu: memory only, no JVM")
    p.add_argument("--port", type=int, default=9092, help="TCP port (default 9092)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--data-dir", help="kafka engine: where it keeps its data, formatted on first use "
                                      "(default .stormguard/kafka)")
    p.set_defaults(func=_broker)

    p = sub.add_parser("run", help="run the live worker (starts an embedded broker if none is given)")
    p.add_argument("--broker", help="kafka://HOST:PORT[;kafka://HOST2:PORT] (default $STORMGUARD_BROKER, "
                                    "else an embedded broker)")
    p.add_argument("--web-port", type=int, help="HTTP port for /healthz, /metrics, /api (default 6066)")
    p.add_argument("--embedded-port", type=int, default=9092,
                   help="port of the embedded broker when no --broker is given (default 9092)")
    p.set_defaults(func=_run)

    p = sub.add_parser("score", help="score JSON-lines events offline; action lines on stdout")
    p.add_argument("file", help="events file (JSON lines), or - for stdin")
    p.add_argument("--dead-letters", metavar="FILE",
                   help="also write rejected records (raw line + reason) as JSON lines to FILE")
    p.add_argument("--learn-only-until", type=float, metavar="EPOCH",
                   help="events up to this event time are history: learned from, never acted on, as the live "
                        "worker treats what mail.events held at its first start (its /healthz shows the value)")
    p.set_defaults(func=_score)

    p = sub.add_parser("settings", help="print every setting with its default and meaning (Markdown)")
    p.set_defaults(func=_settings)

    p = sub.add_parser("replay", help=f"produce a JSON-lines events file to {EVENTS_TOPIC}")
    p.add_argument("file", help="events file (JSON lines), or - for stdin")
    p.add_argument("--broker", help="kafka://HOST:PORT (default $STORMGUARD_BROKER or kafka://127.0.0.1:9092)")
    p.add_argument("--rate", type=float, default=0.0, help="events per second (default 0: as fast as possible)")
    p.add_argument("--topic", default=EVENTS_TOPIC, help=f"topic (default {EVENTS_TOPIC})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_replay)


def _settings(args) -> int:
    from stream_jobs.settings import settings_markdown

    sys.stdout.write(settings_markdown())
    return 0


def _broker(args) -> int:
    from pathlib import Path

    from stream_jobs.kafka.broker import BrokerError
    from stream_jobs.kafka.engines import run_foreground

    data_dir = args.data_dir or (".stormguard/kafka" if args.engine == "kafka" else None)
    try:
        return run_foreground(args.port, args.host, engine=args.engine,
                              data_dir=Path(data_dir) if data_dir else None)
    except BrokerError as exc:
        print(f"stormguard: {exc}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from stream_jobs.worker.serve import run_worker

    return run_worker(broker=args.broker, web_port=args.web_port, embedded_port=args.embedded_port)


def _score(args) -> int:
    import msgspec

    from detectors.engine import StormDetector, process_raw
    from detectors.policy import encode_action, shadow
    from stream_jobs.kafka.replay import open_lines, read_records
    from stream_jobs.settings import WorkerSettings, policy_from_env

    policy = policy_from_env()
    if args.learn_only_until is not None:
        policy = msgspec.structs.replace(policy, learn_only_until=args.learn_only_until)
    detector = StormDetector(policy)
    enforce = WorkerSettings.from_env().enforce  # shadow mode stamps decisions as the worker does
    out = sys.stdout.buffer
    dead = open(args.dead_letters, "wb") if args.dead_letters else None
    n = bad = 0
    try:
        with open_lines(args.file) as fh:
            for lineno, raw in enumerate(read_records(fh), start=1):
                outcome = process_raw(detector, raw)
                n += 1
                if outcome.error is not None:
                    bad += 1
                    print(f"stormguard score: record {lineno} dead-lettered: {outcome.error}", file=sys.stderr)
                    if dead:
                        dead.write(msgspec.json.encode({"record": lineno, "reason": outcome.error,
                                                        "raw": raw.decode("utf-8", "replace")}) + b"\n")
                for action in outcome.actions:
                    out.write(encode_action(action if enforce else shadow(action)) + b"\n")
    except FileNotFoundError:
        print(f"stormguard score: no such file: {args.file}", file=sys.stderr)
        return 2
    finally:
        if dead:
            dead.close()
        out.flush()
    print(f"stormguard score: {n} records, {bad} dead-lettered", file=sys.stderr)
    return 0


def _replay(args) -> int:
    from stream_jobs.kafka.replay import ReplayError, replay_file

    try:
        n = replay_file(args.file, broker=args.broker, rate=args.rate, topic=args.topic,
                        progress=not args.no_progress)
    except FileNotFoundError:
        print(f"stormguard replay: no such file: {args.file}", file=sys.stderr)
        return 2
    except ReplayError as exc:
        print(f"stormguard replay: {exc}", file=sys.stderr)
        return 1
    print(f"stormguard replay: produced {n} events to {args.topic}", file=sys.stderr)
    return 0
