"""Kafka's opt-in secure mode, built in this one place for every broker.

From configuration alone: when ``settings.kafka.security_protocol`` is not
PLAINTEXT, each local broker's client listener speaks that protocol (TLS and/or
SASL with the configured mechanism), the JAAS line carries the configured
credentials, and SCRAM credentials of ``sasl_username``/``sasl_password`` are
created when the storage is formatted.  The KRaft controller listener stays
PLAINTEXT on 127.0.0.1.  With the defaults (PLAINTEXT) nothing here applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.settings import Settings
from fbp_errors import StackError
from stack.tls import tls_dir

_CRED_FORBIDDEN = set('"\\,=[]\n\r ')


def secure(settings: Settings) -> bool:
    return settings.kafka.security_protocol != "PLAINTEXT"


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """kafka-python security options for our own probes ({} for PLAINTEXT)."""
    if not secure(settings):
        return {}
    kw = settings.kafka.kafka_python_kwargs()
    kw.pop("bootstrap_servers", None)
    return kw


def _check_credential(value: str, what: str) -> str:
    if not value or _CRED_FORBIDDEN & set(value):
        raise StackError(f"{what} must be non-empty without quotes, backslashes, spaces, ',', '=', '[' or ']' "
                         "(it is written into the broker's JAAS and SCRAM configuration)")
    return value


def sasl_credentials(settings: Settings) -> tuple[str, str] | None:
    k = settings.kafka
    if not k.sasl_mechanism:
        return None
    if not k.sasl_username or k.sasl_password is None:
        raise StackError("a SASL protocol needs FBP_KAFKA__SASL_USERNAME and FBP_KAFKA__SASL_PASSWORD")
    return (_check_credential(k.sasl_username, "sasl_username"),
            _check_credential(k.sasl_password.get_secret_value(), "sasl_password"))


def _tls_properties(settings: Settings) -> dict[str, str]:
    k = settings.kafka
    d = tls_dir(k.ssl_cafile, "Kafka")
    return {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(d / "server-keystore.pem"),
        "ssl.key.password": (d / "server-keystore.pass").read_text().strip(),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(Path(k.ssl_cafile).resolve()),
        "ssl.client.auth": "required" if k.ssl_certfile else "none",
        "ssl.endpoint.identification.algorithm": "https",
    }


def _jaas_properties(settings: Settings) -> dict[str, str]:
    creds = sasl_credentials(settings)
    if creds is None:
        return {}
    user, pw = creds
    mech = settings.kafka.sasl_mechanism or ""
    if mech == "PLAIN":
        module = (f'org.apache.kafka.common.security.plain.PlainLoginModule required '
                  f'username="{user}" password="{pw}" user_{user}="{pw}";')
    else:
        module = f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{user}" password="{pw}";'
    return {
        "sasl.enabled.mechanisms": mech,
        "sasl.mechanism.inter.broker.protocol": mech,
        f"listener.name.secure.{mech.lower()}.sasl.jaas.config": module,
    }


def listener_properties(settings: Settings, port: int, controller_port: int) -> dict[str, str]:
    """server.properties entries of one broker's secure client listener ({} for PLAINTEXT)."""
    if not secure(settings):
        return {}
    proto = settings.kafka.security_protocol
    props = {
        "listeners": f"SECURE://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"SECURE://127.0.0.1:{port}",
        "inter.broker.listener.name": "SECURE",
        "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,SECURE:{proto}",
    }
    if proto in ("SSL", "SASL_SSL"):
        props.update(_tls_properties(settings))
    if proto.startswith("SASL"):
        props.update(_jaas_properties(settings))
    return props


def scram_format_args(settings: Settings) -> list[str]:
    """``--add-scram`` for the storage format: the SCRAM user exists from the first start."""
    k = settings.kafka
    if not (secure(settings) and k.security_protocol.startswith("SASL")
            and (k.sasl_mechanism or "").startswith("SCRAM")):
        return []
    user, pw = sasl_credentials(settings) or ("", "")
    return ["--add-scram", f"{k.sasl_mechanism}=[name={user},password={pw}]"]
