"""Kafka in KRaft mode: one JVM per node, each a combined broker + controller.

The single-node stack is node 1 of a one-voter quorum (service ``kafka``);
:mod:`stack.kafka_cluster` builds the multi-broker cluster from the same class
(services ``kafka-1`` ... ``kafka-N``).  Each node has its own ports, data dir
and generated ``server.properties``; all share the Maven-fetched jars.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings
from fbp_errors import StackError
from stack import kafka_security
from stack.kafka_jars import ensure_kafka_libs, java_command
from stack.service import Service, port_open


@dataclass(frozen=True)
class Replication:
    """Broker-wide replication defaults (also used for the internal topics)."""

    factor: int = 1
    min_insync: int = 1


class KafkaNode(Service):
    marker = "kafka.Kafka"
    log_files = ("server.log",)

    def __init__(self, settings: Settings, *, name: str, node_id: int, port: int, controller_port: int,
                 voters: str, replication: Replication, cluster_id_file: Path) -> None:  # fmt: skip
        super().__init__(settings)
        self.name = name
        self.node_id = node_id
        self.client_port = port
        self.controller_port = controller_port
        self.voters = voters
        self.replication = replication
        self.cluster_id_file = cluster_id_file

    def ports(self) -> list[int]:
        return [self.client_port, self.controller_port]

    # ------------------------------------------------------------------ config

    def properties(self) -> dict[str, str]:
        """server.properties of this node, bound to 127.0.0.1."""
        rep = self.replication
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.client_port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.client_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.dir / "data"),
            "num.partitions": str(self.settings.kafka.partitions),
            "default.replication.factor": str(rep.factor),
            "offsets.topic.replication.factor": str(rep.factor),
            # 50 offsets partitions cost seconds on first group join; 8 is plenty locally.
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": str(rep.factor),
            "transaction.state.log.min.isr": str(rep.min_insync),
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "background.threads": "4",
            "log.retention.hours": "168",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "log.retention.check.interval.ms": "300000",
            "num.recovery.threads.per.data.dir": "2",
            # After a crash the restarted broker must wait out its old session before
            # it is unfenced; the 9 s default would make every kill-restart slow.
            "broker.session.timeout.ms": "2500",
            "broker.heartbeat.interval.ms": "500",
        }
        if rep.min_insync > 1:
            props["min.insync.replicas"] = str(rep.min_insync)
        props.update(kafka_security.listener_properties(self.settings, self.client_port, self.controller_port))
        return props

    def server_properties(self) -> str:
        return "".join(f"{k}={v}\n" for k, v in self.properties().items())

    # ------------------------------------------------------------------ command

    def _cluster_id(self) -> str:
        """Shared by every node of one cluster; made on the first format."""
        if not self.cluster_id_file.is_file():
            self.cluster_id_file.parent.mkdir(parents=True, exist_ok=True)
            self.cluster_id_file.write_text(new_cluster_id() + "\n")
        return self.cluster_id_file.read_text().strip()

    def _format(self, libs: Path, props: Path) -> None:
        if (self.dir / "data" / "meta.properties").is_file():
            return
        cmd = java_command(libs, self.dir, "256m") + [
            "kafka.tools.StorageTool", "format", "-t", self._cluster_id(), "-c", str(props),
            "--ignore-formatted", *kafka_security.scram_format_args(self.settings),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise StackError(f"{self.name}: storage format failed:\n{(proc.stdout + proc.stderr)[-2000:]}")

    def command(self) -> list[str]:
        libs = ensure_kafka_libs(self.settings)
        props = self.dir / "server.properties"
        props.write_text(self.server_properties())
        if kafka_security.secure(self.settings):  # holds the broker's SASL password and key password
            props.chmod(0o600)
        self._format(libs, props)
        return java_command(libs, self.dir, self.settings.stack.kafka_heap) + ["kafka.Kafka", str(props)]

    # ------------------------------------------------------------------ health

    def health(self, timeout_s: float) -> tuple[bool, str]:
        """Healthy = answers a metadata request (so the quorum has a leader)."""
        if not port_open(self.client_port):
            return False, f"nothing listening on {self.client_port}"
        from kafka import KafkaAdminClient

        ms = int(timeout_s * 1000)
        with _quiet_kafka_logs():
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=[f"127.0.0.1:{self.client_port}"],
                    client_id="fbp-stack-health",
                    bootstrap_timeout_ms=ms,
                    request_timeout_ms=ms,
                    **kafka_security.client_kwargs(self.settings),
                )
            except Exception as exc:  # noqa: BLE001 - any failure means "not healthy yet"
                return False, f"admin client: {exc}"
            try:
                topics = admin.list_topics()
                return True, f"{len([t for t in topics if not t.startswith('__')])} topics"
            except Exception as exc:  # noqa: BLE001
                return False, f"metadata: {exc}"
            finally:
                with contextlib.suppress(Exception):
                    admin.close()


def single_node(settings: Settings) -> KafkaNode:
    """The default stack's broker: service ``kafka`` on ``stack.kafka_port``."""
    st = settings.stack
    return KafkaNode(
        settings, name="kafka", node_id=1, port=st.kafka_port, controller_port=st.kafka_controller_port,
        voters=f"1@127.0.0.1:{st.kafka_controller_port}", replication=Replication(),
        cluster_id_file=Path(st.data_dir) / "kafka" / "cluster.id",
    )  # fmt: skip


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


@contextlib.contextmanager
def _quiet_kafka_logs() -> Iterator[None]:
    lg = logging.getLogger("kafka")
    old = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(old)
