"""Running things locally: the stack's services (Kafka, Redis, Prometheus) and the
project's own processes (workers, trainer) for tests, benchmarks and the demo."""
