"""The connection check every Kafka command makes first, and the exactly-once setting (no broker needed)."""

from __future__ import annotations

import socket
import threading

import pytest

from stream_jobs.kafka.broker import free_port
from stream_jobs.kafka.preflight import BrokerRefused, BrokerUnreachable, check_brokers, refusal
from stream_jobs.settings import SettingsError, WorkerSettings
from tests.stream_jobs.secure_kafka import make_ca


def test_nothing_listening_is_unreachable_not_refused():
    port = free_port()
    with pytest.raises(BrokerUnreachable, match=f"no Kafka broker answers at 127.0.0.1:{port}") as info:
        check_brokers([f"127.0.0.1:{port}"], WorkerSettings())
    assert not isinstance(info.value, BrokerRefused)
    assert refusal([f"127.0.0.1:{port}"]) is None  # long-running commands wait for such a broker


def test_tls_to_a_listener_that_does_not_speak_it_is_refused(tmp_path):
    """A CA file set and a plaintext listener: the TLS handshake fails, and that is a setting to fix."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def accept_and_close() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        conn.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    ca, _ = make_ca(tmp_path, "some-ca")
    try:
        with pytest.raises(BrokerRefused, match="is it a TLS listener"):
            check_brokers([f"127.0.0.1:{port}"], WorkerSettings(ssl_cafile=str(ca)))
    finally:
        server.close()


def test_a_tls_file_that_cannot_be_read_is_refused(tmp_path):
    server = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(BrokerRefused, match="cannot load the TLS files"):
            check_brokers([f"127.0.0.1:{server.getsockname()[1]}"],
                          WorkerSettings(ssl_cafile=str(tmp_path / "missing.pem")))
    finally:
        server.close()


def test_exactly_once_setting():
    assert WorkerSettings.from_env({}).exactly_once is False
    eos = WorkerSettings.from_env({"STORMGUARD_EXACTLY_ONCE": "true"})
    assert eos.exactly_once and eos.faust_app_options()["processing_guarantee"] == "exactly_once"
    assert WorkerSettings.from_env({}).faust_app_options()["processing_guarantee"] == "at_least_once"
    with pytest.raises(SettingsError, match="STORMGUARD_EXACTLY_ONCE"):
        WorkerSettings.from_env({"STORMGUARD_EXACTLY_ONCE": "sometimes"})
