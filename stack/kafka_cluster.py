"""A local multi-broker KRaft cluster (``fbp stack up --kafka-brokers N``).

N combined broker+controller nodes form one static controller quorum; node i
listens on ``kafka_cluster_port + i - 1`` (clients) and
``kafka_cluster_controller_port + i - 1`` (quorum), so the cluster runs beside
the single-node stack.  Topics get replication factor min(3, N) and
``min.insync.replicas`` one less (3 brokers: RF 3, min.insync 2 -- an
acknowledged write survives the loss of any one broker).
"""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from stack.kafka import KafkaNode, Replication


def replication(brokers: int) -> Replication:
    factor = min(3, brokers)
    return Replication(factor=factor, min_insync=max(1, factor - 1))


def client_ports(settings: Settings) -> list[int]:
    st = settings.stack
    return [st.kafka_cluster_port + i for i in range(st.kafka_brokers)]


def bootstrap_servers(settings: Settings) -> str:
    return ",".join(f"127.0.0.1:{p}" for p in client_ports(settings))


def nodes(settings: Settings) -> list[KafkaNode]:
    """Services ``kafka-1`` ... ``kafka-N`` for ``settings.stack.kafka_brokers`` = N."""
    st = settings.stack
    n = st.kafka_brokers
    cports = [st.kafka_cluster_controller_port + i for i in range(n)]
    voters = ",".join(f"{i + 1}@127.0.0.1:{p}" for i, p in enumerate(cports))
    cid = Path(st.data_dir) / "kafka-cluster.id"
    return [
        KafkaNode(settings, name=f"kafka-{i + 1}", node_id=i + 1, port=port, controller_port=cports[i],
                  voters=voters, replication=replication(n), cluster_id_file=cid)  # fmt: skip
        for i, port in enumerate(client_ports(settings))
    ]


def client_settings(settings: Settings) -> Settings:
    """``settings`` pointed at the cluster, with the cluster's topic replication."""
    rep = replication(settings.stack.kafka_brokers)
    kafka = settings.kafka.model_copy(update={
        "bootstrap_servers": bootstrap_servers(settings),
        "replication_factor": rep.factor,
        "min_insync_replicas": rep.min_insync,
    })  # fmt: skip
    return settings.model_copy(update={"kafka": kafka})


def client_env(settings: Settings) -> dict[str, str]:
    """The variables a worker, trainer or producer needs to use the cluster."""
    rep = replication(settings.stack.kafka_brokers)
    return {
        "FBP_KAFKA__BOOTSTRAP_SERVERS": bootstrap_servers(settings),
        "FBP_KAFKA__REPLICATION_FACTOR": str(rep.factor),
        "FBP_KAFKA__MIN_INSYNC_REPLICAS": str(rep.min_insync),
    }
