"""TLS material of one run: a throw-away CA and the one certificate every service presents.

The certificate names the run (``RUN_SERVER_NAME``), not hosts: which hosts
Ray places the services on is unknown at launch, so clients check that name
(``grpc.ssl_target_name_override``) against the run's CA, which signs nothing
else and whose key is dropped once the certificate is signed.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from proto.rpc import TlsMaterial

#: Name in the per-run certificate, checked by every client of the run.
RUN_SERVER_NAME = "wafer-emulator.run"
_VALIDITY = datetime.timedelta(days=30)


def generate_run_tls() -> TlsMaterial:
    """A fresh CA (EC P-256) and a server certificate for ``RUN_SERVER_NAME`` and loopback."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wafer-emulator run CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, RUN_SERVER_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(RUN_SERVER_NAME),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return TlsMaterial(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        server_name=RUN_SERVER_NAME,
    )


def read_tls(ca: str, cert: str, key: str, server_name: str | None) -> TlsMaterial:
    """User-provided TLS material from PEM files."""
    return TlsMaterial(
        ca_pem=Path(ca).read_bytes(),
        cert_pem=Path(cert).read_bytes(),
        key_pem=Path(key).read_bytes(),
        server_name=server_name,
    )
