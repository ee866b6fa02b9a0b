"""Running things locally: the stack's services (Kafka, Redis, Prometheus and
their cluster variants) and the project's own processes (workers, trainer) for
tests, benchmarks and the demo.

The stack is a registry of services (:mod:`stack.registry`), one module each
(:mod:`stack.kafka`, :mod:`stack.kafka_cluster`, :mod:`stack.redis`,
:mod:`stack.redis_cluster`, :mod:`stack.prometheus`) under one supervisor
(:mod:`stack.supervisor`); :mod:`stack.control` is the public face below.
"""

from fbp_errors import StackError
from stack.control import (
    clusters_running,
    running,
    service_healthy,
    stack_down,
    stack_status,
    stack_up,
    start_service,
    stop_service,
    topic_settings,
)
from stack.prometheus import prometheus_config
from stack.registry import SERVICES
from stack.service import ServiceStatus, service_dir

__all__ = [
    "SERVICES", "ServiceStatus", "StackError", "clusters_running", "prometheus_config", "running",
    "service_dir", "service_healthy", "stack_down", "stack_status", "stack_up", "start_service", "stop_service",
    "topic_settings",
]
