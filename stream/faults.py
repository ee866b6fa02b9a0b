"""Which failures stop a worker, in one place.

A worker fails stop (exit 75, batch unacknowledged, redelivered to its
replacement) only for *infrastructure* faults, where redelivery is the right
answer: Redis or Kafka unavailable after their clients' own retries.
Anything else raised while handling one record is that record's problem:
it is dead-lettered as ``internal_error`` and the batch goes on.

Every Redis error counts as infrastructure, not only connection errors and
timeouts: the worker sends Redis its own keys and blobs, never a record's
bytes, so a Redis error (OOM, a replica in read-only mode, a missing script)
says something about Redis, not about the record.
"""

from __future__ import annotations

import aiokafka.errors
import faust.exceptions
import kafka.errors
import redis.exceptions

from fbp_errors import InfrastructureError

INFRASTRUCTURE: tuple[type[BaseException], ...] = (
    InfrastructureError,
    redis.exceptions.RedisError,       # ConnectionError / TimeoutError after the client's retries, ...
    redis.exceptions.RedisClusterException,  # cluster client: no reachable node / slots uncovered (not a RedisError)
    aiokafka.errors.KafkaError,        # Kafka refusing or timing out a produce
    kafka.errors.KafkaError,
    faust.exceptions.ProducerSendError,  # Faust's wrapper around the two above
)

_SIZE_ERRORS = (aiokafka.errors.MessageSizeTooLargeError, kafka.errors.MessageSizeTooLargeError)


def is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, INFRASTRUCTURE)


def is_size_error(exc: BaseException) -> bool:
    """True when a produce failed because the record is too large (client's
    max_request_size or broker's message.max.bytes), through Faust's wrapping."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, _SIZE_ERRORS) or "MessageSizeTooLarge" in type(e).__name__:
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return "MessageSizeTooLarge" in str(exc) or "RecordTooLarge" in str(exc)
