"""All configuration of feedback-predictor in one typed place.

Values come, in rising priority, from the defaults below, an optional file
(TOML or YAML, named by ``FBP_CONFIG``), and environment variables prefixed
``FBP_`` with ``__`` between nested names, e.g. ``FBP_KAFKA__BOOTSTRAP_SERVERS``
or ``FBP_WORKER__BATCH_SIZE``.  A bad value is refused at start-up with a
message naming the field, so nothing half-configured ever runs.
"""

from __future__ import annotations

import os
import ssl
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


from fbp_errors import ConfigError  # noqa: E402  (re-exported: callers import it from here too)


#: epochs of one warm-start fine-tune, the trainer's and the simulator's
#: (``trainer.prequential``).  Why 2: on ML-100K's first half 4 was better by
#: 0.0010, but on held-out events it gained nothing (the second half alone
#: 0.9416 against 0.9417, the full stream 0.9161 against 0.9159) at twice the
#: fine-tune CPU (README "The network's share and settings that adapt")
FINETUNE_EPOCHS = 2


class KafkaSettings(BaseModel):
    """How to reach Kafka and which topics carry what."""
    model_config = ConfigDict(use_attribute_docstrings=True)

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list of Kafka brokers."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a SASL protocol)."""
    sasl_username: str | None = None
    """SASL user."""
    sasl_password: SecretStr | None = None
    """SASL password (never logged)."""
    ssl_cafile: Path | None = None
    """CA bundle that signed the brokers' certificates."""
    ssl_certfile: Path | None = None
    """Client certificate for mutual TLS."""
    ssl_keyfile: Path | None = None
    """Client key for mutual TLS."""
    ssl_check_hostname: bool = True
    """Verify the broker's hostname against its certificate."""
    ratings_topic: str = "ratings"
    """Topic producers publish rating events to (keyed by user id)."""
    predictions_topic: str = "predictions"
    """Topic the workers publish predictions to (keyed by user id)."""
    dlq_topic: str = "ratings-dlq"
    """Dead-letter topic for malformed events, with a reason."""
    model_updates_topic: str = "model-updates"
    """Announcements of promoted models."""
    movies_topic: str = "movies"
    """Optional movie catalog feed (compacted, keyed by movie id): titles for people-facing outputs, read by `fbp catalog follow`."""
    partitions: int = Field(4, ge=1, le=1024)
    """Partitions of ratings/predictions/DLQ: the most workers that can share the load."""
    replication_factor: int = Field(1, ge=1)
    """Replication factor of created topics."""
    min_insync_replicas: int | None = Field(None, ge=1)
    """min.insync.replicas of created topics (unset = the broker's default): with acks=all, a write is acknowledged once this many replicas have it (a 3-broker cluster: 2)."""

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context aiokafka and Faust take (None unless SSL / SASL_SSL)."""
        if self.security_protocol not in ("SSL", "SASL_SSL"):
            return None
        ctx = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
        ctx.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile:
            ctx.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile) if self.ssl_keyfile else None)
        return ctx

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Connection options in aiokafka's vocabulary (the exactly-once producers)."""
        kw: dict[str, Any] = {"bootstrap_servers": self.servers, "security_protocol": self.security_protocol}
        ctx = self.ssl_context()
        if ctx is not None:
            kw["ssl_context"] = ctx
        if self.sasl_mechanism:
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                      sasl_plain_password=self.sasl_password.get_secret_value() if self.sasl_password else None)
        return kw

    def kafka_python_kwargs(self) -> dict[str, Any]:
        """Connection options in kafka-python's vocabulary (producer, consumer, admin)."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.servers,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kw["ssl_cafile"] = str(self.ssl_cafile) if self.ssl_cafile else None
            kw["ssl_certfile"] = str(self.ssl_certfile) if self.ssl_certfile else None
            kw["ssl_keyfile"] = str(self.ssl_keyfile) if self.ssl_keyfile else None
            kw["ssl_check_hostname"] = self.ssl_check_hostname
        return kw


class RedisSettings(BaseModel):
    """Where per-user state lives.  ``rediss://`` URLs turn on TLS.

    Redis Cluster: ``FBP_REDIS__CLUSTER=true`` with ``url`` naming any one
    node (redis-py's cluster client discovers the rest and routes by slot),
    and ``cluster_nodes`` naming a few more: a worker (re)started while the
    ``url`` node is down still finds the cluster through them.
    The code path is the same as for one Redis: every key group shares a hash
    tag (core.repos.keys).  Durability across a failover: replication is
    asynchronous, so a master that dies can take acknowledged writes with it;
    ``wait_replicas: 1`` makes each state write wait (WAIT) for one replica
    before the worker commits its offsets, and the servers' own
    ``min-replicas-to-write 1`` refuses writes a lone master could lose.
    """
    model_config = ConfigDict(use_attribute_docstrings=True)

    url: str = "redis://127.0.0.1:6379/0"
    """redis://host:port/db, rediss:// for TLS, or unix://; for a cluster, any one node (db 0)."""
    cluster: bool = False
    """Talk to a Redis Cluster (redis-py's cluster client) instead of one Redis."""
    cluster_nodes: Annotated[list[str], NoDecode] = []
    """More cluster nodes to start from besides url's, as host:port (env: comma-separated); url's node alone is a single point of failure at start-up."""
    wait_replicas: int = Field(0, ge=0, le=16)
    """Replicas that must acknowledge each state write (WAIT) before it counts as durable; 0 = no WAIT (a failover may lose the last ~second of writes)."""
    wait_timeout_ms: int = Field(1000, ge=1, le=60_000)
    """How long a state write waits for wait_replicas; fewer acknowledgements fail the batch (redelivered, not committed)."""
    username: str | None = None
    """Redis ACL user."""
    password: SecretStr | None = None
    """Redis password (never logged)."""
    ssl_ca_certs: Path | None = None
    """CA bundle for rediss:// connections."""
    key_prefix: str = "fbp"
    """Prefix of every Redis key, so deployments can share one Redis."""

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("cluster_nodes", mode="before")
    @classmethod
    def _nodes(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [n.strip() for n in v.split(",") if n.strip()]
        for node in v:
            host, sep, port = str(node).rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{node!r} is not host:port (e.g. 10.0.0.7:6379)")
        return v

    def cluster_seeds(self) -> list[tuple[str, int]]:
        """``cluster_nodes`` as (host, port) pairs."""
        return [(h, int(p)) for h, _, p in (n.rpartition(":") for n in self.cluster_nodes)]


class StackSettings(BaseModel):
    """The local, Docker-free stack started by ``fbp stack up``."""
    model_config = ConfigDict(use_attribute_docstrings=True)

    data_dir: Path = REPO_ROOT / ".stack"
    """Where the local stack keeps Kafka logs, Redis AOF and Prometheus data."""
    kafka_port: int = 9092
    """Local Kafka broker port."""
    kafka_controller_port: int = 9093
    """Local KRaft controller port."""
    kafka_heap: str = "384m"
    """JVM heap of the local broker."""
    redis_port: int = 6379
    """Local Redis port."""
    kafka_brokers: int = Field(1, ge=1, le=9)
    """Local Kafka brokers: 1 = the single broker on kafka_port; N > 1 = a KRaft cluster of N combined broker+controller nodes on kafka_cluster_port.. (topics get replication factor min(3, N), min.insync.replicas one less)."""
    kafka_cluster_port: int = 9192
    """First client port of the local Kafka cluster (broker i listens on this + i - 1), apart from the single broker's so both can run."""
    kafka_cluster_controller_port: int = 9292
    """First KRaft controller port of the local Kafka cluster (node i: this + i - 1)."""
    redis_cluster: bool = False
    """Run Redis as a local Redis Cluster of 3 masters + 3 replicas instead of one redis-server."""
    redis_cluster_port: int = 7100
    """First port of the local Redis Cluster's 6 nodes (this .. this + 5; cluster bus: each + 10000)."""
    prometheus_port: int = 9090
    """Local Prometheus port."""
    # Targets Prometheus scrapes (the workers' and trainer's /metrics endpoints).
    scrape_targets: list[str] = ["127.0.0.1:6066", "127.0.0.1:6067", "127.0.0.1:6068"]
    """host:port of every /metrics endpoint Prometheus scrapes (workers, trainer)."""
    scrape_interval_s: float = 2.0
    """Prometheus scrape interval."""
    # Redis AOF durability: "always" loses nothing on a crash, "everysec" up to ~1 s.
    redis_appendfsync: Literal["always", "everysec", "no"] = "everysec"
    """Redis AOF fsync policy: 'always' loses nothing on a crash, 'everysec' up to ~1 s."""


class WorkerSettings(BaseModel):
    """The Faust stream processor."""
    model_config = ConfigDict(use_attribute_docstrings=True)

    app_id: str = "fbp-worker"
    """Faust app id = Kafka consumer group of the workers."""
    web_host: str = "127.0.0.1"
    """Address the worker's HTTP API binds to."""
    web_port: int = 6066
    """Port of the worker's HTTP API, /metrics and /live."""
    session_timeout_s: float = Field(10.0, ge=6, le=300)
    """Kafka group session timeout: how soon partitions of a dead worker move on."""
    commit_interval_s: float = Field(1.0, gt=0, le=60)
    """How often the offsets of finished batches are committed: a crashed worker's successor redoes up to this much work (idempotently, by the watermarks)."""
    batch_size: int = Field(4000, ge=1, le=65536)
    """Most events per micro-batch: a batch is whatever has arrived, so the cap only binds under a backlog, where larger batches share per-user work (4,000 drained one at 1.8x the events/s of 512 at the same latency for a given load, BENCHMARKS.md)."""
    batch_timeout_s: float = Field(0.05, gt=0, le=60)
    """Longest wait to fill a micro-batch."""
    max_poll_records: int = Field(4000, ge=1, le=100_000)
    """Most records one Kafka fetch hands to Faust (its broker_max_poll_records; fewer, larger fetches)."""
    stream_buffer: int = Field(16_384, ge=64, le=1_000_000)
    """Events Faust buffers per partition ahead of the agent before pausing the fetch."""
    fetch_max_wait_ms: int = Field(500, ge=0, le=60_000)
    """Longest time the broker holds a fetch with no new data (Faust hard-codes 1500; a fully read partition delays the others' records by up to this)."""
    topic_disable_leader: bool = True
    """Skip Faust's leader-election topic (unused here; its empty partition makes every fetch wait fetch_max_wait_ms)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs: auto picks CUDA when present."""
    torch_threads: int = Field(1, ge=1, le=256)
    """CPU threads torch may use in a worker (1 suits a small box shared with Kafka and Redis)."""
    top_k: int = Field(10, ge=0, le=1000)
    """Movies recommended in each prediction record (0 = none)."""
    online_movie_side: bool = True
    """Learn the online movie side from every event, shared by all workers in Redis (off: it stays as the checkpoint has it until the next promotion)."""
    catalog_features: bool = True
    """Give the model the movie catalog's genres and year for movies it has none for (a movie its training data never had), read with the batch's states; the trainer follows it before each fine-tune."""
    catalog_retry_s: float = Field(60.0, gt=0, le=86_400)
    """A movie the catalog did not know is asked for again after this long, never more often."""
    exactly_once: bool = False
    """Produce each batch's predictions, re-keyed events and dead letters and commit its offsets in one Kafka transaction: a read_committed subscriber sees each event id once (off: at least once)."""
    pipeline: bool = True
    """Begin the next batch while the previous one waits for Kafka's acknowledgements and Redis (same results: the next batch reads the previous one's states from memory); off: one batch at a time. Exactly-once mode is always one at a time."""
    checkpoint: Path = REPO_ROOT / "runs" / "bootstrap" / "model"
    """Model used when Redis has no published model."""
    max_payload_bytes: int = Field(4096, ge=128)
    """Larger rating payloads go to the DLQ as oversized_payload."""
    dlq_payload_prefix_bytes: int = Field(1024, ge=0, le=65536)
    """Most bytes of a refused record's value copied into its dead letter (size and sha256 always kept)."""
    key_policy: Literal["rekey", "refuse"] = "rekey"
    """Valid events not keyed by their user id: rekey (via <ratings>-repartition) or refuse (DLQ bad_key)."""
    # Timestamps outside [min_ts, now + max_future_s] are refused as absurd.
    min_ts: int = 0
    """Earliest acceptable event timestamp (unix s)."""
    max_future_s: int = 7 * 24 * 3600
    """How far in the future an event timestamp may be."""
    admin_token: SecretStr | None = None
    """Bearer token for admin endpoints (unset = admin endpoints disabled)."""
    read_token: SecretStr | None = None
    """Bearer token for read endpoints (unset = open)."""


class StateSettings(BaseModel):
    """Lifecycle of what the stream keeps per user in Redis (``core.repos.states``)."""
    model_config = ConfigDict(use_attribute_docstrings=True)

    idle_ttl_s: int = Field(90 * 24 * 3600, ge=0)
    """A user's state and watermarks expire this long after their last stored event (set and refreshed by the same atomic write); a returning user then starts cold. 0 = never. Default 90 days: a season of a movie service's occasional viewers keeps its taste, and it is far above Kafka's retention (7 d + a 7 d segment), so no event of an expired user can still be redelivered (README, State lifecycle)."""
    allow_eviction: bool = False
    """Start the worker even when Redis runs an eviction policy (allkeys-*, volatile-*) that can evict states and watermarks (then users silently reset and redelivered events apply twice); off: refuse to start."""
    full_retry_max_s: float = Field(5.0, gt=0, le=300)
    """Longest pause between retries of a write Redis refused as full (maxmemory, noeviction): the worker stops consuming and retries with backoff up to this, and resumes by itself once memory is freed."""


class TrainerSettings(BaseModel):
    """Offline training defaults and the continuous fine-tuning service."""
    model_config = ConfigDict(use_attribute_docstrings=True)

    app_id: str = "fbp-trainer"
    """Kafka consumer group of the fine-tuning service."""
    web_port: int = 6068
    """Port of the fine-tuning service's /metrics."""
    seed: int = 0
    """Random seed of training and fine-tuning."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    buffer_events: int = Field(50_000, ge=100)
    """Recent events the fine-tuning service keeps (in Redis)."""
    finetune_every_events: int = Field(5_000, ge=10)
    """Fine-tune after this many new events..."""
    finetune_every_s: float = Field(300.0, gt=0)
    """...or after this many seconds, whichever comes first."""
    finetune_epochs: int = Field(FINETUNE_EPOCHS, ge=1)
    """Epochs of one fine-tune (warm start)."""
    replay_fraction: float = Field(0.5, ge=0, le=1)
    """Share of older events replayed in a fine-tune so the model does not forget."""
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    """Newest share of the buffer held out to compare champion and challenger."""
    promote_margin: float = Field(0.0, ge=0)
    """A challenger must beat the champion's holdout RMSE by this much."""
    drift_margin: float = Field(0.05, ge=0)
    """Online RMSE this far above its value at the last promotion triggers a fine-tune."""
    reservoir_events: int = Field(20_000, ge=0)
    """Reservoir sample of every event seen, the source of the replay of older data."""
    min_new_events: int = Field(200, ge=1)
    """A time trigger fires only when at least this many events arrived since the last run."""
    min_holdout_events: int = Field(100, ge=1)
    """A comparison on fewer unseen holdout events is not trusted (the run is skipped)."""
    drift_window: int = Field(2_000, ge=10)
    """Predictions in the rolling online RMSE the drift trigger watches."""
    finetune_lr: float | None = Field(None, gt=0)
    """Adam learning rate of fine-tunes (None: the model's offline default)."""
    threads: int = Field(0, ge=0)
    """Torch intra-op threads of a fine-tune (0: torch's default)."""


class Settings(BaseSettings):
    """Root of the configuration tree."""

    model_config = SettingsConfigDict(
        env_prefix="FBP_", env_nested_delimiter="__", extra="forbid",
        use_attribute_docstrings=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    stack: StackSettings = StackSettings()
    worker: WorkerSettings = WorkerSettings()
    state: StateSettings = StateSettings()
    trainer: TrainerSettings = TrainerSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("FBP_CONFIG")
        if path:
            sources.append(_file_source(settings_cls, Path(path)))
        return tuple(sources)


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    from pydantic_settings import TomlConfigSettingsSource, YamlConfigSettingsSource

    if not path.is_file():
        raise ConfigError(f"FBP_CONFIG points to {path}, which is not a file")
    if path.suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if path.suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    raise ConfigError(f"FBP_CONFIG {path}: use a .toml or .yaml file")


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning pydantic's errors into one readable ConfigError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            env = "FBP_" + "__".join(str(p).upper() for p in err["loc"])
            lines.append(f"  {loc} (env {env}): {err['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return load_settings()
