"""Shared fixtures.  Integration tests use the real local stack (no mocks):
the session fixture ``stack`` starts Kafka + Redis + Prometheus on the default
ports -- or reuses the ones already running -- and leaves them running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core.settings import Settings, load_settings


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs the local stack (Kafka, Redis, Prometheus)")
    config.addinivalue_line("markers", "slow: takes more than a minute")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Anything that uses the stack is an integration test, marked or not."""
    for item in items:
        if {"stack", "clean_topics", "redis_client"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def settings() -> Settings:
    """Settings as the environment defines them (defaults: the local stack)."""
    return load_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Settings]:
    """Kafka, Redis and Prometheus up and healthy, topics created; yields settings."""
    from stack import StackError, stack_up

    try:
        stack_up(settings)
    except StackError as exc:
        pytest.fail(f"local stack did not come up: {exc}")
    yield settings


def reset_all_topics(settings: Settings) -> None:
    """Delete and recreate every topic (empty, offsets from 0)."""
    from core.topics import reset_topics

    reset_topics(settings)


@pytest.fixture
def clean_topics(stack: Settings) -> Settings:
    """Empty topics for this test; yields settings."""
    reset_all_topics(stack)
    return stack


@pytest.fixture
def redis_client(stack: Settings):
    """A Redis client on the configured database, FLUSHDB'd before the test."""
    import redis

    r = stack.redis
    kw = {
        "username": r.username,
        "password": r.password.get_secret_value() if r.password else None,
    }
    if r.url.startswith("rediss://") and r.ssl_ca_certs:
        kw["ssl_ca_certs"] = str(r.ssl_ca_certs)
    client = redis.Redis.from_url(r.url, **kw)
    client.flushdb()
    yield client
    client.close()


# -- shared by the end-to-end suites ------------------------------------------------


@pytest.fixture(scope="session")
def ml100k():
    """MovieLens-100K (read once per session)."""
    from core.datasets import load_dataset

    return load_dataset("ml-100k")


@pytest.fixture(scope="session")
def ckpt(ml100k, tmp_path_factory):
    """A small LSTM checkpoint (1 epoch on the first BOOTSTRAP_EVENTS ratings),
    trained once per session and served by every end-to-end test's workers."""
    from tests.streamkit import BOOTSTRAP_EVENTS, checkpoint

    ds = ml100k
    return checkpoint(tmp_path_factory.mktemp("ckpt"), ds.ratings.iloc[:BOOTSTRAP_EVENTS],
                      ds.movies, ds.genre_vocab)


@pytest.fixture
def ns(stack):
    """Topics and a Redis key prefix of this test's own (4 partitions)."""
    from stack.procs import Namespace

    n = Namespace.fresh(4, stack)
    n.create()
    yield n
    n.drop()
