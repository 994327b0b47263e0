"""A node's identity: the libp2p key that gives its PeerID, and a record-signing key bound to it.

Two Ed25519 keys live in the identity folder, each written once with mode 0600:

- ``p2p.key``: the libp2p private key (protobuf ``PrivateKey``) handed to p2pd as hivemind's
  ``identity_path``. An Ed25519 PeerID is the identity multihash of the public key, so anyone
  holding a PeerID holds the public key and can check a signature without a lookup.
- ``signing.key``: the 32-byte seed of the key that signs records and protocol messages.

The binding: the libp2p key signs ``BIND_CONTEXT || signing public key``. A record carries the
signing public key and that binding signature, so a validator checks, from the PeerID alone,
that the PeerID's owner vouched for the key that signed the record. The signing key can be
rotated without a new PeerID.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import base58
import nacl.exceptions
import nacl.signing

logger = logging.getLogger(__name__)

BIND_CONTEXT = b"zen-federation/bind-signing-key/v1"
P2P_KEY_FILE = "p2p.key"
SIGNING_KEY_FILE = "signing.key"

# libp2p crypto.proto: PrivateKey/PublicKey { KeyType Type = 1; bytes Data = 2; }, Ed25519 = 1.
_ED25519_PRIVATE_HEADER = bytes([0x08, 0x01, 0x12, 0x40])  # Data: seed || public key (64 bytes)
_ED25519_PUBLIC_HEADER = bytes([0x08, 0x01, 0x12, 0x20])  # Data: public key (32 bytes)
_IDENTITY_MULTIHASH = bytes([0x00, len(_ED25519_PUBLIC_HEADER) + 32])


class IdentityError(Exception):
    """An identity file is missing, corrupt or unsafe; the message names the file and the fix."""


def peer_id_from_public_key(public_key: bytes) -> str:
    """Return the base58 libp2p PeerID of an Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    return base58.b58encode(_IDENTITY_MULTIHASH + _ED25519_PUBLIC_HEADER + public_key).decode()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Extract the Ed25519 public key inlined in a PeerID.

    Raises:
        ValueError: the PeerID is not base58, or not an Ed25519 identity-multihash PeerID.
    """
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as e:
        raise ValueError(f"PeerID {peer_id[:16]!r} is not base58") from e
    prefix = _IDENTITY_MULTIHASH + _ED25519_PUBLIC_HEADER
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise ValueError(f"PeerID {peer_id[:16]!r} is not an Ed25519 PeerID")
    return raw[len(prefix) :]


def verify_binding(peer_id: str, signing_public_key: bytes, binding: bytes) -> bool:
    """Whether the owner of ``peer_id`` signed ``signing_public_key`` as its record-signing key."""
    try:
        verify_key = nacl.signing.VerifyKey(public_key_from_peer_id(peer_id))
        verify_key.verify(BIND_CONTEXT + signing_public_key, binding)
        return True
    except (ValueError, nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
        return False


@dataclass(frozen=True)
class NodeIdentity:
    """A node's keys, loaded from (or created in) an identity folder."""

    p2p_key_path: Path  # libp2p private key for hivemind's ``identity_path``
    peer_id: str  # base58 PeerID derived from the libp2p key
    signing_key: nacl.signing.SigningKey  # signs records and protocol messages
    binding: bytes  # libp2p-key signature over BIND_CONTEXT || signing public key

    @property
    def signing_public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def x25519_public_key(self) -> bytes:
        """Long-term X25519 key derived from the signing key (for pairwise channels)."""
        return bytes(self.signing_key.to_curve25519_private_key().public_key)

    def sign(self, message: bytes) -> bytes:
        """Return the detached Ed25519 signature of ``message`` by the signing key."""
        return self.signing_key.sign(message).signature

    @classmethod
    def load_or_create(cls, folder: str | os.PathLike[str]) -> NodeIdentity:
        """Load the identity in ``folder``, creating the folder and missing keys on first run.

        Raises:
            IdentityError: a key file is corrupt, or the folder cannot be written.
        """
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise IdentityError(f"cannot create identity folder {folder}: {e.strerror}; choose a writable path") from e
        p2p_seed = _load_or_create_key(folder / P2P_KEY_FILE, _read_p2p_seed, _write_p2p_key)
        signing_seed = _load_or_create_key(folder / SIGNING_KEY_FILE, _read_signing_seed, _write_signing_key)
        p2p_key = nacl.signing.SigningKey(p2p_seed)
        signing_key = nacl.signing.SigningKey(signing_seed)
        binding = p2p_key.sign(BIND_CONTEXT + bytes(signing_key.verify_key)).signature
        peer_id = peer_id_from_public_key(bytes(p2p_key.verify_key))
        return cls(p2p_key_path=folder / P2P_KEY_FILE, peer_id=peer_id, signing_key=signing_key, binding=binding)


def _load_or_create_key(path: Path, read: Callable[[bytes], bytes], write: Callable[[bytes], bytes]) -> bytes:
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            logger.warning(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
        try:
            return read(path.read_bytes())
        except (ValueError, OSError) as e:
            raise IdentityError(
                f"identity file {path} is corrupt ({e}); restore it from a backup, "
                f"or move it away to create a new identity (a new PeerID)"
            ) from None
    seed = os.urandom(32)
    data = write(seed)
    # Write to a temporary file and rename: a crash never leaves a half-written key behind.
    # A stale .tmp from a crash keeps its old mode under O_CREAT; remove it and create afresh (O_EXCL
    # also refuses to follow a planted symlink).
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    logger.info(f"created a new key in {path}")
    return seed


def _read_p2p_seed(data: bytes) -> bytes:
    if len(data) != len(_ED25519_PRIVATE_HEADER) + 64 or not data.startswith(_ED25519_PRIVATE_HEADER):
        raise ValueError("not a libp2p Ed25519 private key")
    body = data[len(_ED25519_PRIVATE_HEADER) :]
    seed, public = body[:32], body[32:]
    if bytes(nacl.signing.SigningKey(seed).verify_key) != public:
        raise ValueError("public half does not match the private key")
    return seed


def _write_p2p_key(seed: bytes) -> bytes:
    return _ED25519_PRIVATE_HEADER + seed + bytes(nacl.signing.SigningKey(seed).verify_key)


def _read_signing_seed(data: bytes) -> bytes:
    if len(data) != 32:
        raise ValueError(f"expected a 32-byte Ed25519 seed, found {len(data)} bytes")
    return data


def _write_signing_key(seed: bytes) -> bytes:
    return seed
