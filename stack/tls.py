"""Where secure mode finds the server certificate and key: next to the
configured CA file, as written by ``deploy/security/make_certs.py``."""

from __future__ import annotations

from pathlib import Path

from fbp_errors import StackError

TLS_FILES = ("ca.pem", "server.pem", "server.key", "server-keystore.pem", "server-keystore.pass")


def tls_dir(ca_file: Path | None, what: str) -> Path:
    """The directory holding :data:`TLS_FILES`, or a StackError that says how to make them."""
    if ca_file is None:
        raise StackError(f"secure mode for {what} needs the CA file setting (FBP_KAFKA__SSL_CAFILE / "
                         "FBP_REDIS__SSL_CA_CERTS); create one with deploy/security/make_certs.py --out DIR")
    d = Path(ca_file).resolve().parent
    missing = [n for n in TLS_FILES if not (d / n).is_file()]
    if missing:
        raise StackError(f"secure mode for {what}: {', '.join(missing)} missing in {d}; "
                         f"run: python deploy/security/make_certs.py --out {d}")
    return d
