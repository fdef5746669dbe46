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
import re
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ALWAYS_NAMES = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365
MAX_NODES = 10_000  # one key pair per SuperNode; beyond this a typo, not a federation
CN_LIMIT = 64  # X.509's ub-common-name: a longer host stays in the SAN, the CN is shortened
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot be a name in the SuperLink's certificate (None: it can): an IP address, or a DNS
    name of dot-separated labels (letters, digits, inner hyphens; ≤ 63 each, ≤ 253 in all). No ports,
    schemes, wildcards or empty labels."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        return f"--host {host!r} is not a DNS name or an IP address (no port, scheme, wildcard or empty label)"
    return None


def _name(common: str) -> x509.Name:
    common = common[:CN_LIMIT]  # the SAN keeps the whole name
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hetlora"), x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``path`` anew, never through a link (O_NOFOLLOW on a fresh file), with mode 0600 for a private key
    whatever the file had before."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ValueError(f"{path} is a link or not a file: credentials are never written through it")
    path.unlink(missing_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    os.fchmod(fd, mode)  # the umask cannot loosen it
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


def stale_node_keys(directory: Path, nodes: int) -> list[Path]:
    """``node-K`` / ``node-K.pub`` files in ``directory`` with K > ``nodes`` (left by an earlier, larger set)."""
    out = []
    for path in directory.iterdir():
        match = re.fullmatch(r"node-(\d+)(\.pub)?", path.name)
        if match and int(match.group(1)) > nodes:
            out.append(path)
    return sorted(out)


def write_credentials(directory: Path, nodes: int, hosts: Sequence[str] = (), force: bool = False) -> list[Path]:
    """Write the CA, the server certificate and ``nodes`` node key pairs into ``directory``; returns the files."""
    if not 0 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes must be between 0 and {MAX_NODES}, got {nodes}")
    problems = [p for h in hosts if (p := host_problem(h))]
    if problems:
        raise ValueError("; ".join(problems))
    directory = Path(directory)
    if directory.is_symlink():
        raise ValueError(f"{directory} is a link: credentials are written only into a real directory")
    if directory.exists() and any(directory.iterdir()) and not force:
        raise ValueError(f"{directory} is not empty: credentials are never overwritten without --force")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in stale_node_keys(directory, nodes):  # an older, larger set: its keys would still be accepted
        stale.unlink()
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
