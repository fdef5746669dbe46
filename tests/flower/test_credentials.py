"""hetlora credentials: a CA, a server certificate the CA signed for the right names, node keys Flower reads."""

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from typer.testing import CliRunner

from hetlora.cli import app


def test_credentials_are_a_chain_for_the_right_names_with_private_keys_kept_private(tmp_path):
    out = tmp_path / "creds"
    result = CliRunner().invoke(app, ["credentials", str(out), "--nodes", "2", "--host", "superlink.example", "--host", "10.0.0.7"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "node-1", "node-1.pub", "node-2", "node-2.pub", "server.key", "server.pem"]
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.7")}
    key = load_pem_private_key((out / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for name in ("ca.key", "server.key", "node-1", "node-2"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    # node keys: what flower-supernode and `flwr supernode register` load (OpenSSH, unencrypted, a NIST EC curve)
    from flwr.cli.supernode.register import try_load_public_key

    node = load_ssh_private_key((out / "node-1").read_bytes(), None)
    assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
    assert try_load_public_key(out / "node-1.pub")
    assert (out / "node-1.pub").read_bytes() != (out / "node-2.pub").read_bytes()


def test_credentials_are_never_overwritten_without_force(tmp_path):
    (tmp_path / "ca.crt").write_text("mine")
    result = CliRunner().invoke(app, ["credentials", str(tmp_path), "--nodes", "1"])
    assert result.exit_code == 2 and "not empty" in result.output and (tmp_path / "ca.crt").read_text() == "mine"
    bad = CliRunner().invoke(app, ["credentials", str(tmp_path / "x"), "--nodes", "1", "--host", "a b"])
    assert bad.exit_code == 2 and "is not a DNS name" in bad.output and not (tmp_path / "x").exists()


def test_force_leaves_no_loose_key_no_stale_key_and_never_follows_a_link(tmp_path):
    """The attacks of issue 40: an existing ca.key / node-K with mode 0644 stayed 0644 under --force; a link at
    ca.key wrote the CA key outside DIR; an older, larger set's node-3 stayed beside a new set of 2."""
    from hetlora.flower.credentials import write_credentials

    out = tmp_path / "creds"
    write_credentials(out, nodes=3)
    for name in ("ca.key", "node-1"):
        (out / name).chmod(0o644)
    write_credentials(out, nodes=2, force=True)
    for name in ("ca.key", "server.key", "node-1", "node-2"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert not (out / "node-3").exists() and not (out / "node-3.pub").exists()
    outside = tmp_path / "outside.key"
    (out / "ca.key").unlink()
    (out / "ca.key").symlink_to(outside)
    with pytest.raises(ValueError, match="is a link or not a file"):
        write_credentials(out, nodes=2, force=True)
    assert not outside.exists()


@pytest.mark.parametrize("host", ["localhost:8000", "http://x", "*", "a..b", "-a.b", "x" * 64 + ".org", ""])
def test_a_host_that_is_not_a_dns_name_or_an_address_is_refused(tmp_path, host):
    from hetlora.flower.credentials import write_credentials

    with pytest.raises(ValueError, match="is not a DNS name or an IP address"):
        write_credentials(tmp_path / "c", nodes=1, hosts=[host])
    assert not (tmp_path / "c").exists()


def test_a_long_valid_name_keeps_its_san_and_the_node_count_is_capped(tmp_path):
    from hetlora.flower.credentials import MAX_NODES, write_credentials

    fqdn = ".".join(["superlink-node-of-the-federation", "eu-west-rack-17-zone-b", "example-org", "com"])  # 71 characters
    assert len(fqdn) > 64
    write_credentials(tmp_path / "c", nodes=0, hosts=[fqdn])
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert fqdn in sans.get_values_for_type(x509.DNSName)
    with pytest.raises(ValueError, match=f"between 0 and {MAX_NODES}"):
        write_credentials(tmp_path / "d", nodes=MAX_NODES + 1)
