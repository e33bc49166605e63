"""The fleet's signing keys: offline root keys (encrypted, outside the data dir), online keys, approvers' keys.

- **Root keys** (`edgefleet keys init`): Ed25519, a threshold of them (default 2 of 3) signs the root metadata.
  Each private key is PKCS#8 encrypted with a passphrase (`root-N.key`) next to its public key (`root-N.pub`),
  in a directory that must not be inside the coordinator's data directory.
- **Online keys** (`pki_dir/online/{role}.key`, 0600): timestamp, snapshot, targets, the `low` risk role and the
  director — the coordinator signs with them unattended, so they are not encrypted; root can replace them.
- **Approver keys** (`edgefleet keys approver-keygen`): made on the approver's machine, private key encrypted,
  never sent to the coordinator; the public key is added to root by `edgefleet keys add-approver`.

Public keys travel as TUF key dicts (`{"keyid": ..., "key": {"keytype", "scheme", "keyval"}}`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, Key, SSlibKey

from cloud.errors import ConfigurationError, InvalidInputError
from cloud.pki import private_write

__all__ = [
    "ONLINE_ROLES",
    "KeyStamp",
    "generate_encrypted_key",
    "key_to_file",
    "load_encrypted_signer",
    "load_public_key",
    "online_key_stamp",
    "online_signer",
]

ONLINE_ROLES = ("targets", "snapshot", "timestamp", "low", "director")

KeyStamp = tuple[int, int, int]


def _signer(private: Ed25519PrivateKey) -> CryptoSigner:
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def online_signer(pki_dir: Path, role: str) -> CryptoSigner:
    """The online signing key of `role` (created on first use, 0600 in `pki_dir/online/`)."""
    path = _online_path(pki_dir, role)
    if not path.exists():
        private = Ed25519PrivateKey.generate()
        encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
        private_write(path, private.private_bytes(encoding, fmt, serialization.NoEncryption()))
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigurationError(f"{path} is not an Ed25519 private key")
    return _signer(loaded)


def online_key_stamp(pki_dir: Path, role: str) -> KeyStamp | None:
    """Tells one file of `role`'s online key from the next (a rotation replaces it); None while there is none."""
    try:
        stat = _online_path(pki_dir, role).stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _online_path(pki_dir: Path, role: str) -> Path:
    if role not in ONLINE_ROLES:
        raise ValueError(f"{role!r} has no online key")
    return pki_dir / "online" / f"{role}.key"


def key_to_file(key: Key) -> str:
    """A public key as the JSON text of a `.pub` file."""
    return json.dumps({"keyid": key.keyid, "key": key.to_dict()}, indent=2, sort_keys=True) + "\n"


def load_public_key(path: Path) -> SSlibKey:
    """A public key from a `.pub` file; `InvalidInputError` says what is wrong with it."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        claimed = SSlibKey.from_dict(str(data["keyid"]), dict(data["key"]))
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(claimed.keyval["public"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path}: not an Ed25519 public key file of `edgefleet keys` ({exc})") from exc
    key = SSlibKey.from_crypto(public)  # the keyid is the key's own digest, never what the file claims
    if key.keyid != claimed.keyid:
        raise InvalidInputError(f"{path}: the keyid {claimed.keyid[:16]}… is not this key's ({key.keyid[:16]}…)")
    return key


def generate_encrypted_key(private_path: Path, public_path: Path, passphrase: str) -> SSlibKey:
    """A new Ed25519 key: private part encrypted with `passphrase` (0600), public part as a `.pub` file."""
    if len(passphrase) < 8:
        raise InvalidInputError("the passphrase must have at least 8 characters")
    if private_path.exists():
        raise InvalidInputError(f"{private_path} exists already; refusing to overwrite a key")
    private = Ed25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(passphrase.encode())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    private_write(private_path, pem)
    key = SSlibKey.from_crypto(private.public_key())
    public_path.write_text(key_to_file(key))
    return key


def load_encrypted_signer(private_path: Path, passphrase: str) -> CryptoSigner:
    """A signer from an encrypted private key file; `InvalidInputError` for a wrong passphrase."""
    try:
        loaded = serialization.load_pem_private_key(private_path.read_bytes(), password=passphrase.encode())
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"{private_path}: cannot open the key (wrong passphrase?): {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise InvalidInputError(f"{private_path} is not an Ed25519 private key")
    return _signer(loaded)
