"""Settings from the environment: one place, each with its default and meaning.

Policy thresholds are ``STORMGUARD_<FIELD>`` for every field of
:class:`detectors.policy.PolicyConfig` (``STORMGUARD_MIN_REPLIES=3``); sets
take comma-separated values. Secrets may also come from a file named by
``<NAME>_FILE`` (Docker and Kubernetes secrets), and are never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import msgspec

from detectors.policy import PolicyConfig

#: The topics of the event contract.
EVENTS_TOPIC = "mail.events"
DLQ_TOPIC = "mail.events.dlq"
ACTIONS_TOPIC = "stormguard.actions"
LIST_STATE_TOPIC = "stormguard.list-state"
#: Threads whose replies gateways hold (compacted, keyed ``<list> <root message-id>``): ``stormguard milter``.
THREAD_WATCH_TOPIC = "stormguard.thread-watch"
#: Operators' freeze/unfreeze commands from the admin API, applied in stream order.
COMMANDS_TOPIC = "stormguard.commands"
#: Records the worker's event-time merge holds at most before the oldest go through anyway
#: (``EventTimeScheduler.max_held`` in stream_jobs/worker/event_order.py says why this many); here, without
#: Faust, so that the settings that depend on it can quote it.
ORDER_MAX_HELD = 200_000


def by_list_topic(app_id: str) -> str:
    """The internal topic that carries each list's share of a message to the worker that owns the list.

    >>> by_list_topic("stormguard")
    'stormguard-mail.events-by-list'
    """
    return f"{app_id}-{EVENTS_TOPIC}-by-list"


def history_topic(app_id: str) -> str:
    """Where a consumer group's first start records which events were history (one record, compacted)."""
    return f"{app_id}-history"


def changelog_topics(app_id: str) -> list[str]:
    """The worker's table changelogs (Faust names them ``<app id>-<table>-changelog``)."""
    return [f"{app_id}-list_state-changelog", f"{app_id}-list_models-changelog"]


class SettingsError(ValueError):
    """A setting has a value Stormguard cannot use; the message names it."""


