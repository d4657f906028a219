"""``stormguard learn``: seed the list models from an archive before a first start.

Kafka keeps days of ``mail.events``; an archive (JSON lines, or a Postfix
maillog read by the ingest parser) can hold months. ``learn`` runs the archive
through the same :class:`~detectors.engine.StormDetector` as the worker, with
every event history (learned from, never acted on), and writes what it learned
to the changelog the worker restores its list models from
(``<app id>-list_models-changelog``): each list on the partition that owns it,
as the worker's own saves are. The worker then starts with every list's norm,
age and regular posters already known, so its first day is not a cold start.

Events of the archive at or after the oldest event ``mail.events`` still holds
are skipped: the worker learns those from the topic at its first start, and a
list learned twice would count its replies twice.

It refuses to overwrite a changelog that already holds models (the worker has
run: what it learned is newer than any archive) unless told ``--force``.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator, Optional

import msgspec

from stream_jobs.settings import EVENTS_TOPIC

#: The key of the stream-wide counters in the list-models changelog (the worker's ``_META_KEY``).
META_KEY = "__stormguard_meta__"


class LearnError(RuntimeError):
    """The archive cannot be learned into this broker; the message says why and what to do."""


def list_models_topic(app_id: str) -> str:
    return f"{app_id}-list_models-changelog"


def home_partition(address: str, partitions: int) -> int:
    """The partition that owns a list: ``murmur2(list) % partitions``, as the worker routes its shares.

    >>> home_partition("all@nhs.net", 6) == home_partition("all@nhs.net", 6) < 6
    True
    """
    from kafka.partitioner.default import murmur2

    return (murmur2(address.encode()) & 0x7FFFFFFF) % partitions


@dataclass
class LearnResult:
    events: int = 0
    learned: int = 0
    #: Events at or after ``until`` (the topic holds them).
    skipped: int = 0
    #: Records that could not be parsed or placed in time, with the first few reasons.
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)
    first: Optional[float] = None
    last: Optional[float] = None


def learn_events(detector, records: Iterable[bytes], until: float = math.inf,
                 result: Optional[LearnResult] = None) -> LearnResult:
    """Learn ``records`` (raw JSON events) into ``detector`` as history; stop counting at ``until``.

    The detector's policy must make every event history (``learn_only_until`` = inf), so that
    learning takes no action:

    >>> from detectors.engine import StormDetector
    >>> from detectors.policy import PolicyConfig
    >>> det = StormDetector(PolicyConfig(learn_only_until=math.inf))
    >>> raw = [b'{"message_id": "m%d", "timestamp": %d, "sender": "a@x", "recipients": ["l@x"], '
    ...        b'"lists": {"l@x": 900}}' % (i, 1e9 + i) for i in range(3)] + [b"not json"]
    >>> r = learn_events(det, raw, until=1e9 + 2)
    >>> (r.events, r.learned, r.skipped, r.rejected), sorted(det.lists)
    ((4, 2, 1, 1), ['l@x'])
    """
    from detectors.engine import process_raw
    from detectors.events import InvalidEvent, parse_event

    if not math.isinf(detector.config.learn_only_until):
        raise ValueError("learn_events needs a detector whose every event is history (learn_only_until=inf)")
    result = result or LearnResult()
    for raw in records:
        result.events += 1
        try:
            t = parse_event(raw).event_time
        except InvalidEvent as exc:
            _reject(result, str(exc))
            continue
        if t >= until:
            result.skipped += 1
            continue
        outcome = process_raw(detector, raw)
        if outcome.error is not None:
            _reject(result, outcome.error)
            continue
        result.learned += 1
        result.first = t if result.first is None else min(result.first, t)
        result.last = t if result.last is None else max(result.last, t)
    return result


def _reject(result: LearnResult, reason: str) -> None:
    result.rejected += 1
    if len(result.reasons) < 5:
        result.reasons.append(reason)


def changelog_records(detector, partitions: int) -> Iterator[tuple[int, bytes, bytes]]:
    """(partition, key, value) of every list model, then the stream's counters on every partition.

    Keys are JSON (the table's key serializer), values the pickled model, as the worker writes them.
    The watermark is left out: the worker's stream starts where ``mail.events`` does, not where the
    archive ends.
    """
    for address, state in detector.lists.items():
        yield (home_partition(address, partitions), msgspec.json.encode(address),
               pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
    meta = msgspec.json.encode({"events_seen": detector.events_seen, "watermark": None,
                                "largest_list": detector.largest_list})
    for p in range(partitions):
        yield p, msgspec.json.encode(META_KEY), meta


# -- the broker side ------------------------------------------------------------------------
def _consumer(servers: list[str], security: dict):
    from kafka import KafkaConsumer

    return KafkaConsumer(bootstrap_servers=servers, group_id=None, enable_auto_commit=False,
                         consumer_timeout_ms=500, **security)


def records_held(consumer, topic: str) -> int:
    """How many records ``topic`` holds (0 if it does not exist)."""
    from kafka import TopicPartition

    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not tps:
        return 0
    ends, begins = consumer.end_offsets(tps), consumer.beginning_offsets(tps)
    return sum(max(0, ends[tp] - begins[tp]) for tp in tps)


def oldest_event_time(consumer, topic: str = EVENTS_TOPIC) -> float:
    """The oldest event time among the first records of each partition of ``topic`` (inf: none)."""
    from kafka import TopicPartition

    from stream_jobs.worker.event_order import event_time_of

    oldest = math.inf
    for p in sorted(consumer.partitions_for_topic(topic) or ()):
        tp = TopicPartition(topic, p)
        consumer.assign([tp])
        begin, end = consumer.beginning_offsets([tp])[tp], consumer.end_offsets([tp])[tp]
        if end <= begin:
            continue
        consumer.seek(tp, begin)
        records, deadline = [], time.monotonic() + 10
        while not records and time.monotonic() < deadline:
            records = [r for rs in consumer.poll(timeout_ms=300, max_records=20).values() for r in rs]
        for r in records:
            t = event_time_of(r.value)
            if t != float("-inf"):
                oldest = min(oldest, t)
    return oldest


def _ensure_changelog(servers: list[str], security: dict, topic: str, partitions: int) -> None:
    """Make the list-models changelog as Faust would (compacted), with the worker's partition count:
    a topic auto-created by the first write would get the broker's default count, which the worker
    then refuses."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=servers, client_id="stormguard-learn", **security)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1, topic_configs={"cleanup.policy": "compact"})])
    except TopicAlreadyExistsError:
        pass  # ensure_topics has checked its partition count
    finally:
        admin.close()


def write_changelog(servers: list[str], security: dict, topic: str, records: list[tuple[int, bytes, bytes]],
                    progress: bool = True) -> None:
    from kafka import KafkaProducer
    from tqdm import tqdm

    producer = KafkaProducer(bootstrap_servers=servers, acks="all", max_request_size=8 * 1024 * 1024, **security)
    try:
        futures = []
        for partition, key, value in tqdm(records, desc="write list models", unit="model", disable=not progress,
                                          file=sys.stderr):
            futures.append(producer.send(topic, key=key, value=value, partition=partition))
        producer.flush()
        for f in futures:
            f.get(timeout=30)  # raises the broker's refusal, if any
    finally:
        producer.close()


# -- reading an archive -----------------------------------------------------------------------
def sniff_format(head: bytes, name: str = "-") -> str:
    """``jsonl`` for a ``.jsonl``/``.ndjson``/``.json`` file or one whose first non-blank line is a JSON
    object, else ``postfix-log``.

    >>> sniff_format(b'\\n{"message_id": "m1"}\\n'), sniff_format(b"Nov 14 10:00:01 mx postfix/qmgr[1]: ...")
    ('jsonl', 'postfix-log')
    >>> sniff_format(b"not json", "events.jsonl")
    'jsonl'
    """
    if name.lower().endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    for line in head.splitlines():
        if line.strip():
            return "jsonl" if line.lstrip().startswith(b"{") else "postfix-log"
    return "jsonl"


class _Counting:
    """A binary file that moves a progress bar by the bytes read through it."""

    def __init__(self, fh: BinaryIO, bar):
        self.fh, self.bar = fh, bar

    def __iter__(self):
        for line in self.fh:
            self.bar.update(len(line))
            yield line


def archive_records(fh: Iterable[bytes], fmt: str, args) -> Iterator[bytes]:
    """Raw JSON events from an archive: JSON lines as they are, a maillog through the ingest parser."""
    from detectors.events import encode_event
    from stream_jobs.kafka.replay import read_records

    if fmt == "jsonl":
        yield from read_records(fh)
        return
    from stream_jobs.postfix.ingest import PostfixLogParser, _ListSource, _parse_list_counts

    tz = None
    if args.timezone:
        from zoneinfo import ZoneInfo

        tz = ZoneInfo(args.timezone)
    lists = _ListSource(args.lists, _parse_list_counts(args.list_counts), args.min_members).load()
    if not lists:
        print("stormguard learn: no lists known (--lists or --list): a maillog teaches only senders, which "
              "the worker does not keep", file=sys.stderr)
    parser = PostfixLogParser(lists, min_members=args.min_members, tz=tz)
    for line in fh:
        for event in parser.feed(line.decode("utf-8", "replace")):
            yield encode_event(event)
    for event in parser.flush(None):
        yield encode_event(event)


# -- the command ----------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learn", help="seed the worker's list models from an archive (JSON lines or a Postfix "
                                     "maillog) before its first start",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("file", help="the archive: JSON-lines events or a Postfix maillog, or - for stdin")
    p.add_argument("--format", choices=("auto", "jsonl", "postfix-log"), default="auto",
                   help="what the archive is (default auto: JSON lines if it is named *.jsonl, *.ndjson or *.json "
                        "or its first line is a JSON object, else a Postfix maillog)")
    p.add_argument("--broker", help="kafka://HOST:PORT (default $STORMGUARD_BROKER or kafka://127.0.0.1:9092)")
    p.add_argument("--force", action="store_true",
                   help="overwrite list models the worker already wrote (they are newer than any archive)")
    p.add_argument("--lists", action="append", default=[], metavar="FILE",
                   help="maillog: Postfix virtual(5) alias table, as for `ingest postfix-log` (repeatable)")
    p.add_argument("--list", action="append", default=[], metavar="ADDRESS=MEMBERS", dest="list_counts",
                   help="maillog: a list and its member count (repeatable)")
    p.add_argument("--min-members", type=int, default=2, help="maillog: an alias is a list from this many "
                                                             "final addresses (default 2)")
    p.add_argument("--timezone", metavar="TZ", help="maillog: IANA zone of classic syslog time stamps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_learn)


def _learn(args) -> int:
    from kafka.errors import KafkaError
    from tqdm import tqdm

    from detectors.engine import StormDetector
    from stream_jobs.kafka.preflight import BrokerUnreachable, check_brokers
    from stream_jobs.kafka.replay import bootstrap_servers, kafka_security
    from stream_jobs.kafka.topics import TopicMismatch, ensure_topics
    from stream_jobs.settings import WorkerSettings, policy_from_env

    if args.broker:
        os.environ["STORMGUARD_BROKER"] = args.broker
    settings = WorkerSettings.from_env()
    broker = args.broker or os.environ.get("STORMGUARD_BROKER") or "kafka://127.0.0.1:9092"
    servers, security = bootstrap_servers(broker), kafka_security()
    topic = list_models_topic(settings.app_id)
    try:
        fh: BinaryIO = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as exc:
        print(f"stormguard learn: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        try:
            # a wrong password or CA says so at once, not as kafka-python's retries until its timeout
            check_brokers(servers, settings)
            partitions = ensure_topics(broker, settings.partitions, settings.app_id)
            consumer = _consumer(servers, security)
        except TopicMismatch as exc:
            print(f"stormguard learn: {exc}", file=sys.stderr)
            return 2
        except BrokerUnreachable as exc:
            print(f"stormguard learn: {exc}", file=sys.stderr)
            return 1
        except KafkaError as exc:
            print(f"stormguard learn: cannot reach the broker at {broker}: {exc}", file=sys.stderr)
            return 1
        try:
            _ensure_changelog(servers, security, topic, partitions)
            held = records_held(consumer, topic)
            if held and not args.force:
                print(f"stormguard learn: {topic} already holds {held} record(s): the worker has learned there "
                      "already, and what it learned is newer than the archive. --force overwrites it",
                      file=sys.stderr)
                return 2
            until = oldest_event_time(consumer, EVENTS_TOPIC)
        finally:
            consumer.close()

        fmt = args.format
        if fmt == "auto":
            head = fh.peek(4096)[:4096] if hasattr(fh, "peek") else b"{"
            fmt = sniff_format(head, args.file)
        size = os.fstat(fh.fileno()).st_size if args.file != "-" else None
        policy = msgspec.structs.replace(policy_from_env(), learn_only_until=math.inf)
        detector = StormDetector(policy)
        started = time.monotonic()
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"learn {fmt}", disable=args.no_progress,
                  file=sys.stderr) as bar:
            result = learn_events(detector, archive_records(_Counting(fh, bar), fmt, args), until)
    finally:
        fh.close()

    for reason in result.reasons:
        print(f"stormguard learn: rejected: {reason}", file=sys.stderr)
    if result.skipped:
        print(f"stormguard learn: skipped {result.skipped} event(s) at or after {_iso(until)}: {EVENTS_TOPIC} "
              "holds them, and the worker learns them there", file=sys.stderr)
    if not result.learned:
        print(f"stormguard learn: nothing learned from {args.file} ({result.events} record(s), "
              f"{result.rejected} rejected); {topic} left as it was", file=sys.stderr)
        return 1
    records = list(changelog_records(detector, partitions))
    try:
        write_changelog(servers, security, topic, records, progress=not args.no_progress)
    except KafkaError as exc:
        print(f"stormguard learn: could not write {topic}: {exc!r}", file=sys.stderr)
        return 1
    print(f"stormguard learn: learned {result.learned} event(s) from {_iso(result.first)} to {_iso(result.last)} "
          f"({result.rejected} rejected) in {time.monotonic() - started:.1f} s: {len(detector.lists)} list "
          f"model(s) written to {topic} ({partitions} partition(s)); the worker adopts them when it starts",
          file=sys.stderr)
    return 0


def _iso(t: Optional[float]) -> str:
    from stream_jobs.worker.serve import _iso as iso

    return "-" if t is None or math.isinf(t) else iso(t)
