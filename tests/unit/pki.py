"""A throwaway PKI for the connection tests, made with the ``openssl`` command: a CA, a
server certificate for 127.0.0.1 and a client certificate signed by it, and a second CA
nobody trusts."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: ``client_key`` encrypted with ``KEY_PASSWORD``
    client_key_encrypted: Path


KEY_PASSWORD = "key-pass-5ecret"


def available() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make(where: Path) -> Pki:
    where.mkdir(parents=True, exist_ok=True)
    (where / "x509.cnf").write_text(_CONFIG)

    def key(name: str) -> None:
        _openssl(
            "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", f"{name}.key", cwd=where,
        )  # fmt: skip

    def ca(name: str, cn: str) -> None:
        key(name)
        _openssl(
            "req", "-x509", "-new", "-key", f"{name}.key", "-config", "x509.cnf",
            "-extensions", "ca", "-subj", f"/CN={cn}", "-days", "30", "-out", f"{name}.pem",
            cwd=where,
        )  # fmt: skip

    def cert(name: str, cn: str, issuer: str, ext: str) -> None:
        key(name)
        _openssl(
            "req", "-new", "-key", f"{name}.key", "-config", "x509.cnf", "-subj", f"/CN={cn}",
            "-out", f"{name}.csr", cwd=where,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.pem", "-CAkey",
            f"{issuer}.key", "-CAcreateserial", "-days", "30", "-extfile", "x509.cnf",
            "-extensions", ext, "-out", f"{name}.pem", cwd=where,
        )  # fmt: skip

    ca("ca", "test CA")
    ca("other-ca", "untrusted test CA")
    cert("server", "broker", "ca", "server")
    cert("client", "pipeline", "ca", "client")
    _openssl(
        "pkcs8", "-topk8", "-v2", "aes256", "-in", "client.key", "-out", "client-enc.key",
        "-passout", f"pass:{KEY_PASSWORD}", cwd=where,
    )  # fmt: skip
    return Pki(
        ca=where / "ca.pem",
        other_ca=where / "other-ca.pem",
        server_cert=where / "server.pem",
        server_key=where / "server.key",
        client_cert=where / "client.pem",
        client_key=where / "client.key",
        client_key_encrypted=where / "client-enc.key",
    )
