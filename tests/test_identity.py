"""NodeIdentity: key files on disk, the PeerID hivemind sees, and the PeerID-to-signing-key binding."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import base58
import nacl.signing
import pytest

from dht import (
    IdentityError,
    NodeIdentity,
    SwarmConfig,
    peer_id_from_public_key,
    public_key_from_peer_id,
    start_dht,
)
from dht.identity import P2P_KEY_FILE, SIGNING_KEY_FILE, verify_binding

IdentityFactory = Callable[[str | None], NodeIdentity]

# A well-known RSA PeerID (an IPFS bootstrap node): valid base58, but not an Ed25519 identity multihash.
RSA_PEER_ID = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("file_name", [P2P_KEY_FILE, SIGNING_KEY_FILE])
def test_key_files_are_created_owner_only(tmp_path: Path, file_name: str) -> None:
    """A new identity writes each key file with mode 0600 and leaves no temporary file behind."""
    # Prepare
    folder = tmp_path / "identity"

    # Execute
    NodeIdentity.load_or_create(folder)

    # Assert
    assert _mode(folder / file_name) == 0o600
    assert sorted(p.name for p in folder.iterdir()) == sorted([P2P_KEY_FILE, SIGNING_KEY_FILE])


def test_stale_temporary_file_does_not_loosen_key_mode(tmp_path: Path) -> None:
    """A world-readable ``.tmp`` left by a crash does not make the new key world-readable."""
    # Prepare
    folder = tmp_path / "identity"
    folder.mkdir()
    stale = folder / (P2P_KEY_FILE + ".tmp")
    stale.write_bytes(b"half-written")
    stale.chmod(0o644)

    # Execute
    NodeIdentity.load_or_create(folder)

    # Assert
    assert _mode(folder / P2P_KEY_FILE) == 0o600


def test_reload_gives_same_identity(identity_factory: IdentityFactory) -> None:
    """Loading an identity folder again yields the same PeerID, signing key and binding."""
    # Prepare
    first = identity_factory("alice")

    # Execute
    again = identity_factory("alice")

    # Assert
    assert again.peer_id == first.peer_id
    assert again.signing_public_key == first.signing_public_key
    assert again.binding == first.binding


def test_distinct_folders_give_distinct_identities(identity_factory: IdentityFactory) -> None:
    """Two fresh identity folders never share a PeerID or a signing key."""
    # Prepare / Execute
    alice, bob = identity_factory(None), identity_factory(None)

    # Assert
    assert alice.peer_id != bob.peer_id
    assert alice.signing_public_key != bob.signing_public_key


def test_permissive_key_file_is_loaded_with_a_warning(
    identity_factory: IdentityFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A key file readable by others still loads, and the warning names the chmod that fixes it."""
    # Prepare
    first = identity_factory("alice")
    first.p2p_key_path.chmod(0o644)

    # Execute
    with caplog.at_level(logging.WARNING, logger="dht.identity"):
        again = identity_factory("alice")

    # Assert
    assert again.peer_id == first.peer_id
    assert f"chmod 600 {first.p2p_key_path}" in caplog.text


