"""A producer and a subscriber that are not Python: Debian's kcat publishes a
rating and reads its prediction back, through a real worker."""

from __future__ import annotations

import shutil
import subprocess
import time

import orjson
import pytest

from stack import procs

pytestmark = pytest.mark.integration


def _env(ns, ckpt, port: int) -> dict[str, str]:
    env = ns.env(64, port)
    env["FBP_WORKER__CHECKPOINT"] = str(ckpt)
    return env


def test_rating_from_kcat_gets_a_prediction_read_by_kcat(stack, ns, ckpt, tmp_path):
    kcat = shutil.which("kcat")
    assert kcat, "kcat is not installed (apt-get install kcat)"
    broker = stack.kafka.bootstrap_servers
    worker = procs.start_worker(6093, tmp_path, _env(ns, ckpt, 6093))
    try:
        ev = {"event_id": "kcat-1", "user_id": 4242, "movie_id": 50, "rating": 4.5, "ts": 890000000}
        line = b"4242|" + orjson.dumps(ev) + b"\n"
        subprocess.run([kcat, "-P", "-b", broker, "-t", ns.ratings, "-K", "|"], input=line,
                       check=True, timeout=60)
        read = [kcat, "-C", "-b", broker, "-t", ns.predictions, "-o", "beginning",
                "-c", "1", "-e", "-f", "%k|%s\n"]
        # -e stops at the end of the partitions: poll until the record is there
        for _ in range(120):
            out = subprocess.run(read, capture_output=True, check=True, timeout=120)
            if out.stdout.strip():
                break
            time.sleep(0.5)
        key, _, value = out.stdout.strip().partition(b"|")
        rec = orjson.loads(value)
    finally:
        worker.stop()
    assert key == b"4242"
    assert rec["event_id"] == "kcat-1" and rec["actual"] == 4.5
    assert 1.0 <= rec["predicted"] <= 5.0 and rec["model_version"] == 1
