"""Apache Kafka as a local broker: one KRaft node (broker and controller) in a child JVM.

The jars come from Maven Central with ``make install`` (``deploy/kafka/pom.xml``, copied into
``.kafka/<version>/``); the version is the one ``docker-compose.yml`` runs. The node keeps its
data in ``data_dir`` (formatted on first use), so a broker killed with ``kill -9`` restarts on
what it had acknowledged. It has the same interface as Tansu's :class:`EmbeddedBroker`:
``start``, ``stop``, ``url``, ``bootstrap`` and a context manager.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Mapping, Optional

from stream_jobs.kafka.broker import BrokerError, free_port

#: Apache Kafka's version: deploy/kafka/pom.xml and docker-compose.yml's image say the same (a test checks).
KAFKA_VERSION = "3.9.0"

#: Where ``make install`` puts the jars (the repository's ``.kafka/<version>/``).
KAFKA_LIB = Path(__file__).resolve().parents[2] / ".kafka" / KAFKA_VERSION

#: A small, quick-starting JVM: the broker of a test or a workstation, not of production.
JVM_OPTS = ("-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true")

#: A one-node cluster: internal topics with one replica, groups start without waiting for more members,
#: the log cleaner looks for work every second (compaction shows in tests).
SINGLE_NODE = {
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "5",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "5",
    "group.initial.rebalance.delay.ms": "0",
    "auto.create.topics.enable": "true",
    "num.partitions": "1",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "log.cleaner.backoff.ms": "1000",
    # a node restarted after kill -9 re-registers only once its old session has expired (9 s by default)
    "broker.heartbeat.interval.ms": "500",
    "broker.session.timeout.ms": "3000",
}

#: Warnings and errors only; the broker's own log is in ``broker.log`` beside its data.
LOG4J = """\
log4j.rootLogger=WARN, out
log4j.appender.out=org.apache.log4j.ConsoleAppender
log4j.appender.out.Target=System.out
log4j.appender.out.layout=org.apache.log4j.PatternLayout
log4j.appender.out.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""


def kafka_classpath() -> str:
    """The ``-cp`` for the broker, or :class:`BrokerError` saying how to fetch it."""
    if not any(KAFKA_LIB.glob("kafka_2.13-*.jar")):
        raise BrokerError(f"Apache Kafka {KAFKA_VERSION} is not installed in {KAFKA_LIB}; run `make install` "
                          "(it runs: mvn -q -f deploy/kafka/pom.xml dependency:copy-dependencies)")
    if shutil.which("java") is None:
        raise BrokerError("no `java` on PATH: Apache Kafka needs a JDK 17 (Debian: apt-get install openjdk-17-jdk-headless)")
    return str(KAFKA_LIB / "*")


def random_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (as ``kafka-storage random-uuid``).

    Never one that starts with ``-``, as Kafka's own ``Uuid.randomUuid``: ``kafka-storage format --cluster-id``
    would read it as an option and refuse to format (1 broker start in 64 failed so).

    >>> ids = [random_cluster_id() for _ in range(500)]
    >>> {len(i) for i in ids}, any(i.startswith("-") for i in ids)
    ({22}, False)
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def brokers_in_metadata(host: str, port: int, timeout: float = 1.0) -> int:
    """How many live brokers a Metadata request (v1, no topics) on ``host:port`` names; 0 if no answer.

    The listener accepts connections before the node has caught up with its metadata and is
    unfenced; only then does it name itself, and topics can be made.
    """
    request = struct.pack(">hhih", 3, 1, 1, 9) + b"readiness" + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(struct.pack(">i", len(request)) + request)
            head = _recv(s, 4)
            body = _recv(s, struct.unpack(">i", head)[0])
    except (OSError, struct.error):
        return 0
    # correlation id (4 bytes), then the brokers array's length
    return max(0, struct.unpack(">i", body[4:8])[0]) if len(body) >= 8 else 0


