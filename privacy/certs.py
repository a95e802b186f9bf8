"""Transport and identity material, made with `cryptography`: the coordinator's CA and TLS certificate, and
each site's ECDSA key pair for Flower's SuperNode authentication.

    m3fm-server certs --out DIR --host NAME_OR_IP   ->  ca.crt, ca.key, server.pem, server.key
    m3fm-client keys --out DIR                       ->  site.key (private), site.pub (OpenSSH public)
    m3fm-server enroll site.pub --name SITE          ->  the key in the server database

The server certificate names every address sites dial in its SubjectAltName
(IP addresses as IP entries, names as DNS entries): TLS checks the name, not
the common name. Site keys are NIST P-384 in OpenSSH format, which is what
`flower-supernode --auth-supernode-private-key` loads and `flwr supernode
register` accepts. Nothing here overwrites an existing file: a CA key that is
replaced silently invalidates every site's trust.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class KeyMaterialError(ValueError):
    pass


def _refuse_existing(paths: list[Path]) -> None:
    if taken := [str(p) for p in paths if p.exists()]:
        raise KeyMaterialError(f"refusing to overwrite {', '.join(taken)}; choose another --out or move them away")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "m3fm-fed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(out: Path, hosts: list[str], days: int = 825) -> dict[str, Path]:
    """A CA and a server certificate it signs for `hosts`; -> the four file paths."""
    if not hosts:
        raise KeyMaterialError("give at least one --host: the name or IP address sites dial")
    out = Path(out)
    paths = {k: out / k for k in ("ca.crt", "ca.key", "server.pem", "server.key")}
    _refuse_existing(list(paths.values()))
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("m3fm-fed coordinator CA"))
               .issuer_name(_name("m3fm-fed coordinator CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    pkcs8 = dict(encoding=pem, format=serialization.PrivateFormat.PKCS8,
                 encryption_algorithm=serialization.NoEncryption())
    _write(paths["ca.key"], ca_key.private_bytes(**pkcs8), private=True)
    _write(paths["ca.crt"], ca_cert.public_bytes(pem))
    _write(paths["server.key"], key.private_bytes(**pkcs8), private=True)
    _write(paths["server.pem"], cert.public_bytes(pem))
    return paths


def make_site_keys(out: Path, name: str = "site") -> tuple[Path, Path]:
    """A P-384 key pair in OpenSSH format: (private key, public key)."""
    out = Path(out)
    private, public = out / f"{name}.key", out / f"{name}.pub"
    _refuse_existing([private, public])
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public


def read_site_public_key(path: Path) -> tuple[str, str]:
    """An enrolled site's public key file -> (the key in OpenSSH text, its SHA-256 fingerprint); a clear error
    naming the file when it is not an elliptic-curve OpenSSH public key."""
    path = Path(path)
    if not path.is_file():
        raise KeyMaterialError(f"{path}: not found (a site makes it with `m3fm-client keys --out DIR`)")
    data = path.read_bytes().strip()
    try:
        key = load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyMaterialError(f"{path}: not an OpenSSH public key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyMaterialError(f"{path}: a {type(key).__name__}; Flower's node authentication needs an "
                               "elliptic-curve (ECDSA) key, as `m3fm-client keys` writes")
    text = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return text, hashlib.sha256(text.encode()).hexdigest()


def check_root_certificate(path: Path) -> None:
    """The CA file a SuperNode trusts: PEM with at least one X.509 certificate, none expired or not yet valid.
    A clear error naming the file otherwise (Flower would fail later, inside the SuperNode, without naming it)."""
    path = Path(path)
    data = _read_key_material(path, "the coordinator's ca.crt")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise KeyMaterialError(f"{path}: not a PEM certificate file ({_truncated_hint(data)}; "
                               f"{str(e).split('details.')[-1].strip()})") from None
    now = dt.datetime.now(dt.timezone.utc)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise KeyMaterialError(f"{path}: the certificate {cert.subject.rfc4514_string()} expired on "
                                   f"{cert.not_valid_after_utc:%Y-%m-%d}; ask the coordinator for a new ca.crt")
        if cert.not_valid_before_utc > now:
            raise KeyMaterialError(f"{path}: the certificate {cert.subject.rfc4514_string()} is not valid before "
                                   f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)")


def check_site_private_key(path: Path) -> None:
    """The site's node-authentication key: an OpenSSH elliptic-curve private key, as `m3fm-client keys` writes."""
    path = Path(path)
    data = _read_key_material(path, "this site's private key from `m3fm-client keys`")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyMaterialError(f"{path}: not an unencrypted OpenSSH private key ({_truncated_hint(data)}; {e}); "
                               "make one with `m3fm-client keys --out DIR`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(f"{path}: a {type(key).__name__}; Flower's node authentication needs an "
                               "elliptic-curve (ECDSA) key, as `m3fm-client keys` writes")


def _read_key_material(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise KeyMaterialError(f"{path}: not found ({what})")
    data = path.read_bytes()
    if not data.strip():
        raise KeyMaterialError(f"{path}: empty ({what})")
    return data


def _truncated_hint(data: bytes) -> str:
    text = data.decode("ascii", errors="replace")
    if "-----BEGIN" in text and "-----END" not in text:
        return "it begins a PEM block that never ends: truncated?"
    if "PRIVATE KEY-----" in text and "CERTIFICATE-----" not in text:
        return "it holds a private key"
    if "CERTIFICATE-----" in text and "PRIVATE KEY-----" not in text:
        return "it holds a certificate"
    if "-----BEGIN" not in text:
        return "no '-----BEGIN' line" + (": binary data" if b"\0" in data or "\ufffd" in text else "")
    return "a PEM block that does not parse"
