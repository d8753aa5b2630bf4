"""TLS 1.3 credentials for QUIC, made from the node's Ed25519 identity key.

There is no certificate authority in p2pd: a peer *is* its Ed25519 key. Each node presents
a self-signed X.509 certificate whose subject public key is its identity key, and each
side checks, once the handshake is done, that the key in the peer's certificate is the one
it expected (the client) or learns it (the server). Chain validation is off on purpose.

Why a self-signed certificate is enough: in TLS 1.3 the certificate only *names* a key;
what proves possession is the CertificateVerify message, a signature with that key over
the handshake transcript (RFC 8446 section 4.4.3). aioquic checks that signature against
the key in the certificate for both directions, so a certificate carrying our identity
key can only be used by the holder of the seed. The certificate's own signature, validity
dates and names prove nothing and are not checked.

The seed is used here and nowhere else in the transport; it is never logged.
"""

from __future__ import annotations

import datetime
import secrets

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from ..identity import Identity

#: RFC 5280 section 4.1.2.5: GeneralizedTime 99991231235959Z means "no expiry".
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)


def identity_private_key(identity: Identity) -> ed25519.Ed25519PrivateKey:
    """The identity's signing key as a ``cryptography`` object (the same Ed25519 key)."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(identity.seed)


def make_certificate(identity: Identity) -> tuple[x509.Certificate, ed25519.Ed25519PrivateKey]:
    """A self-signed certificate for the identity key, and that key.

    The subject names the key's fingerprint only to make captures and logs readable; nobody
    relies on it. The serial is random (RFC 5280 section 4.1.2.2 wants it unique per
    issuer, and every node is its own issuer).
    """
    private_key = identity_private_key(identity)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pd {identity.fingerprint}")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .sign(private_key, algorithm=None)  # Ed25519 signs without a separate hash
    )
    return certificate, private_key


def certificate_public_key(certificate: x509.Certificate | None) -> bytes | None:
    """The raw 32-byte Ed25519 key in ``certificate``; None for any other key or none."""
    if certificate is None:
        return None
    try:
        key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):  # a key type cryptography cannot load
        return None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
