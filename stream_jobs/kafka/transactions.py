"""Does a broker keep Kafka's transaction promises? (``STORMGUARD_EXACTLY_ONCE`` needs them.)

Answering ``InitProducerId`` is not enough: the embedded broker (Tansu 0.6) accepts a transactional
producer, its commits and aborts, and then shows the aborted records to a ``read_committed``
consumer (and loses a later committed one). So the probe does what exactly-once relies on: it
writes a record in a transaction, aborts it, commits another, and reads the partition back
``read_committed``: only the committed record may be there.
"""

from __future__ import annotations

import time
import uuid
from typing import Optional

#: The probe's scratch topic (one partition, deleted after the probe), per consumer group.
PROBE_TOPIC = "{app_id}-transactions-probe"


class NoTransactions(RuntimeError):
    """The broker does not honour Kafka transactions; the message says what it did."""


def check_transactions(servers: list[str], security: dict, app_id: str = "stormguard",
                       timeout: float = 15.0) -> None:
    """Raise :class:`NoTransactions` unless aborted records stay invisible to ``read_committed`` readers."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    topic = PROBE_TOPIC.format(app_id=app_id)
    admin = KafkaAdminClient(bootstrap_servers=servers, client_id="stormguard-probe",
                             request_timeout_ms=int(timeout * 1000), **security)
    try:
        try:
            admin.create_topics([NewTopic(topic, 1, 1)])
        except TopicAlreadyExistsError:
            pass
        marker = uuid.uuid4().hex.encode()
        producer = None
        try:
            producer = KafkaProducer(bootstrap_servers=servers, transactional_id=f"{topic}-{uuid.uuid4().hex}",
                                     max_block_ms=int(timeout * 1000), **security)
            producer.init_transactions()
            producer.begin_transaction()
            producer.send(topic, key=marker, value=b"aborted")
            producer.flush()
            producer.abort_transaction()
            producer.begin_transaction()
            producer.send(topic, key=marker, value=b"committed")
            producer.commit_transaction()
        except KafkaError as exc:
            raise NoTransactions(f"a transactional producer failed: {exc}") from None
        finally:
            if producer is not None:
                producer.close(timeout=2)
        seen = _read_committed(servers, security, TopicPartition(topic, 0), marker, timeout, KafkaConsumer)
        if seen != [b"committed"]:
            raise NoTransactions("a read_committed consumer read " + (", ".join(v.decode() for v in seen) or "nothing")
                                 + " where Kafka shows only the committed record (one aborted, one committed)")
    finally:
        try:
            admin.delete_topics([topic])
        except KafkaError:
            pass
        admin.close()


def _read_committed(servers, security, tp, marker: bytes, timeout: float, KafkaConsumer) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=servers, group_id=None, enable_auto_commit=False,
                             isolation_level="read_committed", **security)
    try:
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        seen: list[bytes] = []
        deadline = time.monotonic() + timeout
        while consumer.position(tp) < end and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                seen += [r.value for r in records if r.key == marker]
        return seen
    finally:
        consumer.close()


def transactions_refusal(broker: str, app_id: str) -> Optional[str]:
    """``None`` if ``broker`` honours transactions, else the line ``stormguard run`` refuses to start with."""
    import logging

    from kafka.errors import KafkaError

    from stream_jobs.kafka.replay import bootstrap_servers, kafka_security

    try:
        check_transactions(bootstrap_servers(broker), kafka_security(), app_id)
    except KafkaError as exc:  # e.g. no right to make the scratch topic: the transactions themselves will tell
        logging.getLogger("stormguard.serve").warning(
            "could not check that %s keeps Kafka transactions (%s); starting exactly-once anyway", broker, exc)
    except NoTransactions as exc:
        return (f"STORMGUARD_EXACTLY_ONCE=true needs Kafka transactions, and the broker at {broker} does not "
                f"honour them: {exc}. The embedded Tansu broker has none; run Apache Kafka "
                "(`stormguard broker --engine kafka`, or your cluster), or unset STORMGUARD_EXACTLY_ONCE")
    return None