def test_peer_id_matches_hivemind(identity_factory: IdentityFactory) -> None:
    """A real hivemind DHT started with the identity's p2p.key reports the same PeerID."""
    # Prepare
    identity = identity_factory(None)

    # Execute
    dht = start_dht(SwarmConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"]), identity)
    try:
        reported = dht.peer_id.to_base58()
    finally:
        dht.shutdown()

    # Assert
    assert reported == identity.peer_id


def test_binding_verifies_for_own_keys(identity_factory: IdentityFactory) -> None:
    """The binding proves the PeerID's owner vouched for the identity's signing key."""
    # Prepare
    identity = identity_factory(None)

    # Execute
    ok = verify_binding(identity.peer_id, identity.signing_public_key, identity.binding)

    # Assert
    assert ok


@pytest.mark.parametrize("swap", ["peer_id", "signing_key", "binding", "garbage_binding", "garbage_peer_id"])
def test_binding_fails_for_other_keys(identity_factory: IdentityFactory, swap: str) -> None:
    """A binding checked against another PeerID, another signing key or a bad signature fails."""
    # Prepare
    alice, bob = identity_factory(None), identity_factory(None)
    args = {"peer_id": alice.peer_id, "signing_public_key": alice.signing_public_key, "binding": alice.binding}
    args.update(
        {
            "peer_id": {"peer_id": bob.peer_id},
            "signing_key": {"signing_public_key": bob.signing_public_key},
            "binding": {"binding": bob.binding},
            "garbage_binding": {"binding": b"\x00" * 64},
            "garbage_peer_id": {"peer_id": "not a peer id"},
        }[swap]
    )

    # Execute
    ok = verify_binding(args["peer_id"], args["signing_public_key"], args["binding"])

    # Assert
    assert not ok


def _corrupt_p2p_key(data: bytes) -> bytes:
    # Swap in the public half of another key: right length and header, mismatched halves.
    other = bytes(nacl.signing.SigningKey.generate().verify_key)
    return data[:-32] + other


@pytest.mark.parametrize(
    ("file_name", "corrupt"),
    [
        pytest.param(P2P_KEY_FILE, lambda data: b"", id="p2p-empty"),
        pytest.param(P2P_KEY_FILE, lambda data: data[:-1], id="p2p-truncated"),
        pytest.param(P2P_KEY_FILE, lambda data: b"\x08\x00" + data[2:], id="p2p-rsa-key-type"),
        pytest.param(P2P_KEY_FILE, _corrupt_p2p_key, id="p2p-mismatched-public-half"),
        pytest.param(SIGNING_KEY_FILE, lambda data: data[:31], id="signing-short"),
        pytest.param(SIGNING_KEY_FILE, lambda data: data + b"\x00", id="signing-long"),
    ],
)
def test_corrupt_key_file_raises_and_is_left_untouched(
    identity_factory: IdentityFactory, file_name: str, corrupt: Callable[[bytes], bytes]
) -> None:
    """A corrupt key file raises IdentityError naming the file, and its bytes stay as they were."""
    # Prepare
    path = identity_factory("alice").p2p_key_path.parent / file_name
    corrupted = corrupt(path.read_bytes())
    path.write_bytes(corrupted)

    # Execute
    with pytest.raises(IdentityError, match="corrupt") as info:
        identity_factory("alice")

    # Assert
    assert str(path) in str(info.value)
    assert path.read_bytes() == corrupted


def test_unwritable_folder_raises_identity_error(tmp_path: Path) -> None:
    """An identity folder that cannot be created raises IdentityError that says to choose another path."""
    # Prepare
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")

    # Execute / Assert
    with pytest.raises(IdentityError, match="writable path"):
        NodeIdentity.load_or_create(blocker / "identity")


@pytest.mark.parametrize("seed", [bytes(32), bytes(range(32)), os.urandom(32)], ids=["zero", "ramp", "random"])
def test_peer_id_public_key_roundtrip(seed: bytes) -> None:
    """An Ed25519 public key survives the trip to a PeerID and back, and the PeerID has the 12D3KooW form."""
    # Prepare
    public_key = bytes(nacl.signing.SigningKey(seed).verify_key)

    # Execute
    peer_id = peer_id_from_public_key(public_key)

    # Assert
    assert peer_id.startswith("12D3KooW")
    assert public_key_from_peer_id(peer_id) == public_key


def test_identity_peer_id_holds_its_p2p_public_key(identity_factory: IdentityFactory) -> None:
    """The PeerID inlines the public half of the key stored in p2p.key."""
    # Prepare
    identity = identity_factory(None)

    # Execute
    inlined = public_key_from_peer_id(identity.peer_id)

    # Assert
    assert identity.p2p_key_path.read_bytes().endswith(inlined)


@pytest.mark.parametrize(
    "peer_id",
    [
        pytest.param(RSA_PEER_ID, id="rsa"),
        pytest.param("0OIl-not-base58", id="not-base58"),
        pytest.param("", id="empty"),
        pytest.param(base58.b58encode(b"\x00\x24" + bytes(36)).decode(), id="wrong-key-header"),
        pytest.param(peer_id_from_public_key(bytes(32))[:-2], id="truncated"),
    ],
)
def test_non_ed25519_peer_id_raises(peer_id: str) -> None:
    """A PeerID that is not an Ed25519 identity multihash raises ValueError."""
    # Execute / Assert
    with pytest.raises(ValueError, match="PeerID"):
        public_key_from_peer_id(peer_id)


@pytest.mark.parametrize("length", [0, 31, 33])
def test_public_key_of_wrong_length_raises(length: int) -> None:
    """peer_id_from_public_key refuses anything but a 32-byte key."""
    # Execute / Assert
    with pytest.raises(ValueError, match="32 bytes"):
        peer_id_from_public_key(bytes(length))
