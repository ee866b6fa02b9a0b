"""Test-side access to the process launcher (it lives in ``fbp.procs`` so the
benchmarks and the demo share it)."""

from fbp.procs import Proc, start_trainer, start_worker, wait_healthy  # noqa: F401
