"""``stormguard run``: start (if needed) a broker, make sure the topics exist, run the worker."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from stream_jobs.settings import (ACTIONS_TOPIC, COMMANDS_TOPIC, DLQ_TOPIC, EVENTS_TOPIC, LIST_STATE_TOPIC,
                                  WorkerSettings)

log = logging.getLogger("stormguard.serve")


def ensure_topics(broker: str, partitions: int) -> None:
    """Create Stormguard's topics where missing; a broker that refuses is only warned about.

    ``stormguard.list-state`` is compacted: it holds the current state of every
    list for gateways to read, however long ago the list was frozen.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    from stream_jobs.replay import bootstrap_servers, kafka_security

    wanted = {EVENTS_TOPIC: {}, DLQ_TOPIC: {}, ACTIONS_TOPIC: {}, COMMANDS_TOPIC: {},
              LIST_STATE_TOPIC: {"cleanup.policy": "compact"}}
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers(broker), client_id="stormguard-admin",
                                 request_timeout_ms=10_000, **kafka_security())
    except KafkaError as exc:
        log.warning("cannot reach %s to create topics (%s); the worker will try anyway", broker, exc)
        return
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, partitions, 1, topic_configs=cfg) for name, cfg in wanted.items()
               if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    except KafkaError as exc:
        log.warning("could not create topics on %s: %s", broker, exc)
    finally:
        admin.close()


def run_worker(broker: Optional[str] = None, web_port: Optional[int] = None, embedded_port: int = 9092) -> int:
    from stream_jobs.broker import BrokerError, EmbeddedBroker

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
        ensure_topics(broker, settings.partitions)
        from faust.worker import Worker

        from stream_jobs.worker import app

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