def _recv(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed")
        data += chunk
    return data


class KafkaBroker:
    """Apache Kafka in KRaft mode, one node that is broker and controller, in a child JVM.

    Parameters
    ----------
    port
        The client (PLAINTEXT) listener's port; the controller listens on another free port.
    host
        The address both listen on and advertise.
    data_dir
        Where the node keeps its logs and metadata, formatted on first use and reused after;
        ``None``: a temporary directory, removed by :meth:`stop`.
    log_path
        The JVM's output (warnings and errors); default ``broker.log`` in ``data_dir``.
    config
        Extra ``server.properties`` entries (``message.max.bytes`` …), over :data:`SINGLE_NODE`.
    listeners
        Replaces the PLAINTEXT listener: ``{"NAME": ("PROTOCOL", port)}``; the first is advertised
        as :attr:`bootstrap` (for TLS and SASL listeners, with ``config`` carrying their settings).
    """

    engine = "kafka"

    def __init__(self, port: int = 9092, host: str = "127.0.0.1", data_dir: Optional[Path] = None,
                 log_path: Optional[Path] = None, config: Optional[Mapping[str, str]] = None,
                 listeners: Optional[Mapping[str, tuple[str, int]]] = None,
                 jvm_opts: tuple[str, ...] = JVM_OPTS):
        self.host, self.port = host, port
        self.controller_port = free_port(host)
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="stormguard-kafka-"))
        self.log_path = Path(log_path) if log_path else self.data_dir / "broker.log"
        self.config = dict(config or {})
        self.listeners = dict(listeners) if listeners else {"PLAINTEXT": ("PLAINTEXT", port)}
        self.jvm_opts = tuple(jvm_opts)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"kafka://{self.host}:{self.port}"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    def server_properties(self) -> str:
        listeners = [f"{name}://{self.host}:{port}" for name, (_, port) in self.listeners.items()]
        protocols = [f"{name}:{proto}" for name, (proto, _) in self.listeners.items()]
        first = next(iter(self.listeners))
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listeners": ",".join(listeners + [f"CONTROLLER://{self.host}:{self.controller_port}"]),
            "advertised.listeners": ",".join(listeners),
            "listener.security.protocol.map": ",".join(protocols + ["CONTROLLER:PLAINTEXT"]),
            "inter.broker.listener.name": first,
            "log.dirs": str(self.logs_dir),
            **SINGLE_NODE,
            **self.config,
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self, main: str, *args: str) -> list[str]:
        return ["java", *self.jvm_opts, f"-Dlog4j.configuration=file:{self.data_dir / 'log4j.properties'}",
                "-cp", kafka_classpath(), main, *args]

    def _prepare(self) -> Path:
        """Write the configuration; format the storage if it has never been."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "log4j.properties").write_text(LOG4J)
        props = self.data_dir / "server.properties"
        props.write_text(self.server_properties())
        if not (self.logs_dir / "meta.properties").exists():
            done = subprocess.run(self._java("kafka.tools.StorageTool", "format", "--ignore-formatted",
                                             "--cluster-id", random_cluster_id(), "--config", str(props)),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode != 0:
                raise BrokerError(f"could not format Kafka's storage in {self.logs_dir}: "
                                  f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return props

    def start(self, timeout: float = 60.0) -> "KafkaBroker":
        """Start the JVM and wait until the node names itself in its metadata (it can make topics)."""
        for port in [p for _, p in self.listeners.values()] + [self.controller_port]:
            with contextlib.suppress(OSError), socket.create_connection((self.host, port), timeout=0.2):
                raise BrokerError(f"{self.host}:{port} is already in use; pick another --port")
        props = self._prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self._java("kafka.Kafka", str(props)), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        probe_port = self.listeners.get("PLAINTEXT", ("", self.controller_port))[1]
        probe = (lambda: brokers_in_metadata(self.host, probe_port)) if "PLAINTEXT" in self.listeners else \
            (lambda: self._listening(self.port))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"Apache Kafka exited with code {self.proc.returncode} while starting: "
                                  f"{self.log_tail()}")
            if probe():
                return self
            time.sleep(0.1)
        self.kill()
        raise BrokerError(f"Apache Kafka was not ready on {self.bootstrap} after {timeout:.0f} s: {self.log_tail()}")

    def _listening(self, port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.host, port), timeout=0.2):
            return True
        return False

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:]) or "(empty log)"
        return "(no log)"

    def kill(self) -> None:
        """``kill -9``: no shutdown, nothing flushed; :meth:`start` again restarts on the data."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """A clean shutdown (SIGTERM: Kafka closes its logs and leaves the quorum); the JVM is killed after
        ``timeout``. A temporary data directory is removed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "KafkaBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
