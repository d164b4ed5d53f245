"""A real single-node Apache Kafka broker (KRaft) for the tests, and its pytest fixture.

The jars come from scripts/setup.d/30-kafka.sh ($VMITRACE_CACHE/kafka/<version>/libs). The
broker listens on 127.0.0.1 on free ports (PLAINTEXT at `bootstrap`; SASL_PLAINTEXT with
mechanism PLAIN at `sasl_bootstrap` for user SASL_USER / SASL_PASSWORD; SSL at `ssl_bootstrap`
with a self-signed certificate for IP 127.0.0.1 made by keytool, its PEM in `ssl_cafile`), keeps its log dir in a temporary directory, and can
be stopped and started again on the same ports and data (to test a broker outage).

Use in a test module:  `from support.kafka import kafka_broker  # noqa: F401` (session fixture).
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

SASL_USER = "vmitrace"
SASL_PASSWORD = "test-secret"
KAFKA_VERSION = os.environ.get("VMITRACE_KAFKA_VERSION", "4.3.1")
CACHE = Path(os.environ.get("VMITRACE_CACHE", Path.home() / ".cache" / "vmitrace"))


def kafka_libs() -> Path:
    libs = CACHE / "kafka" / KAFKA_VERSION / "libs"
    if not (libs / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        raise RuntimeError(f"Kafka {KAFKA_VERSION} jars not found in {libs}: run ./setup.sh "
                           "(scripts/setup.d/30-kafka.sh fetches them)")
    return libs


KEYSTORE_PASSWORD = "test-keystore"


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for IP 127.0.0.1 in a PKCS12 keystore, and its PEM (to use
    as the CA file of a client). keytool comes with the JRE."""
    keystore, pem = directory / f"{name}.p12", directory / f"{name}.pem"
    common = ["-keystore", str(keystore), "-storetype", "PKCS12",
              "-storepass", KEYSTORE_PASSWORD, "-alias", name]
    for args in (["-genkeypair", "-keyalg", "RSA", "-keysize", "2048", "-validity", "2",
                  "-dname", "CN=127.0.0.1", "-ext", "SAN=IP:127.0.0.1",
                  "-keypass", KEYSTORE_PASSWORD],
                 ["-exportcert", "-rfc", "-file", str(pem)]):
        result = subprocess.run(["keytool", *args, *common], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"keytool failed: {result.stdout}{result.stderr}")
    return keystore, pem


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


class KafkaBroker:
    """One broker+controller process. `bootstrap` is "127.0.0.1:PORT"."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.sasl_port = free_port()
        self.ssl_port = free_port()
        self.controller_port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.sasl_bootstrap = f"127.0.0.1:{self.sasl_port}"
        self.ssl_bootstrap = f"127.0.0.1:{self.ssl_port}"
        self.process: subprocess.Popen | None = None
        self._formatted = False
        self.libs = kafka_libs()
        self.java = shutil.which("java")
        if self.java is None:
            raise RuntimeError("java not found: setup.sh installs openjdk-17-jre-headless")
        self.keystore, self.ssl_cafile = make_certificate(workdir, "broker")
        self.config = workdir / "server.properties"
        self.config.write_text("\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
            f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port},SSL://127.0.0.1:{self.ssl_port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port},"
            f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port},SSL://127.0.0.1:{self.ssl_port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,"
            "SSL:SSL,CONTROLLER:PLAINTEXT",
            "ssl.keystore.type=PKCS12",
            f"ssl.keystore.location={self.keystore}",
            f"ssl.keystore.password={KEYSTORE_PASSWORD}",
            f"ssl.key.password={KEYSTORE_PASSWORD}",
            "ssl.client.auth=none",
            "sasl.enabled.mechanisms=PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config="
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{SASL_USER}="{SASL_PASSWORD}";',
            f"log.dirs={workdir / 'data'}",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=true",
            "log.flush.interval.messages=9223372036854775807",
            "message.max.bytes=4194304",
            "",
        ]))
        (workdir / "log4j2.properties").write_text(_LOG4J2.format(log=workdir / "broker.log"))

    def _java(self, main: str, *args: str, **popen) -> list[str]:
        return [self.java, "-Xms128m", "-Xmx512m", "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                "-cp", f"{self.libs}/*", main, *args]

    def _format(self) -> None:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        result = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "--standalone",
                       "--cluster-id", cluster_id, "--config", str(self.config)),
            capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            raise RuntimeError(f"kafka StorageTool format failed: {result.stdout}{result.stderr}")
        self._formatted = True

    def start(self, timeout: float = 180.0) -> None:
        """Start (first time: format the log dir) and wait until the broker answers."""
        if not self._formatted:
            self._format()
        out = open(self.workdir / "stdout.log", "ab")
        self.process = subprocess.Popen(self._java("kafka.Kafka", str(self.config)),
                                        stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None:
                tail = "".join((self.workdir / name).read_text(errors="replace")[-1500:]
                               for name in ("stdout.log", "broker.log")
                               if (self.workdir / name).exists())
                raise RuntimeError(f"kafka broker exited with {self.process.returncode} "
                                   f"(logs in {self.workdir}): ...{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kafka broker not ready within {timeout} s")
            time.sleep(0.3)

    def _ready(self) -> bool:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaConfigurationError, KafkaError
        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
        except KafkaConfigurationError:
            raise
        except (KafkaError, OSError):
            return False
        try:
            admin.describe_cluster()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()

    def stop(self, kill: bool = False) -> None:
        """Stop the broker (SIGTERM, SIGKILL after 30 s; or SIGKILL at once with kill=True)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def create_topic(self, name: str, partitions: int = 1) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            admin.create_topics([NewTopic(name, partitions, 1)])
        finally:
            admin.close()


def start_broker(attempts: int = 2) -> KafkaBroker:
    """A started broker in a new temporary directory. The free ports are picked before the
    JVM binds them, so another process on the machine may take one first: then the broker
    exits at once and it is tried again on other ports (the last failure keeps its logs)."""
    for attempt in range(1, attempts + 1):
        broker = KafkaBroker(Path(tempfile.mkdtemp(prefix="vmitrace-kafka-")))
        try:
            broker.start()
        except RuntimeError:
            broker.stop()
            if attempt == attempts:
                raise
            shutil.rmtree(broker.workdir, ignore_errors=True)
            continue
        return broker


@pytest.fixture(scope="session")
def kafka_broker():
    """A running broker for the whole session; stopped (and its data removed) at the end."""
    broker = start_broker()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(broker.workdir, ignore_errors=True)
