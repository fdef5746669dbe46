"""Credentials for a secure deployment, made offline: a CA, the SuperLink's TLS certificate, node keys.

``hetlora credentials DIR --nodes N [--host NAME …]`` writes

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (keep ``ca.key`` offline);
* ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for localhost,
  127.0.0.1, ::1 and every ``--host`` (the SuperExec connects to the SuperLink on localhost, so those
  names are always in it);
* ``node-K`` / ``node-K.pub`` (K = 1..N): each SuperNode's authentication key pair, ECDSA on NIST P-384
  in OpenSSH format, unencrypted (what ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read).

Private keys are written with mode 0600. Everything is made with ``cryptography``; nothing leaves the
machine. The README's deployment section uses these files for TLS and SuperNode authentication.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ALWAYS_NAMES = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hetlora"), x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def certificate_authority(days: int = VALID_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("hetlora CA")).issuer_name(_name("hetlora CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def server_certificate(ca_key, ca_cert: x509.Certificate, hosts: Sequence[str], days: int = VALID_DAYS):
    """The SuperLink's key and certificate, signed by the CA, for ``hosts`` and :data:`ALWAYS_NAMES`."""
    key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys([*ALWAYS_NAMES, *hosts]))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(names[-1] if hosts else "localhost")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def node_key_pair() -> tuple[bytes, bytes]:
    """(private, public) of one SuperNode, OpenSSH format, ECDSA P-384."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_credentials(directory: Path, nodes: int, hosts: Sequence[str] = (), force: bool = False) -> list[Path]:
    """Write the CA, the server certificate and ``nodes`` node key pairs into ``directory``; returns the files."""
    if nodes < 0:
        raise ValueError(f"--nodes must be ≥ 0, got {nodes}")
    for h in hosts:
        if not h or any(c.isspace() for c in h):
            raise ValueError(f"--host {h!r} is not a host name or address")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not force:
        raise ValueError(f"{directory} is not empty: credentials are never overwritten without --force")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = certificate_authority()
    server_key, server_cert = server_certificate(ca_key, ca_cert, hosts)
    files = {"ca.crt": (ca_cert.public_bytes(serialization.Encoding.PEM), False), "ca.key": (_pem_key(ca_key), True),
             "server.pem": (server_cert.public_bytes(serialization.Encoding.PEM), False), "server.key": (_pem_key(server_key), True)}
    for k in range(1, nodes + 1):
        private, public = node_key_pair()
        files[f"node-{k}"] = (private, True)
        files[f"node-{k}.pub"] = (public, False)
    for name, (data, private) in files.items():
        _write(directory / name, data, private)
    return [directory / name for name in files]
