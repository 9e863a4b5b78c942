"""The hive's self-signed TLS certificate, for workers that listen beyond loopback.

Made once on first use under `$RBEE_HOME/tls/` (key 0600). Nobody trusts it by a
CA: the keeper reads it over the pinned SSH channel (`rbee-hive tls`) and then
accepts exactly this certificate, so the SSH host key pin extends to the workers.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

CERT_NAME, KEY_NAME, NAMES_NAME = "cert.pem", "key.pem", "names"
VALID_DAYS = 3650


@dataclass(frozen=True, slots=True)
class HiveCertificate:
    cert: Path
    key: Path
    pem: str
    fingerprint: str  # "SHA256:<hex>" of the DER certificate

    def to_json(self) -> dict[str, str]:
        return {"certificate": self.pem, "fingerprint": self.fingerprint, "path": str(self.cert)}


def needs_tls(address: str, mode: str = "auto") -> bool:
    """Workers bound to `address` serve HTTPS unless it is loopback (traffic that never leaves the host);
    `mode="on"` asks for HTTPS everywhere."""
    if mode == "on":
        return True
    if address == "localhost":
        return False
    try:
        return not ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True  # a name: it may resolve to a LAN address


def client_verify(directory: Path) -> ssl.SSLContext | bool:
    """What the hive's own HTTP clients verify workers with: its certificate, once there is one."""
    cert = directory / CERT_NAME
    return pinned_context(cert.read_text()) if cert.is_file() else True


def fingerprint(pem: str) -> str:
    """`SHA256:<hex>` of the certificate's DER bytes (what `openssl x509 -fingerprint -sha256` hashes)."""
    return "SHA256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def ensure_certificate(directory: Path, hosts: list[str] | None = None) -> HiveCertificate:
    """The certificate in `directory`, made (with `hosts` as its names) if there is none yet."""
    cert, key, names = directory / CERT_NAME, directory / KEY_NAME, directory / NAMES_NAME
    if not (cert.is_file() and key.is_file()) or (hosts and not _names_all(names, hosts)):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        hosts = hosts or [socket.gethostname()]
        cert_pem, key_pem = make_self_signed(hosts)
        _write(key, key_pem, 0o600)
        _write(cert, cert_pem, 0o644)
        _write(names, "\n".join(hosts).encode(), 0o644)
    pem = cert.read_text()
    return HiveCertificate(cert=cert, key=key, pem=pem, fingerprint=fingerprint(pem))


def make_self_signed(hosts: list[str]) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): EC P-256, the hosts as subject alternative names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"rbee-hive {hosts[0]}"[:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        # key identifiers: a client holding several pins (an old and a new certificate of one hive, with
        # the same name) must find the issuer by key, not by name, or it checks against the wrong one
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _names_all(names: Path, hosts: list[str]) -> bool:
    """Does the certificate name every host (a node moved to another address needs a new one)?

    The names are kept beside it in plain text, so a restart need not import an X.509 parser.
    """
    try:
        have = set(names.read_text().split())
    except OSError:
        return False
    return all(host in have for host in hosts)


def pinned_context(*pems: str) -> ssl.SSLContext:
    """A client context that accepts these certificates and nothing else (names are not checked: the
    pin is the certificate itself, read over SSH). More can be pinned later with `pin(context, pem)`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    for pem in pems:
        pin(context, pem)
    return context


def pin(context: ssl.SSLContext, pem: str) -> None:
    context.load_verify_locations(cadata=pem)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
