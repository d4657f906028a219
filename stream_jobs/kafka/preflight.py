"""Can this process talk to the brokers at all? One connection, TLS and SASL included, before the real clients.

The Kafka clients Stormguard uses (kafka-python, aiokafka under Faust) treat a refused password or
an untrusted certificate like a broker that is down: they log it and retry, so a command given
the wrong secret hangs, or gives up after its bootstrap timeout saying that no broker answers.
Every command that talks to Kafka first makes one connection to a bootstrap server the way its
clients will (:func:`check_brokers`), and stops at once with what went wrong and which setting to
look at (:class:`BrokerUnreachable`, exit code 1 where the commands catch it).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Optional

#: Seconds the whole check may take, per bootstrap server.
TIMEOUT = 10.0


class BrokerUnreachable(RuntimeError):
    """No bootstrap server can be reached, or one refused this process's TLS or SASL; the message says which."""


class BrokerRefused(BrokerUnreachable):
    """A broker answered and refused this process's TLS or SASL: retrying will not help (a setting is wrong)."""


def check_brokers(servers: list[str], settings=None, timeout: float = TIMEOUT) -> None:
    """Return once one of ``servers`` (``host:port``) accepts a connection with the configured TLS and SASL.

    A refused certificate or password raises at once (it will not get better by retrying);
    an unreachable server is only fatal when no other one answers.
    """
    from stream_jobs.settings import WorkerSettings

    settings = settings or WorkerSettings.from_env()
    problems = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            _check_one(host or server, int(port or 9092), settings, timeout)
            return
        except _Unreachable as exc:
            problems.append(f"{server}: {exc}")
    raise BrokerUnreachable("no Kafka broker answers at " + "; ".join(problems) +
                            " (start one with `stormguard broker`, or set --broker / STORMGUARD_BROKER)")


class _Unreachable(Exception):
    pass


def _check_one(host: str, port: int, settings, timeout: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if settings.tls:
                _handshake(sock, host, port, settings, timeout)
    except (ConnectionError, socket.timeout, socket.gaierror, OSError) as exc:
        if isinstance(exc, ssl.SSLError):
            raise
        raise _Unreachable(exc.strerror or str(exc) or exc.__class__.__name__) from None
    if settings.sasl_mechanism:
        _authenticate(host, port, settings, timeout)


def refusal(servers: list[str]) -> Optional[str]:
    """For long-running commands that ride out a broker outage: the reason to stop now (a TLS or SASL
    setting the broker refuses), or ``None`` (it answered, or it is only unreachable for now)."""
    try:
        check_brokers(servers)
    except BrokerRefused as exc:
        return str(exc)
    except BrokerUnreachable:
        return None
    return None


def _handshake(sock: socket.socket, host: str, port: int, settings, timeout: float) -> None:
    context = tls_context(settings)
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.settimeout(timeout)
    except ssl.SSLCertVerificationError as exc:
        raise BrokerRefused(
            f"the broker at {host}:{port} presented a certificate this "
            f"process does not trust ({exc.verify_message}); STORMGUARD_KAFKA_SSL_CAFILE="
            f"{settings.ssl_cafile or '(unset: the system CAs)'} must hold the CA that signed it") from None
    except ssl.SSLError as exc:
        raise BrokerRefused(f"TLS with the broker at {host}:{port} failed ({exc.reason or exc}); is it a TLS "
                                "listener, and are STORMGUARD_KAFKA_SSL_CERTFILE/_KEYFILE the client "
                                "certificate it expects?") from None


def tls_context(settings) -> ssl.SSLContext:
    """The TLS context the clients use: the CA file (else the system's), a client certificate if set."""
    try:
        context = ssl.create_default_context(cafile=settings.ssl_cafile)
        if settings.ssl_certfile:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerRefused(f"cannot load the TLS files (STORMGUARD_KAFKA_SSL_CAFILE/_CERTFILE/_KEYFILE): "
                                f"{exc}") from None
    return context


def _authenticate(host: str, port: int, settings, timeout: float) -> None:
    """One SASL handshake with aiokafka's connection (the worker's and ``deliver``'s client)."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaError

    async def attempt() -> Optional[str]:
        try:
            conn = await asyncio.wait_for(create_conn(
                host, port, ssl_context=tls_context(settings) if settings.tls else None,
                security_protocol="SASL_SSL" if settings.tls else "SASL_PLAINTEXT",
                sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username,
                sasl_plain_password=settings.sasl_password, request_timeout_ms=int(timeout * 1000)), timeout)
        except asyncio.TimeoutError:
            raise _Unreachable(f"no SASL answer within {timeout:.0f} s") from None
        except (KafkaError, OSError) as exc:
            return f"{exc.__class__.__name__}: {exc}"
        conn.close()
        return None

    problem = asyncio.run(attempt())
    if problem is not None:
        raise BrokerRefused(
            f"the broker at {host}:{port} refused SASL {settings.sasl_mechanism} for user "
            f"{settings.sasl_username!r} ({problem}); check STORMGUARD_KAFKA_SASL_USERNAME, "
            "STORMGUARD_KAFKA_SASL_PASSWORD (or _FILE) and STORMGUARD_KAFKA_SASL_MECHANISM")
