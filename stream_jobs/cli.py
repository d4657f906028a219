"""``stormguard``: the command line.

Core commands live here; each later capability registers its own
sub-commands from its module (listed in ``EXTENSIONS``) through a
``register(subparsers)`` function. Handlers import heavy modules (Faust,
matplotlib) lazily, so ``stormguard score`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from stream_jobs.settings import SettingsError

#: Modules that add sub-commands: each defines ``register(subparsers)``.
EXTENSIONS: list[str] = [
    "stream_jobs.core_commands",
    "stream_jobs.learn",
    "stream_jobs.actions.deliver",
    "stream_jobs.postfix.ingest",
    "stream_jobs.postfix.policy",
    "stream_jobs.postfix.milter",
    "stream_jobs.evaluation.simulate",
    "stream_jobs.evaluation.evaluate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stormguard",
        description="Stops reply-all mail storms in their first seconds.",
        epilog="Settings come from STORMGUARD_* environment variables; see the README.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in EXTENSIONS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose < 2:
        # kafka-python logs every refused connection at ERROR; our own message says it once.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"stormguard: bad setting: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
