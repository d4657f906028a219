"""The Apache Kafka engine: one version everywhere, `stormguard broker --engine kafka`, data kept across kill -9."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest

from stream_jobs.kafka.apache import KAFKA_VERSION, KafkaBroker
from stream_jobs.kafka.broker import BrokerError, free_port
from stream_jobs.kafka.engines import make_broker
from tests.conftest import ROOT, STORMGUARD, produce_lines, read_topic, wait_for


def test_one_kafka_version_in_pom_makefile_and_compose():
    pom = (ROOT / "deploy/kafka/pom.xml").read_text()
    assert re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1) == KAFKA_VERSION
    assert re.search(r"^KAFKA_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1) == KAFKA_VERSION
    assert f"image: apache/kafka:{KAFKA_VERSION}" in (ROOT / "docker-compose.yml").read_text()


def test_tansu_keeps_no_data_dir():
    with pytest.raises(BrokerError, match="--data-dir needs --engine kafka"):
        make_broker("tansu", data_dir=ROOT / "nowhere")


def test_server_properties_make_a_single_node_kraft_cluster(tmp_path):
    props = KafkaBroker(port=19999, data_dir=tmp_path).server_properties()
    lines = dict(line.split("=", 1) for line in props.splitlines())
    assert lines["process.roles"] == "broker,controller"
    assert lines["offsets.topic.replication.factor"] == "1"
    assert lines["transaction.state.log.replication.factor"] == "1"
    assert lines["listeners"].startswith("PLAINTEXT://127.0.0.1:19999,CONTROLLER://")
    assert lines["log.dirs"] == str(tmp_path / "logs")


@pytest.mark.live
def test_kafka_broker_keeps_what_it_acknowledged_across_kill_9(tmp_path):
    broker = KafkaBroker(port=free_port(), data_dir=tmp_path / "kafka")
    with broker:
        produce_lines(broker.bootstrap, [b'{"n": %d}' % i for i in range(50)], topic="kept")
        with pytest.raises(BrokerError, match="already in use"):
            KafkaBroker(port=broker.port, data_dir=tmp_path / "other").start()
        broker.kill()
        broker.start()
        records = read_topic(broker.bootstrap, "kept", timeout=30, until=lambda r: len(r) >= 50)
        assert sorted(r.value for r in records) == sorted(b'{"n": %d}' % i for i in range(50))
    assert broker.proc.poll() is not None
    assert (tmp_path / "kafka" / "logs" / "meta.properties").exists()  # a given data dir is kept


@pytest.mark.live
def test_stormguard_broker_engine_kafka_formats_once_and_stops_on_sigterm(tmp_path):
    port, data = free_port(), tmp_path / "data"

    def run_once(message: bytes) -> bytes:
        proc = subprocess.Popen(STORMGUARD + ["broker", "--engine", "kafka", "--port", str(port),
                                              "--data-dir", str(data)],
                                cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            banner = proc.stderr.readline()
            assert b"Apache Kafka listening on kafka://127.0.0.1:%d" % port in banner, banner
            ready = float(re.search(rb"ready in ([\d.]+) s", banner).group(1))
            produce_lines(f"127.0.0.1:{port}", [message], topic="runs")
            seen = read_topic(f"127.0.0.1:{port}", "runs", timeout=30,
                              until=lambda r: message in [x.value for x in r])
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            print(f"ready in {ready} s")  # measured, not asserted (shared cores)
            return b" ".join(x.value for x in seen)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    assert run_once(b"first") == b"first"
    # the second run finds the storage formatted and the first run's record still there
    assert run_once(b"second") == b"first second"
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"{data}/server.properties"],
                                    capture_output=True).returncode == 1, 10, "the JVM to be gone")


@pytest.mark.live
def test_worker_refuses_a_session_timeout_the_broker_would_refuse(tmp_path):
    with KafkaBroker(port=free_port(), data_dir=tmp_path / "kafka") as broker:
        run = subprocess.run(STORMGUARD + ["run", "--broker", broker.url, "--web-port", str(free_port())], cwd=ROOT,
                             env={**os.environ, "STORMGUARD_SESSION_TIMEOUT": "4", "STORMGUARD_DATA_DIR":
                                  str(tmp_path / "data")}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "STORMGUARD_SESSION_TIMEOUT=4 s is below the broker's group.min.session.timeout.ms (6000 ms)" in run.stderr
    assert "Fix: STORMGUARD_SESSION_TIMEOUT=6 or more" in run.stderr
