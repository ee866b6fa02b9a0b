"""Fault-injection suite: a *private* Kafka + Redis stack and a scenario helper.

Why a private stack: these tests stop, kill and restart the broker and Redis.
Doing that to the default stack (9092 / 6379) would break every other test
and engineer using it, so the suite starts its own single-node Kafka (KRaft)
and Redis with :mod:`fbp.stack` on other ports and its own data dir, with
``appendfsync always`` -- the durability setting under which a Redis SIGKILL
loses no acknowledged state write (see README.md, "Guarantees").  The jars are
shared with the default stack's ``kafka-libs`` (nothing is downloaded).

Every scenario replays >= 20,000 ML-100K events (paced, in a thread, so faults
land mid-stream) through real ``fbp worker`` processes and ends with the same
check, printed as one line::

    scenario=<name> events=<n> faults=<k> missing=<m> state_mismatches=<s>

``missing`` counts event ids without a prediction record; ``state_mismatches``
counts users whose final Redis state differs from the undisturbed in-process
reference (``tests.streamkit.simulate``).  Both must be 0.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from stack import procs
from stack.procs import Namespace
from core.settings import Settings, load_settings

FAULT_KAFKA_PORT = int(os.environ.get("FBP_FAULTS_KAFKA_PORT", "19192"))
FAULT_REDIS_PORT = int(os.environ.get("FBP_FAULTS_REDIS_PORT", "16479"))
EVENTS = 20_000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault-injection suite (private Kafka + Redis stack)")


def fault_settings(data_dir: Path, appendfsync: str = "always") -> Settings:
    base = load_settings()
    kp, rp = FAULT_KAFKA_PORT, FAULT_REDIS_PORT
    return base.model_copy(update={
        "kafka": base.kafka.model_copy(update={
            "bootstrap_servers": f"127.0.0.1:{kp}", "security_protocol": "PLAINTEXT",
            "sasl_mechanism": None}),
        "redis": base.redis.model_copy(update={
            "url": f"redis://127.0.0.1:{rp}/0", "username": None, "password": None}),
        "stack": base.stack.model_copy(update={
            "data_dir": data_dir, "kafka_port": kp, "kafka_controller_port": kp + 1,
            "redis_port": rp, "redis_appendfsync": appendfsync, "kafka_heap": "320m"}),
    })


@pytest.fixture(scope="session")
def fstack(tmp_path_factory) -> Iterator[Settings]:
    """Private Kafka + Redis (appendfsync always), stopped at the end of the session."""
    from stack import StackError, stack_down, stack_up

    data = tmp_path_factory.mktemp("faultstack")
    libs = load_settings().stack.data_dir / "kafka-libs"
    if libs.is_dir():
        (data / "kafka-libs").symlink_to(libs)
    s = fault_settings(data)
    try:
        rows = stack_up(s, ["kafka", "redis"], topics=False, timeout_s=120)
    except StackError as exc:
        stack_down(s, ["kafka", "redis"], timeout_s=10)
        pytest.fail(f"private fault stack did not come up: {exc}")
    foreign = [f"{r.name} on port {r.port}" for r in rows if r.external]
    if foreign:  # e.g. left over from an interrupted run: we could not restart it
        stack_down(s, ["kafka", "redis"], timeout_s=10)
        pytest.fail(f"fault-stack ports are taken by processes this run did not start "
                    f"({', '.join(foreign)}); stop them or set FBP_FAULTS_KAFKA_PORT / "
                    "FBP_FAULTS_REDIS_PORT")
    try:
        yield s
    finally:
        stack_down(s, ["kafka", "redis"], timeout_s=20)


@pytest.fixture(scope="session")
def ml100k():
    from core.datasets import load_dataset

    return load_dataset("ml-100k")


@pytest.fixture(scope="session")
def fault_df(ml100k) -> pd.DataFrame:
    """The replayed slice: the first 20,000 ratings of ML-100K (row index = event id)."""
    return ml100k.ratings.iloc[:EVENTS]


@pytest.fixture(scope="session")
def ckpt(ml100k, tmp_path_factory) -> Path:
    from tests.streamkit import checkpoint

    ds = ml100k
    return checkpoint(tmp_path_factory.mktemp("fault-ckpt"), ds.ratings.iloc[:5_000], ds.movies,
                      ds.genre_vocab, epochs=1)


@pytest.fixture(scope="session")
def reference(ckpt, fault_df):
    """The undisturbed run, in process: (user index, final states)."""
    from models.checkpoint import load_checkpoint
    from tests.streamkit import simulate

    model, _ = load_checkpoint(ckpt)
    _, uindex, states = simulate(model, fault_df)
    return model, uindex, states


@pytest.fixture
def fns(fstack) -> Iterator[Namespace]:
    from stack import stack_up

    stack_up(fstack, ["kafka", "redis"], topics=False, timeout_s=120)  # a failed scenario may have left one down
    n = Namespace.fresh(4, fstack)
    n.create()
    yield n
    try:
        n.drop()
    except Exception:  # noqa: BLE001 - a failed test may leave the stack down
        pass


@dataclass
class Scenario:
    """One fault scenario: workers, a paced replay thread and the final check."""

    name: str
    settings: Settings
    ns: Namespace
    ckpt: Path
    df: pd.DataFrame
    reference: tuple
    logdir: Path
    port: int
    batch: int = 256
    seed: int = 0
    #: workers learn the shared movie side (the product default); off, the
    #: frozen path whose final states the exact oracle of :meth:`verify` checks
    online_movie_side: bool = False
    faults: int = 0
    progress: int = 0
    feed_error: list[BaseException] = field(default_factory=list)
    _feeder: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # -- processes ---------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = self.ns.env(self.batch, self.port)
        s = self.settings
        env.update({
            "FBP_KAFKA__BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
            "FBP_REDIS__URL": s.redis.url,
            "FBP_STACK__DATA_DIR": str(s.stack.data_dir),
            "FBP_WORKER__CHECKPOINT": str(self.ckpt),
            "FBP_WORKER__TOP_K": "3",
            "FBP_WORKER__ONLINE_MOVIE_SIDE": str(self.online_movie_side).lower(),
        })
        return env

    def start_worker(self) -> procs.Proc:
        return procs.start_worker(self.port, self.logdir, self.env())

    def kill_at(self, worker: procs.Proc, points: list[float], delays: list[float]) -> procs.Proc:
        """SIGKILL ``worker`` once the predictions reach each fraction of
        ``points`` (then the matching delay, so kills land inside batches),
        starting a fresh worker after each kill; returns the last one (also
        killed here if anything fails on the way)."""
        import time

        try:
            for frac, delay in zip(points, delays):
                self.wait_fraction(frac)
                time.sleep(delay)
                assert worker.alive(), worker.tail()
                worker.kill()
                self.faults += 1
                print(f"  kill {self.faults} at {frac:.2f} (+{delay:.2f}s), {self.progress} predicted")
                worker = self.start_worker()
        except BaseException:
            worker.kill()
            raise
        return worker

    # -- the replay ----------------------------------------------------------
    def producer(self):
        """Idempotent kafka-python producer that keeps retrying through a broker outage."""
        from core.kafka_io import make_producer

        return make_producer(self.settings, client_id=f"fault-{self.name}", retries=2**31 - 1,
                             delivery_timeout_ms=300_000, request_timeout_ms=20_000,
                             reconnect_backoff_max_ms=1000, max_block_ms=300_000)

    def feed(self, rate: float) -> None:
        """Start the paced replay of ``df`` in a thread."""
        from stream.replay import replay

        def run() -> None:
            prod = self.producer()
            try:
                replay(self.ns.scoped(), self.df, rate=rate, progress=False, producer=prod)
            except BaseException as exc:  # noqa: BLE001 - reported by join_feed
                self.feed_error.append(exc)
            finally:
                prod.close(timeout=30)

        self._feeder = threading.Thread(target=run, name=f"feed-{self.name}", daemon=True)
        self._feeder.start()

    def join_feed(self, timeout: float = 400) -> None:
        assert self._feeder is not None
        self._feeder.join(timeout)
        assert not self._feeder.is_alive(), "replay did not finish"
        assert not self.feed_error, f"replay failed: {self.feed_error[0]!r}"

    def wait_predictions(self, n: int, timeout: float = 300) -> int:
        """Block until ``n`` distinct event ids have a prediction record."""
        from tests.streamkit import read_topic

        def note(k: int) -> None:
            self.progress = k

        recs = read_topic(self.settings, self.ns.predictions, until=n, timeout=timeout, on_progress=note)
        return len({r["event_id"] for r in recs})

    def wait_fraction(self, frac: float, timeout: float = 300) -> None:
        self.wait_predictions(max(1, int(len(self.df) * frac)), timeout)

    # -- the check -----------------------------------------------------------
    def verify(self, workers: list[procs.Proc], timeout: float = 300) -> tuple[int, int]:
        """Wait for every prediction, stop workers cleanly, compare with the reference;
        prints the scenario line and asserts 0 missing / 0 mismatches."""
        from tests.streamkit import read_topic, redis_states, state_mismatches

        n = len(self.df)
        recs = read_topic(self.settings, self.ns.predictions, until=n, timeout=timeout)
        codes = [w.stop() for w in workers]
        got = {r["event_id"] for r in recs}
        expected = {f"df-{i}" for i in self.df.index}
        missing = len(expected - got)
        model, uindex, ref_states = self.reference
        states, absent = redis_states(self.ns, model, uindex)
        mismatches = state_mismatches(states, ref_states)
        # a repeated record (redelivery) must carry the same prediction as the first
        first: dict[str, float] = {}
        differing = 0
        for r in recs:
            if abs(first.setdefault(r["event_id"], r["predicted"]) - r["predicted"]) > 1e-5:
                differing += 1
        print(f"\nscenario={self.name} events={n} faults={self.faults} missing={missing} "
              f"state_mismatches={mismatches}")
        print(f"  (records {len(recs)}, repeats {len(recs) - len(got)}, repeats with another "
              f"value {differing}, users without state {len(absent)}, unexpected ids "
              f"{len(got - expected)}, worker exit codes {codes})")
        tails = "\n".join(w.tail(30) for w in workers)
        assert missing == 0, f"{missing} events without a prediction\n{tails}"
        assert mismatches == 0 and not absent, f"{mismatches} state mismatches, {len(absent)} absent\n{tails}"
        assert differing == 0
        assert not (got - expected)
        return missing, mismatches

    def verify_online(self, workers: list[procs.Proc], timeout: float = 300, rmse_bound: float = 0.002
                      ) -> dict[str, float]:
        """The oracle when workers learn the shared movie side.  A crash can
        lose one batch's movie-side increments (states are stored first) and
        redelivered batches are cut differently, so the online part cannot
        equal a reference bit for bit.  What must hold: no event without a
        prediction; the network's part of each user's state (window, count,
        LSTM state: it does not read the online movie side) exactly as the
        reference; and the online RMSE within ``rmse_bound`` of the
        undisturbed in-process run (``simulate(..., learn_movies=True)``) --
        by default 0.002, the bound the end-to-end test sets between the
        stream and the simulator."""
        import numpy as np

        from models.checkpoint import load_checkpoint
        from tests.streamkit import read_topic, redis_states, simulate, state_mismatches
        from trainer.prequential import stream_order

        n = len(self.df)
        recs = read_topic(self.settings, self.ns.predictions, until=n, timeout=timeout)
        codes = [w.stop() for w in workers]
        by_id = {r["event_id"]: r for r in recs}  # a repeat carries the first's event, any value
        order = stream_order(self.df)
        missing = sum(f"df-{i}" not in by_id for i in order.index)
        model, _ = load_checkpoint(self.ckpt)
        ref, uindex, ref_states = simulate(model, self.df, learn_movies=True)
        states, absent = redis_states(self.ns, model, uindex)
        net = [k for k in ref_states if not k.startswith("on_")]
        net_mismatches = state_mismatches({k: states[k] for k in net}, {k: ref_states[k] for k in net})
        online_mismatches = state_mismatches({k: v for k, v in states.items() if k.startswith("on_")},
                                             {k: v for k, v in ref_states.items() if k.startswith("on_")},
                                             atol=1e-3)
        y = order["rating"].to_numpy(np.float64)
        got = np.array([by_id[f"df-{i}"]["predicted"] if f"df-{i}" in by_id else np.nan for i in order.index])
        rmse = float(np.sqrt(np.nanmean((got - y) ** 2)))
        rmse_ref = float(np.sqrt(np.mean((ref.astype(np.float64) - y) ** 2)))
        print(f"\nscenario={self.name} events={n} faults={self.faults} missing={missing} "
              f"network_state_mismatches={net_mismatches} online_rmse={rmse:.4f} reference={rmse_ref:.4f}")
        print(f"  (records {len(recs)}, repeats {len(recs) - len(by_id)}, users whose online part differs "
              f"by > 1e-3: {online_mismatches} of {len(uindex)}, worker exit codes {codes})")
        tails = "\n".join(w.tail(30) for w in workers)
        assert missing == 0, f"{missing} events without a prediction\n{tails}"
        assert net_mismatches == 0 and not absent, f"{net_mismatches} network-state mismatches\n{tails}"
        assert abs(rmse - rmse_ref) < rmse_bound, (rmse, rmse_ref)
        return {"rmse": rmse, "reference": rmse_ref, "online_mismatches": online_mismatches}


@pytest.fixture
def scenario(request, fstack, fns, ckpt, fault_df, reference, tmp_path):
    """Factory: ``scenario(name, port=..., seed=...)``."""
    made: list[Scenario] = []

    def make(name: str, port: int, **kw) -> Scenario:
        sc = Scenario(name, fstack, fns, ckpt, fault_df, reference, tmp_path, port, **kw)
        made.append(sc)
        return sc

    yield make

