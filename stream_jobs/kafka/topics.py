"""Topic admin: follow the topics that exist, create the missing ones, refuse the ones that cannot agree."""

from __future__ import annotations

import logging
import os
from typing import Optional

from stream_jobs.settings import (ACTIONS_TOPIC, COMMANDS_TOPIC, DLQ_TOPIC, EVENTS_TOPIC, LIST_STATE_TOPIC,
                                  THREAD_WATCH_TOPIC, by_list_topic, changelog_topics)

log = logging.getLogger("stormguard.serve")


class TopicMismatch(RuntimeError):
    """A topic that exists cannot work with the others; the message says which, why, and the fix."""


def ensure_topics(broker: str, partitions: int, app_id: str = "stormguard") -> int:
    """Follow the topics that exist, create the missing ones, and return the partition count to use.

    An existing ``mail.events`` decides the partition count of everything the worker makes
    (``partitions`` is only used to create it). A topic that exists and cannot agree (a changelog,
    the by-list topic or the commands topic with another partition count, a ``stormguard.list-state``
    or ``stormguard.thread-watch`` that is not compacted) raises :class:`TopicMismatch`, naming the topic, what it has, what it
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
        for compacted in (LIST_STATE_TOPIC, THREAD_WATCH_TOPIC):
            if compacted not in existing:
                continue
            try:
                configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, compacted)])
                policy = _config_value(configs, compacted, "cleanup.policy")
            except KafkaError as exc:
                policy = None
                log.warning("cannot read the configuration of %s (%s)", compacted, exc)
            if policy is None:
                log.warning("the broker does not say whether %s is compacted; it must be "
                            "(cleanup.policy=compact), or old records vanish from it", compacted)
            elif "compact" not in policy:
                problems.append(
                    f"topic {compacted} has cleanup.policy={policy}; Stormguard needs compact, so that "
                    "every list's (or thread's) current state stays readable however old it is. Fix: "
                    f"kafka-configs.sh --bootstrap-server {bootstrap} --alter --entity-type topics --entity-name "
                    f"{compacted} --add-config cleanup.policy=compact")
        if problems:
            raise TopicMismatch("\n".join(problems))
        wanted = worker_topics(app_id, n)
        new = [NewTopic(name, count, 1, topic_configs=cfg) for name, (count, cfg) in wanted.items()
               if name not in existing]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        # another worker may have just created them: Kafka answers CreateTopics before its metadata has them
        missing = wait_for_metadata(admin, {name: count for name, (count, _) in wanted.items()})
        if missing:
            log.warning("topic(s) %s not yet in the cluster's metadata after %.0f s; the worker starts anyway",
                        ", ".join(missing), METADATA_WAIT_S)
        return n
    except KafkaError as exc:
        log.warning("could not check or create topics on %s: %s", broker, exc)
        return partitions
    finally:
        admin.close()


def worker_topics(app_id: str, partitions: int) -> dict[str, tuple[int, dict]]:
    """Every topic a worker reads or writes: name -> (partitions, topic configs).

    Faust's own are here too (its tables' changelogs, as Faust would make them, and its leader topic), so
    that :func:`ensure_topics` has them in the cluster's metadata before any worker joins the group: a group
    leader that assigned while Kafka was still creating a changelog left it out of every assignment (for 5
    minutes, the consumer's metadata refresh), and a survivor never adopted the lists of a worker that died
    (seen on Apache Kafka; Tansu creates a topic before it answers).

    >>> topics = worker_topics("sg", 4)
    >>> topics["sg-list_models-changelog"], topics["sg-__assignor-__leader"], topics["mail.events"]
    ((4, {'cleanup.policy': 'compact'}), (1, {}), (4, {}))
    """
    n, compact = partitions, {"cleanup.policy": "compact"}
    return {EVENTS_TOPIC: (n, {}), DLQ_TOPIC: (n, {}), ACTIONS_TOPIC: (n, {}), COMMANDS_TOPIC: (n, {}),
            by_list_topic(app_id): (n, {}), LIST_STATE_TOPIC: (n, compact), THREAD_WATCH_TOPIC: (n, compact),
            **{name: (n, compact) for name in changelog_topics(app_id)}, leader_topic(app_id): (1, {})}


#: Longest wait for topics just created to appear, with all their partitions, in the cluster's metadata (s).
METADATA_WAIT_S = 30.0


def leader_topic(app_id: str) -> str:
    """Faust's topic that marks its group leader (one partition)."""
    return f"{app_id}-__assignor-__leader"


def wait_for_metadata(admin, wanted: dict[str, int], timeout: float = METADATA_WAIT_S) -> list[str]:
    """Wait until the cluster's metadata has every topic of ``wanted`` with its partitions, each with a leader;
    returns those still missing after ``timeout`` seconds (Kafka answers CreateTopics before every broker knows)."""
    import time

    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout
    while True:
        try:
            described = admin.describe_topics(list(wanted))
        except KafkaError:
            described = []
        ready = {t["name"] for t in described
                 if not t.get("error_code") and len(t.get("partitions") or ()) == wanted[t["name"]]
                 and all(p.get("leader_id", p.get("leader", -1)) >= 0 for p in t["partitions"])}
        missing = sorted(set(wanted) - ready)
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.1)


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


def session_timeout_problem(broker: str, session_timeout: float) -> Optional[str]:
    """Why the brokers would refuse a consumer group with this session timeout (seconds), or ``None``.

    A broker refuses a group member whose session timeout is outside its
    ``group.min.session.timeout.ms`` .. ``group.max.session.timeout.ms`` (6 s .. 30 min on a stock
    Apache Kafka), and aiokafka then retries the join for ever; this says so before the worker starts.
    A broker that does not describe its configuration (Tansu) gives no answer: ``None``.
    """
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
    from kafka.errors import KafkaError

    from stream_jobs.kafka.replay import bootstrap_servers, kafka_security

    keys = ("group.min.session.timeout.ms", "group.max.session.timeout.ms")
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers(broker), client_id="stormguard-admin",
                                 request_timeout_ms=10_000, **kafka_security())
    except KafkaError:
        return None
    try:
        node = str(admin.describe_cluster()["brokers"][0]["broker_id"])
        described = admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, node,
                                                           configs={k: None for k in keys})], config_filter="all")
        values = (described.get("broker") or {}).get(node, {}) if isinstance(described, dict) else {}
        low, high = (float(values[k]["value"]) / 1000 if k in values else None for k in keys)
    except (KafkaError, IndexError, KeyError, TypeError, ValueError):
        return None
    finally:
        admin.close()
    if low is not None and session_timeout < low:
        return (f"STORMGUARD_SESSION_TIMEOUT={session_timeout:g} s is below the broker's "
                f"group.min.session.timeout.ms ({low * 1000:.0f} ms): the worker could never join its consumer "
                f"group. Fix: STORMGUARD_SESSION_TIMEOUT={low:g} or more (or lower group.min.session.timeout.ms "
                "on every broker)")
    if high is not None and session_timeout > high:
        return (f"STORMGUARD_SESSION_TIMEOUT={session_timeout:g} s is above the broker's "
                f"group.max.session.timeout.ms ({high * 1000:.0f} ms). Fix: STORMGUARD_SESSION_TIMEOUT={high:g} or less")
    return None
