"""Apache Kafka with a SASL_SSL listener (SCRAM-SHA-512), certificates made here with ``openssl``.

The broker keeps a PLAINTEXT listener for itself (readiness, the test's own admin requests);
Stormguard's commands are pointed at the SASL_SSL one with ``STORMGUARD_KAFKA_SSL_*`` and
``STORMGUARD_KAFKA_SASL_*``. Its keystore is PEM (``ssl.keystore.type=PEM``, Kafka 3.x).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from stream_jobs.kafka.apache import KafkaBroker
from stream_jobs.kafka.broker import free_port

USER, PASSWORD = "stormguard", "scram-secret-9f2c"


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", f"/CN={name}"], check=True, capture_output=True)
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path]) -> Path:
    """A certificate for 127.0.0.1 and localhost signed by ``ca``, with its key: a PEM keystore."""
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", "/CN=localhost"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                    "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)],
                   check=True, capture_output=True)
    keystore = directory / "server-keystore.pem"
    keystore.write_text(key.read_text() + cert.read_text())  # PKCS#8 key, then the chain
    return keystore


@dataclass
class SecureKafka:
    broker: KafkaBroker
    sasl_port: int
    ca: Path
    untrusted_ca: Path

    @property
    def url(self) -> str:
        """The SASL_SSL listener, as Stormguard's commands take it."""
        return f"kafka://127.0.0.1:{self.sasl_port}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    def env(self, password: str = PASSWORD, ca: Path | None = None) -> dict:
        return {"STORMGUARD_BROKER": self.url, "STORMGUARD_KAFKA_SSL_CAFILE": str(ca or self.ca),
                "STORMGUARD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "STORMGUARD_KAFKA_SASL_USERNAME": USER,
                "STORMGUARD_KAFKA_SASL_PASSWORD": password}

    def client_options(self) -> dict:
        """kafka-python options for the test's own reads over SASL_SSL."""
        return dict(security_protocol="SASL_SSL", ssl_cafile=str(self.ca), sasl_mechanism="SCRAM-SHA-512",
                    sasl_plain_username=USER, sasl_plain_password=PASSWORD)


def start_secure_kafka(directory: Path) -> SecureKafka:
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory, "stormguard-test-ca")
    untrusted = make_ca(directory, "some-other-ca")[0]
    keystore = make_server_cert(directory, ca)
    plain, sasl = free_port(), free_port()
    broker = KafkaBroker(port=plain, data_dir=directory / "kafka", listeners={
        "PLAINTEXT": ("PLAINTEXT", plain), "SASL_SSL": ("SASL_SSL", sasl)}, config={
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
        "listener.name.sasl_ssl.ssl.keystore.location": str(keystore),
    }).start()
    try:
        _add_scram_user(broker.bootstrap)
    except BaseException:
        broker.stop()
        raise
    return SecureKafka(broker, sasl, ca[0], untrusted)


def _add_scram_user(bootstrap: str) -> None:
    """The SCRAM-SHA-512 credential, through the admin API on the PLAINTEXT listener (KRaft keeps it)."""
    from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

    admin = AdminClient({"bootstrap.servers": bootstrap})
    upsert = UserScramCredentialUpsertion(USER, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192),
                                          PASSWORD.encode())
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(timeout=30)
