"""The Kafka broker's jars (Maven Central ``org.apache.kafka:kafka_2.13``, see
``deploy/kafka/pom.xml``), fetched once with Maven, and the JVM command line
every broker and storage tool runs with."""

from __future__ import annotations

import subprocess
from pathlib import Path

from core.settings import REPO_ROOT, Settings
from fbp_errors import StackError
from stack.service import require

KAFKA_POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"
KAFKA_LOG4J = REPO_ROOT / "deploy" / "kafka" / "log4j.properties"


def ensure_kafka_libs(settings: Settings) -> Path:
    """The broker jars in ``data_dir/kafka-libs`` (fetched on first use; shared by every node)."""
    libs = Path(settings.stack.data_dir) / "kafka-libs"
    if list(libs.glob("kafka_2.13-*.jar")):
        return libs
    mvn = require("mvn")
    libs.mkdir(parents=True, exist_ok=True)
    cmd = [mvn, "-q", "-f", str(KAFKA_POM), "dependency:copy-dependencies",
           f"-DoutputDirectory={libs}", "-DincludeScope=runtime"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not list(libs.glob("kafka_2.13-*.jar")):
        raise StackError(
            f"fetching Kafka jars failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-2000:]}"
        )
    return libs


def java_command(libs: Path, log_dir: Path, heap: str) -> list[str]:
    """``java ... -cp libs/*``: a small, quick-starting JVM for a 2-core box
    (serial GC, C1 only), logging into ``log_dir/server.log``."""
    return [
        require("java"),
        f"-Xmx{heap}",
        f"-Xms{heap}",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{KAFKA_LOG4J}",
        f"-Dkafka.logs.dir={log_dir}",
        "-cp",
        f"{libs}/*",
    ]
