"""Prometheus from Debian's package, scraping the workers' and trainer's
/metrics (``settings.stack.scrape_targets``) with the project's rule files."""

from __future__ import annotations

import contextlib
import http.client
import urllib.request

from core.settings import REPO_ROOT, Settings
from stack.service import Service, require

RULES_GLOB = REPO_ROOT / "deploy" / "prometheus" / "rules" / "*.yml"


def _duration(seconds: float) -> str:
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{int(seconds * 1000)}ms"


def prometheus_config(settings: Settings) -> str:
    """prometheus.yml: job ``fbp`` over the scrape targets, plus any rule files."""
    import yaml

    st = settings.stack
    every = _duration(st.scrape_interval_s)
    cfg = {
        "global": {"scrape_interval": every, "evaluation_interval": every},
        "rule_files": [str(RULES_GLOB)],
        "scrape_configs": [
            {"job_name": "fbp", "static_configs": [{"targets": list(st.scrape_targets)}]},
            {
                "job_name": "prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{st.prometheus_port}"]}],
            },
        ],
    }
    return yaml.safe_dump(cfg, sort_keys=False)


class Prometheus(Service):
    name = "prometheus"
    marker = "prometheus"

    def ports(self) -> list[int]:
        return [self.settings.stack.prometheus_port]

    def _write_config(self):
        yml = self.dir / "prometheus.yml"
        yml.write_text(prometheus_config(self.settings))
        return yml

    def command(self) -> list[str]:
        exe = require("prometheus")
        yml = self._write_config()
        return [
            exe,
            f"--config.file={yml}",
            f"--storage.tsdb.path={self.dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=7d",
            "--log.level=warn",
        ]

    def refresh(self) -> None:
        """Rewrite prometheus.yml and hot-reload it, so targets and rule files
        added since the server started are picked up without a restart."""
        self._write_config()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/-/reload", method="POST")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(req, timeout=5).close()  # noqa: S310 - local URL

    def health(self, timeout_s: float) -> tuple[bool, str]:
        url = f"http://127.0.0.1:{self.port}/-/ready"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - local URL
                return resp.status == 200, f"GET /-/ready {resp.status}"
        except (OSError, http.client.HTTPException) as exc:  # URLError/timeouts are OSErrors
            return False, str(exc)
