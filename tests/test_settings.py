"""Configuration: env overrides, readable errors, FBP_CONFIG files."""

from __future__ import annotations

import pytest

from core.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("FBP_"):
            monkeypatch.delenv(k)


def test_defaults_match_local_stack():
    s = load_settings()
    assert s.kafka.bootstrap_servers == f"127.0.0.1:{s.stack.kafka_port}"
    assert s.redis.url.startswith(f"redis://127.0.0.1:{s.stack.redis_port}")
    assert s.stack.redis_appendfsync == "everysec"


def test_env_var_override(monkeypatch):
    monkeypatch.setenv("FBP_KAFKA__PARTITIONS", "7")
    monkeypatch.setenv("FBP_KAFKA__BOOTSTRAP_SERVERS", "a:1, b:2")
    monkeypatch.setenv("FBP_WORKER__BATCH_SIZE", "64")
    monkeypatch.setenv("FBP_STACK__REDIS_APPENDFSYNC", "always")
    monkeypatch.setenv("FBP_REDIS__CLUSTER_NODES", "10.0.0.2:7000, redis-3:7001")
    s = load_settings()
    assert s.redis.cluster_seeds() == [("10.0.0.2", 7000), ("redis-3", 7001)]
    assert s.kafka.partitions == 7
    assert s.kafka.servers == ["a:1", "b:2"]
    assert s.kafka.kafka_python_kwargs()["bootstrap_servers"] == ["a:1", "b:2"]
    assert s.worker.batch_size == 64
    assert s.stack.redis_appendfsync == "always"


@pytest.mark.parametrize(
    ("var", "value", "field"),
    [
        ("FBP_WORKER__BATCH_SIZE", "0", "worker.batch_size"),
        ("FBP_KAFKA__PARTITIONS", "many", "kafka.partitions"),
        ("FBP_REDIS__URL", "http://x", "redis.url"),
        ("FBP_REDIS__CLUSTER_NODES", "10.0.0.2", "redis.cluster_nodes"),
        ("FBP_STACK__REDIS_APPENDFSYNC", "sometimes", "stack.redis_appendfsync"),
    ],
)
def test_bad_value_names_the_field(monkeypatch, var, value, field):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as ei:
        load_settings()
    assert field in str(ei.value) and var in str(ei.value)


def test_config_file_toml(monkeypatch, tmp_path):
    cfg = tmp_path / "fbp.toml"
    cfg.write_text(
        '[kafka]\nbootstrap_servers = "broker:29092"\npartitions = 3\n\n'
        "[worker]\nbatch_size = 128\n"
    )
    monkeypatch.setenv("FBP_CONFIG", str(cfg))
    s = load_settings()
    assert s.kafka.bootstrap_servers == "broker:29092" and s.kafka.partitions == 3
    assert s.worker.batch_size == 128
    # Environment beats the file.
    monkeypatch.setenv("FBP_WORKER__BATCH_SIZE", "256")
    assert load_settings().worker.batch_size == 256


def test_config_file_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("FBP_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="not a file"):
        load_settings()
    bad = tmp_path / "fbp.toml"
    bad.write_text("[worker]\nbatch_size = -5\n")
    monkeypatch.setenv("FBP_CONFIG", str(bad))
    with pytest.raises(ConfigError, match="worker.batch_size"):
        load_settings()


def test_sasl_ssl_reach_kafka_clients(monkeypatch):
    monkeypatch.setenv("FBP_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FBP_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("FBP_KAFKA__SASL_USERNAME", "u")
    monkeypatch.setenv("FBP_KAFKA__SASL_PASSWORD", "s3cr3t-pw")
    kw = load_settings().kafka.kafka_python_kwargs()
    assert kw["security_protocol"] == "SASL_SSL"
    assert kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("u", "s3cr3t-pw")
    assert "s3cr3t-pw" not in repr(load_settings().kafka)  # secrets stay hidden
