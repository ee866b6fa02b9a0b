"""Generate a local CA and a server certificate for the secure local stack (uses ``openssl``).

    python deploy/security/make_certs.py --out .stack-secure/tls [--host localhost] [--ip 127.0.0.1]

Writes into ``--out`` (mode 0700; keys 0600):

* ``ca.pem`` / ``ca.key``  -- a self-signed CA (10 years).  Clients trust
  ``ca.pem``: ``FBP_KAFKA__SSL_CAFILE`` and ``FBP_REDIS__SSL_CA_CERTS``.
* ``server.pem`` / ``server.key`` -- the broker's and Redis' certificate
  (SAN: the hosts and IPs given, default ``localhost`` and ``127.0.0.1``),
  signed by the CA, followed by the CA certificate; ``server.key`` is an
  unencrypted PKCS#8 PEM key (what Redis' ``tls-key-file`` reads).
* ``server-keystore.pem`` -- for Kafka's ``ssl.keystore.type=PEM``: the key
  encrypted (PKCS#8) with the password in ``server-keystore.pass``, then the
  certificate chain.

``fbp.stack`` in secure mode looks for these files next to the configured CA
file.  Existing files are kept unless ``--force``.  For anything but a local
or test setup, use certificates from your real PKI.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "server-keystore.pem", "server-keystore.pass")


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("openssl not found on PATH (apt-get install -y openssl)")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {proc.stderr.strip()[-800:]}")


def make_certs(out: Path, hosts: list[str] | None = None, ips: list[str] | None = None,
               force: bool = False) -> dict[str, Path]:
    """Create (or keep) the CA and server certificate under ``out``; returns the paths."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    paths = {n: out / n for n in FILES}
    if not force and all(p.is_file() for p in paths.values()):
        return paths
    hosts = hosts or ["localhost"]
    ips = ips or ["127.0.0.1"]
    san = ",".join([f"DNS:{h}" for h in hosts] + [f"IP:{i}" for i in ips])
    old = os.umask(0o077)
    try:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            t = Path(tmp)
            ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "3650",
                     "-subj", "/CN=feedback-predictor local CA",
                     "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=t)
            _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
                     "-subj", f"/CN={hosts[0]}", cwd=t)
            (t / "ext.cnf").write_text(
                f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth,clientAuth\n")
            _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                     "-CAcreateserial", "-out", "server.crt", "-days", "825", "-sha256",
                     "-extfile", "ext.cnf", cwd=t)
            # Kafka's PEM keystore wants an encrypted PKCS#8 key plus ssl.key.password,
            # in a scheme Java's EncryptedPrivateKeyInfo reads (not PBES2).
            pw = secrets.token_urlsafe(24)
            (t / "server-keystore.pass").write_text(pw + "\n")
            _openssl("pkcs8", "-topk8", "-v1", "PBE-SHA1-3DES", "-in", "server.key",
                     "-out", "server.enc.key", "-passout", f"file:{t / 'server-keystore.pass'}", cwd=t)
            ca = (t / "ca.pem").read_bytes()
            crt = (t / "server.crt").read_bytes()
            (t / "server.pem").write_bytes(crt + ca)
            (t / "server-keystore.pem").write_bytes((t / "server.enc.key").read_bytes() + crt + ca)
            for n in FILES:
                os.replace(t / n, paths[n])
                os.chmod(paths[n], 0o644 if n in ("ca.pem", "server.pem") else 0o600)
    finally:
        os.umask(old)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description="Generate a local CA + server certificate (openssl).")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--host", action="append", help="DNS name in the server certificate (repeatable)")
    ap.add_argument("--ip", action="append", help="IP address in the server certificate (repeatable)")
    ap.add_argument("--force", action="store_true", help="replace existing files")
    a = ap.parse_args()
    for name, p in make_certs(a.out, a.host, a.ip, a.force).items():
        print(f"{name:22s} {p}")


if __name__ == "__main__":
    main()
