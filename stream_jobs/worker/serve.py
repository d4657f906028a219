"""``stormguard run``: start (if needed) a broker, make sure the topics exist, run the worker."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

from stream_jobs.settings import (ACTIONS_TOPIC, COMMANDS_TOPIC, DLQ_TOPIC, EVENTS_TOPIC, LIST_STATE_TOPIC,
                                  WorkerSettings, by_list_topic, changelog_topics, history_topic)

log = logging.getLogger("stormguard.serve")


class TopicMismatch(RuntimeError):
    """A topic that exists cannot work with the others; the message says which, why, and the fix."""


def ensure_topics(broker: str, partitions: int, app_id: str = "stormguard") -> int:
    """Follow the topics that exist, create the missing ones, and return the partition count to use.

    An existing ``mail.events`` decides the partition count of everything the worker makes
    (``partitions`` is only used to create it). A topic that exists and cannot agree (a changelog,
    the by-list topic or the commands topic with another partition count, a ``stormguard.list-state``
    that is not compacted) raises :class:`TopicMismatch`, naming the topic, what it has, what it
    needs and the command that fixes it. A broker that cannot be reached or refuses to create topics
    is only warned about: the worker tries anyway.
    """
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    from stream_jobs.kafka.replay import bootstrap_servers, kafka_security

    servers = bootstrap_servers(broker)
    try:
        admin = KafkaAdminClient(bootstrap_servers=servers, client_id="stormguard-admin",
                                 request_timeout_ms=10_000, **kafka_security())
    except KafkaError as exc:
        log.warning("cannot reach %s to check and create topics (%s); the worker will try anyway", broker, exc)
        return partitions
    try:
        existing = {t["name"]: len(t["partitions"]) for t in admin.describe_topics()
                    if not t.get("error_code") and t.get("partitions")}
        n = existing.get(EVENTS_TOPIC, partitions)
        if EVENTS_TOPIC in existing and n != partitions and os.environ.get("STORMGUARD_PARTITIONS"):
            log.warning("%s already has %d partitions: using %d (STORMGUARD_PARTITIONS=%d only applies when "
                        "the worker creates it)", EVENTS_TOPIC, n, n, partitions)
        bootstrap = ",".join(servers)
        problems = []
        for name in [by_list_topic(app_id), COMMANDS_TOPIC] + changelog_topics(app_id):
            have = existing.get(name)
            if have is None or have == n:
                continue
            fix = (f"kafka-topics.sh --bootstrap-server {bootstrap} --alter --topic {name} --partitions {n}"
                   if have < n else
                   f"kafka-topics.sh --bootstrap-server {bootstrap} --delete --topic {name}  "
                   "(a topic cannot lose partitions; the worker makes it again)")
            what = ("its lists' models are re-learned where they moved" if name.endswith("list_models-changelog")
                    else "freezes in it stay in stormguard.list-state for the gateways; re-apply them with "
                         "the admin API" if name.endswith("list_state-changelog") else "nothing is lost")
            problems.append(f"topic {name} has {have} partition(s); Stormguard needs {n}, the partitions of "
                            f"{EVENTS_TOPIC}, so that each list is scored and remembered on one worker. "
                            f"Fix: {fix} ({what})")
        if LIST_STATE_TOPIC in existing:
            try:
                configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, LIST_STATE_TOPIC)])
                policy = _config_value(configs, LIST_STATE_TOPIC, "cleanup.policy")
            except KafkaError as exc:
                policy = None
                log.warning("cannot read the configuration of %s (%s)", LIST_STATE_TOPIC, exc)
            if policy is None:
                log.warning("the broker does not say whether %s is compacted; it must be "
                            "(cleanup.policy=compact), or old freezes vanish from it", LIST_STATE_TOPIC)
            elif "compact" not in policy:
                problems.append(
                    f"topic {LIST_STATE_TOPIC} has cleanup.policy={policy}; Stormguard needs compact, so that "
                    "every list's current state stays readable however old it is. Fix: kafka-configs.sh "
                    f"--bootstrap-server {bootstrap} --alter --entity-type topics --entity-name "
                    f"{LIST_STATE_TOPIC} --add-config cleanup.policy=compact")
        if problems:
            raise TopicMismatch("\n".join(problems))
        wanted = {EVENTS_TOPIC: {}, DLQ_TOPIC: {}, ACTIONS_TOPIC: {}, COMMANDS_TOPIC: {}, by_list_topic(app_id): {},
                  LIST_STATE_TOPIC: {"cleanup.policy": "compact"}}
        new = [NewTopic(name, n, 1, topic_configs=cfg) for name, cfg in wanted.items() if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        return n
    except KafkaError as exc:
        log.warning("could not check or create topics on %s: %s", broker, exc)
        return partitions
    finally:
        admin.close()


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


def _config_value(described, topic: str, key: str) -> Optional[str]:
    """One topic setting from kafka-python's ``describe_configs`` answer (its shape varies by version)."""
    if isinstance(described, dict):  # kafka-python 3: {"topic": {name: {key: value}}}
        value = (described.get("topic") or {}).get(topic, {}).get(key)
        return value if value is None or isinstance(value, str) else str(getattr(value, "value", value))
    for response in described or []:
        for resource in getattr(response, "resources", []):
            for entry in resource[4]:
                if entry[0] == key:
                    return entry[1]
    return None


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
        try:
            partitions = ensure_topics(broker, settings.partitions, settings.app_id)
        except TopicMismatch as exc:
            print(f"stormguard: cannot start: {exc}", file=sys.stderr, flush=True)
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