def secret(name: str, environ: Optional[dict] = None) -> Optional[str]:
    """``NAME`` from the environment, or the contents of the file named by ``NAME_FILE``."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value:
        return value
    path = env.get(f"{name}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip() or None
        except OSError as exc:
            raise SettingsError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    return None


def policy_from_env(environ: Optional[dict] = None) -> PolicyConfig:
    """A :class:`PolicyConfig` with every ``STORMGUARD_<FIELD>`` override applied."""
    env = os.environ if environ is None else environ
    overrides: dict = {}
    for name, ftype in zip(PolicyConfig.__struct_fields__, _field_types()):
        raw = env.get(f"STORMGUARD_{name.upper()}")
        if raw is None or raw == "":
            continue
        try:
            if ftype is frozenset:
                overrides[name] = frozenset(v.strip() for v in raw.split(",") if v.strip())
            elif ftype is int:
                overrides[name] = int(raw)
            else:
                overrides[name] = float(raw)
        except ValueError:
            raise SettingsError(f"STORMGUARD_{name.upper()}={raw!r} is not a valid {ftype.__name__}") from None
    try:
        return msgspec.structs.replace(PolicyConfig(), **overrides)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _field_types() -> list[type]:
    defaults = PolicyConfig()
    return [type(getattr(defaults, name)) for name in PolicyConfig.__struct_fields__]


@dataclass(frozen=True)
class WorkerSettings:
    """How the live worker connects and serves; see the README's settings table."""

    broker: Optional[str] = None
    web_port: int = 6066
    web_host: str = "0.0.0.0"
    app_id: str = "stormguard"
    partitions: int = 1
    data_dir: str = ".stormguard"
    session_timeout: float = 6.0
    heartbeat_interval: float = 0.5
    fetch_max_wait_ms: int = 30
    commit_interval: float = 2.8
    fast_drain: bool = True
    model_save_ms: int = 500
    gc_freeze_s: float = 5.0
    gc_catch_up_threshold: int = 2_000_000
    order_wait_ms: int = 2000
    latency_trace: bool = False
    enforce: bool = True
    learn_history: bool = True
    dlq_max_bytes: int = 900_000
    exactly_once: bool = False
    crash_on_message_id: Optional[str] = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    sasl_mechanism: Optional[str] = None
    sasl_username: Optional[str] = None
    sasl_password: Optional[str] = field(default=None, repr=False)
    ssl_cafile: Optional[str] = None
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None

    def faust_app_options(self) -> dict:
        """Keyword arguments of ``faust.App`` shared by the worker and the bench's no-op agent."""
        return dict(
            broker=self.broker or "kafka://127.0.0.1:9092",
            store="memory://",
            datadir=self.data_dir,
            web_port=self.web_port,
            web_bind=self.web_host,
            web_enabled=True,
            topic_partitions=self.partitions,
            consumer_auto_offset_reset="earliest",
            # The defaults (session 60 s, rebalance 60 s) make a worker wait ~30 s to
            # join its group; these make it ready in a few seconds, and let a
            # surviving worker take over a dead one's partitions just as fast.
            broker_session_timeout=self.session_timeout,
            broker_heartbeat_interval=self.heartbeat_interval,
            broker_rebalance_timeout=self.session_timeout,
            broker_request_timeout=max(30.0, self.session_timeout * 2),
            broker_commit_interval=self.commit_interval,
            producer_linger_ms=0,
            # a dead-letter envelope always fits: dlq_max_bytes plus the record's key and headers
            producer_max_request_size=max(1_048_576, self.dlq_max_bytes + 65_536),
            # Kafka transactions (worker/faust_tuning.py, SourceTransactions): actions, dead letters, list models
            # and offsets of one partition commit together
            processing_guarantee="exactly_once" if self.exactly_once else "at_least_once",
            **self.kafka_client_options(),
        )

    @property
    def tls(self) -> bool:
        return bool(self.ssl_cafile or self.ssl_certfile)

    def kafka_client_options(self) -> dict:
        """TLS and SASL for production brokers, passed through to Faust (and so to aiokafka)."""
        import ssl

        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        if self.sasl_mechanism:
            import faust

            return {"broker_credentials": faust.SASLCredentials(
                username=self.sasl_username, password=self.sasl_password,
                mechanism=self.sasl_mechanism, ssl_context=context)}
        if context is not None:
            import faust

            return {"broker_credentials": faust.SSLCredentials(context)}
        return {}

    def kafka_python_options(self) -> dict:
        """The same TLS and SASL settings, for the kafka-python clients (replay, ingest, policy, admin)."""
        opts: dict = {}
        if self.tls:
            opts.update(ssl_cafile=self.ssl_cafile, ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        if self.sasl_mechanism:
            opts.update(security_protocol="SASL_SSL" if self.tls else "SASL_PLAINTEXT", sasl_mechanism=self.sasl_mechanism,
                        sasl_plain_username=self.sasl_username, sasl_plain_password=self.sasl_password)
        elif self.tls:
            opts["security_protocol"] = "SSL"
        return {k: v for k, v in opts.items() if v is not None}

    def aiokafka_options(self) -> dict:
        """The same TLS and SASL settings, for aiokafka clients of our own (``stormguard deliver``)."""
        opts = self.kafka_python_options()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            opts.pop(name, None)
        if self.tls:
            from aiokafka.helpers import create_ssl_context

            opts["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile, certfile=self.ssl_certfile,
                                                     keyfile=self.ssl_keyfile)
        return opts

    @classmethod
    def from_env(cls, environ: Optional[dict] = None, **overrides) -> "WorkerSettings":
        env = os.environ if environ is None else environ

        def flag(name: str, default: bool) -> bool:
            raw = (env.get(name) or "").strip().lower()
            if not raw:
                return default
            if raw in ("1", "true", "yes", "on"):
                return True
            if raw in ("0", "false", "no", "off"):
                return False
            raise SettingsError(f"{name}={raw!r} is not a boolean (true/false)")

        def num(name: str, default, kind=int):
            raw = env.get(name)
            if not raw:
                return default
            try:
                return kind(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None

        values = dict(
            broker=env.get("STORMGUARD_BROKER") or None,
            web_port=num("STORMGUARD_WEB_PORT", cls.web_port),
            web_host=env.get("STORMGUARD_WEB_HOST") or cls.web_host,
            app_id=env.get("STORMGUARD_APP_ID") or cls.app_id,
            partitions=num("STORMGUARD_PARTITIONS", cls.partitions),
            data_dir=env.get("STORMGUARD_DATA_DIR") or cls.data_dir,
            session_timeout=num("STORMGUARD_SESSION_TIMEOUT", cls.session_timeout, float),
            heartbeat_interval=num("STORMGUARD_HEARTBEAT_INTERVAL", cls.heartbeat_interval, float),
            fetch_max_wait_ms=num("STORMGUARD_FETCH_MAX_WAIT_MS", cls.fetch_max_wait_ms),
            commit_interval=num("STORMGUARD_COMMIT_INTERVAL", cls.commit_interval, float),
            fast_drain=flag("STORMGUARD_FAST_DRAIN", cls.fast_drain),
            model_save_ms=num("STORMGUARD_MODEL_SAVE_MS", cls.model_save_ms),
            gc_freeze_s=num("STORMGUARD_GC_FREEZE_S", cls.gc_freeze_s, float),
            gc_catch_up_threshold=num("STORMGUARD_GC_CATCH_UP_THRESHOLD", cls.gc_catch_up_threshold),
            order_wait_ms=num("STORMGUARD_ORDER_WAIT_MS", cls.order_wait_ms),
            latency_trace=flag("STORMGUARD_LATENCY_TRACE", cls.latency_trace),
            enforce=flag("STORMGUARD_ENFORCE", cls.enforce),
            learn_history=flag("STORMGUARD_LEARN_HISTORY", cls.learn_history),
            dlq_max_bytes=num("STORMGUARD_DLQ_MAX_BYTES", cls.dlq_max_bytes),
            exactly_once=flag("STORMGUARD_EXACTLY_ONCE", cls.exactly_once),
            crash_on_message_id=env.get("STORMGUARD_CRASH_ON_MESSAGE_ID") or None,
            policy=policy_from_env(env),
            sasl_mechanism=env.get("STORMGUARD_KAFKA_SASL_MECHANISM") or None,
            sasl_username=env.get("STORMGUARD_KAFKA_SASL_USERNAME") or None,
            sasl_password=secret("STORMGUARD_KAFKA_SASL_PASSWORD", env),
            ssl_cafile=env.get("STORMGUARD_KAFKA_SSL_CAFILE") or None,
            ssl_certfile=env.get("STORMGUARD_KAFKA_SSL_CERTFILE") or None,
            ssl_keyfile=env.get("STORMGUARD_KAFKA_SSL_KEYFILE") or None,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["partitions"] < 1:
            raise SettingsError("STORMGUARD_PARTITIONS must be >= 1")
        if values["commit_interval"] <= 0:
            raise SettingsError("STORMGUARD_COMMIT_INTERVAL must be > 0")
        if values["gc_freeze_s"] < 0:
            raise SettingsError("STORMGUARD_GC_FREEZE_S must be >= 0")
        if values["gc_catch_up_threshold"] < 0:
            raise SettingsError("STORMGUARD_GC_CATCH_UP_THRESHOLD must be >= 0 (0: Python's collector thresholds)")
        if values["model_save_ms"] < 0:
            raise SettingsError("STORMGUARD_MODEL_SAVE_MS must be >= 0")
        if values["order_wait_ms"] < 0:
            raise SettingsError("STORMGUARD_ORDER_WAIT_MS must be >= 0")
        if values["dlq_max_bytes"] < 4096:
            raise SettingsError("STORMGUARD_DLQ_MAX_BYTES must be >= 4096 (a dead-letter envelope needs room)")
        if values["sasl_mechanism"] and not (values["sasl_username"] and values["sasl_password"]):
            raise SettingsError("STORMGUARD_KAFKA_SASL_MECHANISM needs STORMGUARD_KAFKA_SASL_USERNAME "
                                "and STORMGUARD_KAFKA_SASL_PASSWORD (or _FILE)")
        return cls(**values)


#: The worker's own settings, for `stormguard settings` and the README.
WORKER_SETTINGS: list[tuple[str, str, str]] = [
    ("STORMGUARD_BROKER", "embedded broker", "Kafka bootstrap, `kafka://HOST:PORT` (several: `;`-separated). "
     "Unset: `stormguard run` starts an embedded Tansu broker; other commands use `kafka://127.0.0.1:9092`"),
    ("STORMGUARD_WEB_PORT", "6066", "HTTP port for `/healthz`, `/metrics`, `/api/lists`"),
    ("STORMGUARD_WEB_HOST", "0.0.0.0", "address the HTTP port binds to"),
    ("STORMGUARD_APP_ID", "stormguard", "Faust app id = Kafka consumer group and changelog topic prefix; "
     "workers with the same id share the partitions"),
    ("STORMGUARD_PARTITIONS", "1", "partitions of `mail.events` when the worker has to create it. An existing "
     "`mail.events` wins: the worker takes its partition count for every topic and table it makes, and refuses "
     "to start if one that exists already disagrees. More partitions let more workers share the load; events "
     "may be keyed by list, by sender or not at all"),
    ("STORMGUARD_DATA_DIR", ".stormguard", "Faust's local data directory"),
    ("STORMGUARD_SESSION_TIMEOUT", "6.0", "Kafka group session (and rebalance) timeout in seconds: how fast a "
     "worker joins, and how fast a survivor takes over a dead worker's partitions. Apache Kafka refuses less than "
     "its `group.min.session.timeout.ms` (6 s by default); the worker checks it at start and says so"),
    ("STORMGUARD_HEARTBEAT_INTERVAL", "0.5", "Kafka group heartbeat interval in seconds"),
    ("STORMGUARD_FETCH_MAX_WAIT_MS", "30", "longest fetch long-poll in milliseconds; bounds how long a new "
     "event can wait on a broker that does not answer long polls early (Tansu); an idle worker makes about "
     "1000/this fetches a second (measured on Tansu: 4% of a core at 30, 10% at 10, 16% at 5). Apache Kafka "
     "answers as soon as a record arrives, so there a shorter wait only costs CPU; on Tansu with latency "
     "first, 10 takes up to 20 ms off a freeze (docs/performance.md)"),
    ("STORMGUARD_COMMIT_INTERVAL", "2.8", "seconds between offset commits (Faust's `broker_commit_interval`; "
     "a catching-up worker also commits every 100,000 records). Under exactly-once, also how long a transaction "
     "stays open: what a crash makes the next owner redo"),
    ("STORMGUARD_FAST_DRAIN", "true", "hand each fetched batch of `mail.events` records straight to the scorer, "
     "acked once per batch (`BatchConsumer`, `stream_jobs/worker/faust_tuning.py`); `false` gives stock Faust: "
     "an agent, a stream and an ack per record"),
    ("STORMGUARD_MODEL_SAVE_MS", "500", "how long, in milliseconds, a changed list model may wait before it "
     "is written to the `list_models` changelog (freezes are written at once); 0 writes them after every batch. "
     "Every changed model is also written when an offset commit starts, so this spreads the writes out "
     "between commits rather than bounding what a crash loses; while a backlog is caught up (records more "
     "than a second old) the commits alone write them"),
    ("STORMGUARD_GC_FREEZE_S", "5", "every this many seconds the worker moves what survived into Python's "
     "permanent GC generation (`gc.freeze`), so full collections scan only newer objects: with a day of "
     "learned state they took 50-180 ms and set the tail latency. Once an hour everything is unfrozen and "
     "collected (one such pause an hour). 0: Python's default collector"),
    ("STORMGUARD_GC_CATCH_UP_THRESHOLD", "2000000", "while the worker catches up a backlog (its batch's newest "
     "record more than a second old), Python's collector runs a young-generation pass every this many container "
     "allocations instead of every 700: the collector took a quarter of the worker's CPU catching up, and nobody "
     f"waits on a backlog's records. The default is above what the event-time merge holds ({ORDER_MAX_HELD:,} records) "
     "plus "
     "what gathers between two `STORMGUARD_GC_FREEZE_S` freezes: the bench's catch-up made next to none; one may "
     "take up to a second (~25 ms per 50,000 objects). Live again, Python's thresholds come back. 0: Python's "
     "thresholds always"),
    ("STORMGUARD_ENFORCE", "true", "`false` is shadow mode, for a roll-out: every decision is made and "
     "published on `stormguard.actions` with `\"enforced\": false`, but no list is held: "
     "`stormguard.list-state` and `/api/lists` never show one frozen by Stormguard, Mailman, the HTTP sink "
     "and the policy server do nothing, Alertmanager, webhooks and Grafana say \"would freeze\". "
     "Operators' own freezes through the admin API are still enforced"),
    ("STORMGUARD_LEARN_HISTORY", "true", "at a consumer group's first start, the events already in "
     "`mail.events` (up to the newest one then) are history: learned from, never acted on (no freeze, no alert, "
     "no webhook for a storm that ended days ago); the worker goes live after them. The cut-off is recorded on "
     "`<app id>-history` so restarts and other workers agree, and shown in `/healthz` and "
     "`stormguard_history_*`. `false`: act on everything. `STORMGUARD_LEARN_ONLY_UNTIL` sets the cut-off by hand"),
    ("STORMGUARD_ORDER_WAIT_MS", "2000", "longest wait, in milliseconds, for a partition that is behind "
     "(the broker has more of it, or no fetch of it has been answered yet) before newer events from the other "
     "partitions are scored anyway (the wait starts again each time the merge moves on); the worker "
     "scores a list's events oldest first across partitions (`stream_jobs/worker/event_order.py`), and caught-up "
     f"partitions never hold anything back. Meanwhile it holds up to {ORDER_MAX_HELD:,} records (about "
     f"{ORDER_MAX_HELD // 1000:,} MB) before "
     "the oldest go through anyway"),
    ("STORMGUARD_LATENCY_TRACE", "false", "`true`: one `latency-trace {json}` log line per freeze, with the "
     "wall-clock times its record was fetched, let through by the event-time order, scored and its writes "
     "buffered (`stream_jobs/worker/latency_trace.py`); `make bench` turns it on in its latency phase to "
     "break produce-to-freeze down by stage. Costs two dictionary writes per event"),
    ("STORMGUARD_DLQ_MAX_BYTES", "900000", "largest dead-letter envelope in bytes; a record whose base64 copy "
     "would not fit keeps a prefix, with its length and SHA-256 (`raw_truncated: true`). Keep it under the "
     "broker's `message.max.bytes` (1 MiB by default)"),
    ("STORMGUARD_EXACTLY_ONCE", "false", "`true`: Kafka transactions (Faust's `processing_guarantee=\"exactly_once\"`). "
     "What the worker writes while scoring a partition's records (actions, dead letters, by-list shares, list "
     "states and models) commits in one transaction with that partition's offsets, so after a crash "
     "`stormguard.actions` read `read_committed` holds each decision once and no list model update is lost. "
     "Needs a broker with transactions (Apache Kafka; the worker refuses to start on one without) and costs "
     "throughput (`make bench`)"),
    ("STORMGUARD_CRASH_ON_MESSAGE_ID", "unset", "a drill: the scoring agent dies on the message with this id, "
     "so you can see `/healthz` turn 503 and your supervisor (systemd, Kubernetes, Compose) restart the worker. "
     "Never set it in production"),
    ("STORMGUARD_LOG_LEVEL", "warn", "worker log level: crit, error, warn, info, debug"),
    ("STORMGUARD_ADMIN_TOKEN (or _FILE)", "unset", "bearer token for `POST /api/lists/{address}/freeze|unfreeze`; "
     "unset, those endpoints answer 403"),
    ("STORMGUARD_KAFKA_SSL_CAFILE, _SSL_CERTFILE, _SSL_KEYFILE", "unset", "TLS to the brokers"),
    ("STORMGUARD_KAFKA_SASL_MECHANISM, _SASL_USERNAME, _SASL_PASSWORD (or _FILE)", "unset",
     "SASL to the brokers (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)"),
]


def policy_settings() -> list[tuple[str, str, str]]:
    """Every policy threshold as (variable, default, meaning), read from PolicyConfig's own comments."""
    import inspect
    import re

    from detectors import policy

    source = inspect.getsource(policy.PolicyConfig)
    defaults = PolicyConfig()
    rows, comment = [], []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            comment.append(stripped[2:].strip())
            continue
        match = re.match(r"(\w+):\s*[\w\[\]]+\s*=", stripped)
        if match and match.group(1) in PolicyConfig.__struct_fields__:
            name = match.group(1)
            value = getattr(defaults, name)
            shown = ",".join(sorted(value)) or "empty" if isinstance(value, frozenset) else f"{value:g}" \
                if isinstance(value, float) else str(value)
            rows.append((f"STORMGUARD_{name.upper()}", shown, " ".join(comment)))
        comment = []
    return rows


def settings_markdown() -> str:
    """The settings tables of the README, generated from the code."""
    out = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, default, meaning in WORKER_SETTINGS + policy_settings():
        out.append(f"| `{name}` | {default} | {meaning.replace('|', '/')} |")
    return "\n".join(out) + "\n"


README_BEGIN = "<!-- settings:begin (generated by `python -m stream_jobs.settings --readme`) -->"
README_END = "<!-- settings:end -->"


def readme_with_settings(readme: str) -> str:
    """The README text with its settings block regenerated from the code."""
    head, sep, rest = readme.partition(README_BEGIN)
    if not sep:
        raise SettingsError(f"README has no {README_BEGIN!r} marker")
    _, sep, tail = rest.partition(README_END)
    if not sep:
        raise SettingsError(f"README has no {README_END!r} marker")
    return f"{head}{README_BEGIN}\n{settings_markdown()}{README_END}{tail}"


if __name__ == "__main__":  # python -m stream_jobs.settings --readme
    import sys
    from pathlib import Path

    if sys.argv[1:] == ["--readme"]:
        path = Path(__file__).resolve().parents[1] / "README.md"
        path.write_text(readme_with_settings(path.read_text()))
    else:
        print(settings_markdown(), end="")
