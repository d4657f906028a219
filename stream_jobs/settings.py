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
#: Operators' freeze/unfreeze commands from the admin API, applied in stream order.
COMMANDS_TOPIC = "stormguard.commands"


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
    session_timeout: float = 4.0
    heartbeat_interval: float = 0.5
    fetch_max_wait_ms: int = 100
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    sasl_mechanism: Optional[str] = None
    sasl_username: Optional[str] = None
    sasl_password: Optional[str] = field(default=None, repr=False)
    ssl_cafile: Optional[str] = None
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None

    def kafka_client_options(self) -> dict:
        """TLS and SASL for production brokers, passed through to Faust (and so to aiokafka)."""
        import ssl

        context = None
        if self.ssl_cafile or self.ssl_certfile:
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        if self.sasl_mechanism:
            import faust

            if not (self.sasl_username and self.sasl_password):
                raise SettingsError("STORMGUARD_KAFKA_SASL_MECHANISM needs STORMGUARD_KAFKA_SASL_USERNAME "
                                    "and STORMGUARD_KAFKA_SASL_PASSWORD (or _FILE)")
            return {"broker_credentials": faust.SASLCredentials(
                username=self.sasl_username, password=self.sasl_password,
                mechanism=self.sasl_mechanism, ssl_context=context)}
        if context is not None:
            import faust

            return {"broker_credentials": faust.SSLCredentials(context)}
        return {}

    @classmethod
    def from_env(cls, environ: Optional[dict] = None, **overrides) -> "WorkerSettings":
        env = os.environ if environ is None else environ

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
        return cls(**values)
