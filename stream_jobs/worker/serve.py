"""``stormguard run``: start (if needed) a broker, make sure the topics exist, run the worker."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

from stream_jobs.kafka.topics import TopicMismatch, ensure_topics, session_timeout_problem
from stream_jobs.settings import EVENTS_TOPIC, WorkerSettings, history_topic

log = logging.getLogger("stormguard.serve")


def history_cutoff(broker: str, app_id: str) -> float:
    """The event time up to which ``mail.events`` is history for this consumer group (0: none).

    Decided once, at the group's first start: the newest event then in the topic (a group that has
    committed offsets already predates this and gets 0). The decision is written to
    ``<app id>-history`` and the first record there wins, so a restart, or a second worker starting
    at the same moment, uses the same cut-off: the same events are history everywhere.
    """
    import msgspec
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    from stream_jobs.worker.event_order import event_time_of
    from stream_jobs.kafka.replay import bootstrap_servers, kafka_security

    servers, security = bootstrap_servers(broker), kafka_security()
    topic = history_topic(app_id)
    consumer = KafkaConsumer(bootstrap_servers=servers, group_id=None, enable_auto_commit=False,
                             consumer_timeout_ms=500, **security)

    def read(name: str, partition: int, start_back: Optional[int] = None) -> list:
        tp = TopicPartition(name, partition)
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp]
        begin = consumer.beginning_offsets([tp])[tp]
        if end <= begin:
            return []
        consumer.seek(tp, begin if start_back is None else max(begin, end - start_back))
        records, deadline = [], time.monotonic() + 10
        while time.monotonic() < deadline and (not records or records[-1].offset < end - 1):
            batch = consumer.poll(timeout_ms=300)
            records += [r for rs in batch.values() for r in rs]
            if start_back is None and records:
                break  # the first record is all we need
        return records

    def recorded() -> Optional[float]:
        if not consumer.partitions_for_topic(topic):
            return None
        for record in read(topic, 0):
            return float(msgspec.json.decode(record.value)["learn_only_until"])
        return None

    try:
        cutoff = recorded()
        if cutoff is not None:
            return cutoff
        admin = KafkaAdminClient(bootstrap_servers=servers, client_id="stormguard-admin", **security)
        try:
            admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
        except TopicAlreadyExistsError:
            pass
        finally:
            admin.close()
        cutoff = 0.0
        if not _group_has_offsets(servers, security, app_id):
            for partition in sorted(consumer.partitions_for_topic(EVENTS_TOPIC) or ()):
                for record in read(EVENTS_TOPIC, partition, start_back=20):
                    t = event_time_of(record.value)
                    if t != float("-inf"):
                        cutoff = max(cutoff, t)
        producer = KafkaProducer(bootstrap_servers=servers, **security)
        try:
            producer.send(topic, key=b"history", value=msgspec.json.encode(
                {"learn_only_until": cutoff, "decided_at": time.time()})).get(timeout=10)
        finally:
            producer.close()
        agreed = recorded()
        return cutoff if agreed is None else agreed
    except KafkaError as exc:
        log.warning("could not decide what is history (%s): every event is acted on", exc)
        return 0.0
    finally:
        consumer.close()


def _group_has_offsets(servers: list[str], security: dict, group: str) -> bool:
    """Has this consumer group committed an offset of mail.events (it was running before)?"""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=servers, group_id=group, enable_auto_commit=False, **security)
    try:
        partitions = consumer.partitions_for_topic(EVENTS_TOPIC) or ()
        return any((consumer.committed(TopicPartition(EVENTS_TOPIC, p)) or -1) >= 0 for p in partitions)
    finally:
        consumer.close()


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_worker(broker: Optional[str] = None, web_port: Optional[int] = None, embedded_port: int = 9092) -> int:
    from stream_jobs.kafka.broker import BrokerError, EmbeddedBroker

    embedded = None
    broker = broker or os.environ.get("STORMGUARD_BROKER")
    if not broker:
        try:
            embedded = EmbeddedBroker(port=embedded_port).start()
        except BrokerError as exc:
            print(f"stormguard: could not start an embedded broker: {exc}", file=sys.stderr)
            return 1
        broker = embedded.url
        print(f"stormguard: no --broker given: started an embedded broker (memory only) at {broker}",
              file=sys.stderr, flush=True)
    os.environ["STORMGUARD_BROKER"] = broker
    if web_port is not None:
        os.environ["STORMGUARD_WEB_PORT"] = str(web_port)
    try:
        settings = WorkerSettings.from_env()
        from stream_jobs.kafka.preflight import refusal
        from stream_jobs.kafka.replay import bootstrap_servers

        refused = refusal(bootstrap_servers(broker))  # Faust's client would retry a refused password or certificate for ever
        if refused:
            print(f"stormguard: cannot start: {refused}", file=sys.stderr, flush=True)
            return 2
        try:
            partitions = ensure_topics(broker, settings.partitions, settings.app_id)
        except TopicMismatch as exc:
            print(f"stormguard: cannot start: {exc}", file=sys.stderr, flush=True)
            return 2
        problem = session_timeout_problem(broker, settings.session_timeout)
        if problem:
            print(f"stormguard: cannot start: {problem}", file=sys.stderr, flush=True)
            return 2
        if settings.exactly_once:
            from stream_jobs.kafka.transactions import transactions_refusal

            refusal = transactions_refusal(broker, settings.app_id)
            if refusal:
                print(f"stormguard: cannot start: {refusal}", file=sys.stderr, flush=True)
                return 2
        # the app is built from the environment (below): it makes everything with this count
        os.environ["STORMGUARD_PARTITIONS"] = str(partitions)
        if settings.learn_history and not os.environ.get("STORMGUARD_LEARN_ONLY_UNTIL"):
            cutoff = history_cutoff(broker, settings.app_id)
            os.environ["STORMGUARD_LEARN_ONLY_UNTIL"] = repr(cutoff)
            if cutoff:
                print(f"stormguard: events in {EVENTS_TOPIC} up to {_iso(cutoff)} are history: learned from, "
                      "never acted on", file=sys.stderr, flush=True)
        from faust.worker import Worker

        from stream_jobs.worker.app import create_app

        app = create_app(WorkerSettings.from_env())
        print(f"stormguard: worker {settings.app_id} consuming {EVENTS_TOPIC} from {broker}; "
              f"HTTP on :{settings.web_port} (/healthz, /metrics, /api/lists/ADDRESS)", file=sys.stderr, flush=True)
        loglevel = os.environ.get("STORMGUARD_LOG_LEVEL", "warn").lower()
        worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
        # Faust's terminal spinner sets the root logger to DEBUG, so every debug
        # call in aiokafka and Faust builds a LogRecord (~4% of the worker's time).
        worker.spinner = None
        worker.execute_from_commandline()
        return 0
    finally:
        if embedded is not None:
            embedded.stop()
