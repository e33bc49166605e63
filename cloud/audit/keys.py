"""The coordinator's audit key: Ed25519, in the fleet PKI directory (`audit.key`, 0600), made on first use.

It signs checkpoints of the audit chain and nothing else. Whoever holds it can sign a rewritten chain, so it
lives with the fleet CA's key, outside the database: tampering through the database alone (a database
administrator, a restored dump, an injected statement) cannot forge a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.audit.chain import SignedHead, checkpoint_message, keyid_of
from cloud.errors import ConfigurationError
from cloud.pki import private_write
from protocol.messages import utcnow

__all__ = ["AUDIT_KEY_FILE", "load_audit_key", "sign_head"]

AUDIT_KEY_FILE = "audit.key"


def load_audit_key(pki_dir: Path) -> Ed25519PrivateKey:
    """The audit key in `pki_dir/audit.key`, generated (0600) if absent; `ConfigurationError` if unusable."""
    path = pki_dir / AUDIT_KEY_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        private_write(path, pem)
        return key
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"cannot read the audit key {path}: {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigurationError(
            f"{path} is not an Ed25519 private key; restore the fleet's audit key there "
            "(a new key would not verify the checkpoints signed so far)"
        )
    return loaded


def sign_head(key: Ed25519PrivateKey, *, seq: int, head_hash: str) -> SignedHead:
    """A checkpoint of the chain's head: the key's signature of `f"{seq}:{hash}"`, now."""
    signature = key.sign(checkpoint_message(seq, head_hash)).hex()
    return SignedHead(seq=seq, hash=head_hash, keyid=keyid_of(key.public_key()), signature=signature, at=utcnow())
