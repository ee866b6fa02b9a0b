"""All configuration of feedback-predictor in one typed place.

Values come, in rising priority, from the defaults below, an optional file
(TOML or YAML, named by ``FBP_CONFIG``), and environment variables prefixed
``FBP_`` with ``__`` between nested names, e.g. ``FBP_KAFKA__BOOTSTRAP_SERVERS``
or ``FBP_WORKER__BATCH_SIZE``.  A bad value is refused at start-up with a
message naming the field, so nothing half-configured ever runs.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(RuntimeError):
    """A configuration the program refuses to run with; the message says what to fix."""


class KafkaSettings(BaseModel):
    """How to reach Kafka and which topics carry what."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    ratings_topic: str = "ratings"
    predictions_topic: str = "predictions"
    dlq_topic: str = "ratings-dlq"
    model_updates_topic: str = "model-updates"
    partitions: int = Field(4, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1)

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

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
    """Where per-user state lives.  ``rediss://`` URLs turn on TLS."""

    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password: SecretStr | None = None
    ssl_ca_certs: Path | None = None
    key_prefix: str = "fbp"

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class StackSettings(BaseModel):
    """The local, Docker-free stack started by ``fbp stack up``."""

    data_dir: Path = REPO_ROOT / ".stack"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    kafka_heap: str = "384m"
    redis_port: int = 6379
    prometheus_port: int = 9090
    # Targets Prometheus scrapes (the workers' and trainer's /metrics endpoints).
    scrape_targets: list[str] = ["127.0.0.1:6066", "127.0.0.1:6067", "127.0.0.1:6068"]
    scrape_interval_s: float = 2.0
    # Redis AOF durability: "always" loses nothing on a crash, "everysec" up to ~1 s.
    redis_appendfsync: Literal["always", "everysec", "no"] = "everysec"


class WorkerSettings(BaseModel):
    """The Faust stream processor."""

    app_id: str = "fbp-worker"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    batch_size: int = Field(512, ge=1, le=65536)
    batch_timeout_s: float = Field(0.05, gt=0, le=60)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    top_k: int = Field(10, ge=0, le=1000)
    checkpoint: Path = REPO_ROOT / "runs" / "bootstrap" / "model"
    max_payload_bytes: int = Field(4096, ge=128)
    # Timestamps outside [min_ts, now + max_future_s] are refused as absurd.
    min_ts: int = 0
    max_future_s: int = 7 * 24 * 3600
    admin_token: SecretStr | None = None
    read_token: SecretStr | None = None


class TrainerSettings(BaseModel):
    """Offline training defaults and the continuous fine-tuning service."""

    app_id: str = "fbp-trainer"
    web_port: int = 6068
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    buffer_events: int = Field(50_000, ge=100)
    finetune_every_events: int = Field(5_000, ge=10)
    finetune_every_s: float = Field(300.0, gt=0)
    finetune_epochs: int = Field(2, ge=1)
    replay_fraction: float = Field(0.5, ge=0, le=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    promote_margin: float = Field(0.0, ge=0)
    drift_margin: float = Field(0.05, ge=0)


class Settings(BaseSettings):
    """Root of the configuration tree."""

    model_config = SettingsConfigDict(
        env_prefix="FBP_", env_nested_delimiter="__", extra="forbid"
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    stack: StackSettings = StackSettings()
    worker: WorkerSettings = WorkerSettings()
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
