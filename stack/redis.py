"""Redis from Debian's ``redis-server``: the single store (service ``redis``)
and, with ``cluster=True``, one node of :mod:`stack.redis_cluster`.

Durability: AOF on (``appendfsync`` from settings).  Opt-in secure mode, from
configuration alone: a password (and ACL user) from ``settings.redis``, and
with a ``rediss://`` URL TLS only, the plain port closed.
"""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings
from fbp_errors import StackError
from stack.service import Service, require
from stack.tls import tls_dir


def secure_redis(settings: Settings) -> bool:
    return settings.redis.url.startswith("rediss://")


class RedisNode(Service):
    marker = "redis-server"
    log_files = ("redis.log",)

    def __init__(self, settings: Settings, *, name: str = "redis", port: int | None = None,
                 cluster: bool = False) -> None:  # fmt: skip
        super().__init__(settings)
        self.name = name
        self.redis_port = settings.stack.redis_port if port is None else port
        self.cluster = cluster
        if cluster and secure_redis(settings):
            raise StackError("the local Redis Cluster runs without TLS: use a redis:// URL with "
                             "--redis-cluster (a password from FBP_REDIS__PASSWORD still applies)")

    def ports(self) -> list[int]:
        # A cluster node also binds its cluster bus on port + 10000.
        return [self.redis_port, self.redis_port + 10000] if self.cluster else [self.redis_port]

    def config(self) -> str:
        st, r = self.settings.stack, self.settings.redis
        d = self.dir
        lines = [
            "bind 127.0.0.1",
            f"port {self.redis_port}",
            "daemonize no",
            f'dir "{d}"',
            f'logfile "{d / "redis.log"}"',
            "appendonly yes",
            f"appendfsync {st.redis_appendfsync}",
            "save 300 100",
            "protected-mode yes",
        ]
        lines += self._auth_lines()
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                f'cluster-config-file "{d / "nodes.conf"}"',
                "cluster-node-timeout 5000",
            ]
        if secure_redis(self.settings):  # TLS only: the plain port is closed
            t = tls_dir(r.ssl_ca_certs, "Redis")
            lines[1] = "port 0"
            lines += [
                f"tls-port {self.redis_port}",
                f'tls-cert-file "{t / "server.pem"}"',
                f'tls-key-file "{t / "server.key"}"',
                f'tls-ca-cert-file "{Path(r.ssl_ca_certs).resolve()}"',
                "tls-auth-clients no",
            ]
        return "\n".join(lines) + "\n"

    def _auth_lines(self) -> list[str]:
        r = self.settings.redis
        if r.password is None:
            return []
        pw = r.password.get_secret_value()
        acl_user = bool(r.username and r.username != "default")
        if acl_user:
            lines = [f"user {r.username} on >{pw} ~* &* +@all",
                     "user default off"]  # only the configured ACL user may connect
        else:
            lines = [f'requirepass "{pw}"']
        if self.cluster:  # replicas authenticate to their masters with the same credentials
            lines += ([f"masteruser {r.username}"] if acl_user else []) + [f'masterauth "{pw}"']
        return lines

    def command(self) -> list[str]:
        exe = require("redis-server")
        conf = self.dir / "redis.conf"
        conf.write_text(self.config())
        conf.chmod(0o600)
        return [exe, str(conf)]

    def client(self, timeout_s: float):
        """A redis-py client on this node (TLS and credentials as configured)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        r = self.settings.redis
        tls: dict = {}
        if secure_redis(self.settings):  # TLS only, verified against the configured CA
            tls = {"ssl": True, "ssl_ca_certs": str(r.ssl_ca_certs) if r.ssl_ca_certs else None}
        return redis.Redis(
            host="127.0.0.1",
            port=self.redis_port,
            username=r.username,
            password=r.password.get_secret_value() if r.password else None,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # a health probe must answer now, not after retries
            **tls,
        )

    def health(self, timeout_s: float) -> tuple[bool, str]:
        import redis

        client = self.client(timeout_s)
        try:
            return bool(client.ping()), "PONG"
        except redis.RedisError as exc:
            return False, str(exc)
        finally:
            client.close()
