"""PeerRecord signing and decoding, and PeerRecordValidator on hand-built hivemind DHTRecords.

Every attack is built from real keys: a record that names one peer but is signed, bound or
tampered by another. The validator must reject each with RecordError from ``check`` and False
from ``validate``, and let hivemind's own records under unrelated keys through.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from dht import (
    MAX_TTL,
    SKETCH_DIM,
    Capacity,
    NodeIdentity,
    PeerRecord,
    PeerRecordValidator,
    RecordError,
    encode_sketch,
    peers_key,
)
from dht.records import MAX_RECORD_BYTES, RECORD_TAG
from dht.validator import MAX_CLOCK_SKEW

IdentityFactory = Callable[[str | None], NodeIdentity]
RecordFactory = Callable[..., PeerRecord]
RUN = "unit-run"
STRICT_KEY = DHTID.generate(source=peers_key(RUN)).to_bytes()
OTHER_KEY = DHTID.generate(source="some.hivemind.key").to_bytes()


def _wire(record: PeerRecord) -> dict[str, Any]:
    """The msgpack map a record's body encodes (what ``sign`` packs)."""
    return dataclasses.asdict(record)


def _envelope(body_map: Any, signer: NodeIdentity, tag: str = RECORD_TAG) -> bytes:
    """Pack ``body_map`` and sign it with ``signer``'s signing key, bypassing ``PeerRecord.sign``'s checks."""
    body = msgpack.packb(body_map, use_bin_type=True)
    return msgpack.packb([tag, body, signer.sign(tag.encode() + body)], use_bin_type=True)


def _dht_record(
    envelope: bytes, subkey: object, expiration_time: float, key: bytes = STRICT_KEY, value: bytes | None = None
) -> DHTRecord:
    """A DHTRecord as hivemind hands it to validators: msgpack subkey and value, DHTID key bytes."""
    value = MSGPackSerializer.dumps(envelope) if value is None else value
    return DHTRecord(key=key, subkey=MSGPackSerializer.dumps(subkey), value=value, expiration_time=expiration_time)


@pytest.fixture
def alice(identity_factory: IdentityFactory) -> NodeIdentity:
    return identity_factory("alice")


@pytest.fixture
def bob(identity_factory: IdentityFactory) -> NodeIdentity:
    return identity_factory("bob")


# --- PeerRecord: sign / verify ---------------------------------------------------------------------------


def test_sign_verify_roundtrip(alice: NodeIdentity, record_factory: RecordFactory) -> None:
    """A record signed by the identity it names decodes to an equal record."""
    # Prepare
    record = record_factory(alice, maddrs=("/ip4/127.0.0.1/tcp/1",), run_config=b"\x80", state_digest=bytes(16))

    # Execute
    decoded = PeerRecord.verify(record.sign(alice))

    # Assert
    assert decoded == record
    assert decoded.sketch_vector() == pytest.approx([i / SKETCH_DIM for i in range(SKETCH_DIM)])


def test_sign_refuses_another_identity(alice: NodeIdentity, bob: NodeIdentity, record_factory: RecordFactory) -> None:
    """A record naming alice cannot be signed with bob's identity."""
    # Prepare
    record = record_factory(alice)

    # Execute / Assert
    with pytest.raises(RecordError, match="signed by the identity it names"):
        record.sign(bob)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"roles": ("miner",)}, id="unknown-role"),
        pytest.param({"roles": ()}, id="no-role"),
        pytest.param({"roles": ("trainer", "trainer")}, id="duplicate-role"),
        pytest.param({"capacity": Capacity(device_kind="tpu")}, id="bad-device-kind"),
        pytest.param({"capacity": Capacity(memory_bytes=-1)}, id="negative-memory"),
        pytest.param({"round": -1}, id="negative-round"),
        pytest.param({"round": 2**64}, id="round-over-64-bits"),
        pytest.param({"capacity": Capacity(memory_bytes=2**1100)}, id="memory-over-64-bits"),
        pytest.param({"sketch": bytes(4 * SKETCH_DIM - 4)}, id="short-sketch"),
        pytest.param({"state_digest": bytes(8)}, id="bad-digest-length"),
        pytest.param({"timestamp": float("inf")}, id="infinite-timestamp"),
        pytest.param({"run_config": bytes(8 * 1024 + 1)}, id="run-config-too-big"),
        pytest.param({"maddrs": ("/ip4/127.0.0.1/tcp/1",) * 17}, id="too-many-maddrs"),
        pytest.param({"maddrs": ("/" + "x" * 5000,)}, id="maddr-too-long"),
        pytest.param({"capacity": Capacity(device_name="x" * 5000)}, id="device-name-too-long"),
    ],
)
def test_sign_refuses_out_of_range_fields(
    alice: NodeIdentity, record_factory: RecordFactory, overrides: dict[str, Any]
) -> None:
    """Signing checks the same ranges as verification, so a node never publishes what peers would drop."""
    # Prepare
    record = record_factory(alice, **overrides)

    # Execute / Assert
    with pytest.raises(RecordError):
        record.sign(alice)


def test_sign_refuses_oversized_record(alice: NodeIdentity, record_factory: RecordFactory) -> None:
    """A record whose envelope would exceed 64 KiB is refused at signing."""
    # Prepare
    record = record_factory(alice, maddrs=("/" + "x" * 4095,) * 16)

    # Execute / Assert
    with pytest.raises(RecordError, match="byte limit"):
        record.sign(alice)


@pytest.mark.parametrize("length", [0, SKETCH_DIM - 1, SKETCH_DIM + 1])
def test_encode_sketch_refuses_wrong_length(length: int) -> None:
    """encode_sketch takes exactly SKETCH_DIM values."""
    # Execute / Assert
    with pytest.raises(ValueError, match=f"{SKETCH_DIM} values"):
        encode_sketch([0.0] * length)


# --- PeerRecordValidator: accepted records ---------------------------------------------------------------


def test_valid_record_is_accepted(alice: NodeIdentity, record_factory: RecordFactory) -> None:
    """A signed record under the run's key, subkey = its PeerID and a short expiry, passes both entry points."""
    # Prepare
    record = record_factory(alice)
    dht_record = _dht_record(record.sign(alice), alice.peer_id, record.timestamp + MAX_TTL / 2)
    validator = PeerRecordValidator([RUN])

    # Execute
    checked = validator.check(dht_record, now=record.timestamp)
    ok = validator.validate(dht_record)

    # Assert
    assert checked == record
    assert ok
    assert validator.rejected == 0


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(MSGPackSerializer.dumps({"endpoint": "x", "size": 3}), id="dict"),
        pytest.param(MSGPackSerializer.dumps(b"\x00" * (MAX_RECORD_BYTES + 1)), id="big-bytes"),
        pytest.param(MSGPackSerializer.dumps(12345), id="int"),
        pytest.param(b"\xc1 not msgpack at all", id="not-msgpack"),
    ],
)
@pytest.mark.parametrize(
    "subkey", [DHTProtocol.IS_REGULAR_VALUE, MSGPackSerializer.dumps("peer")], ids=["regular", "subkey"]
)
def test_unrelated_untagged_records_pass(value: bytes, subkey: bytes) -> None:
    """Records under keys we do not own and without our tag (hivemind's own) pass validate untouched."""
    # Prepare
    validator = PeerRecordValidator([RUN])
    record = DHTRecord(key=OTHER_KEY, subkey=subkey, value=value, expiration_time=get_dht_time() + 3600)

    # Execute
    ok = validator.validate(record)

    # Assert
    assert ok
    assert validator.rejected == 0


def test_record_under_unknown_run_is_checked_by_tag(alice: NodeIdentity, record_factory: RecordFactory) -> None:
    """A validator that does not know the run still accepts a valid tagged record under its key."""
    # Prepare
    record = record_factory(alice)
    other_run_key = DHTID.generate(source=peers_key("another-run")).to_bytes()
    dht_record = _dht_record(record.sign(alice), alice.peer_id, record.timestamp + 10, key=other_run_key)

    # Execute
    ok = PeerRecordValidator([RUN]).validate(dht_record)

    # Assert
    assert ok


def test_merged_validators_are_strict_for_both_runs() -> None:
    """merge_with unions the strict keys, so a merged validator refuses junk under either run's key."""
    # Prepare
    validator = PeerRecordValidator(["run-a"])
    junk = MSGPackSerializer.dumps(b"junk")
    key_b = DHTID.generate(source=peers_key("run-b")).to_bytes()

    # Execute
    merged = validator.merge_with(PeerRecordValidator(["run-b"]))

    # Assert
    assert merged
    assert not validator.validate(DHTRecord(key_b, MSGPackSerializer.dumps("p"), junk, get_dht_time() + 10))


# --- PeerRecordValidator: rejected records ---------------------------------------------------------------


def _forged_signature(alice: NodeIdentity, bob: NodeIdentity, record: PeerRecord) -> bytes:
    # Names alice and carries her key and binding, but bob signed the body.
    return _envelope(_wire(record), bob)


def _tampered_body(alice: NodeIdentity, bob: NodeIdentity, record: PeerRecord) -> bytes:
    # Flip the lowest mantissa byte of the first sketch value: the body still parses, the signature breaks.
    tag, body, signature = msgpack.unpackb(record.sign(alice), raw=False)
    at = body.index(record.sketch)
    tampered = body[:at] + bytes([body[at] ^ 0x01]) + body[at + 1 :]
    return msgpack.packb([tag, tampered, signature], use_bin_type=True)


def _tampered_signature(alice: NodeIdentity, bob: NodeIdentity, record: PeerRecord) -> bytes:
    tag, body, signature = msgpack.unpackb(record.sign(alice), raw=False)
    return msgpack.packb([tag, body, bytes([signature[0] ^ 0x80]) + signature[1:]], use_bin_type=True)


def _unbound_signing_key(alice: NodeIdentity, bob: NodeIdentity, record: PeerRecord) -> bytes:
    # Names alice, but carries bob's signing key and bob's binding, and bob signs: bob impersonates alice.
    wire = _wire(dataclasses.replace(record, signing_key=bob.signing_public_key, binding=bob.binding))
    return _envelope(wire, bob)


def _borrowed_binding(alice: NodeIdentity, bob: NodeIdentity, record: PeerRecord) -> bytes:
    # Names alice with alice's binding, but bob's signing key (which alice never vouched for).
    return _envelope(_wire(dataclasses.replace(record, signing_key=bob.signing_public_key)), bob)


def _wrong_tag(alice: NodeIdentity, bob: NodeIdentity, record: PeerRecord) -> bytes:
    return _envelope(_wire(record), alice, tag="zen/peer-record/v0")


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        pytest.param(_forged_signature, "signature does not verify", id="forged-signature"),
        pytest.param(_tampered_body, "signature does not verify", id="tampered-body"),
        pytest.param(_tampered_signature, "signature does not verify", id="tampered-signature"),
        pytest.param(_unbound_signing_key, "not bound", id="unbound-signing-key"),
        pytest.param(_borrowed_binding, "not bound", id="borrowed-binding"),
        pytest.param(_wrong_tag, "envelope", id="wrong-tag"),
    ],
)
def test_forged_records_are_rejected(
    alice: NodeIdentity,
    bob: NodeIdentity,
    record_factory: RecordFactory,
    attack: Callable[[NodeIdentity, NodeIdentity, PeerRecord], bytes],
    reason: str,
) -> None:
    """A record that names alice but that alice's keys did not sign is rejected, with the reason."""
    # Prepare
    record = record_factory(alice)
    dht_record = _dht_record(attack(alice, bob, record), alice.peer_id, record.timestamp + 10)
    validator = PeerRecordValidator([RUN])

    # Execute
    with pytest.raises(RecordError, match=reason):
        validator.check(dht_record, now=record.timestamp)
    ok = validator.validate(dht_record)

    # Assert
    assert not ok
    assert validator.rejected == 1


def _with_body(mutate: Callable[[dict[str, Any]], None]) -> Callable[[NodeIdentity, PeerRecord], bytes]:
    def build(identity: NodeIdentity, record: PeerRecord) -> bytes:
        wire = _wire(record)
        mutate(wire)
        return _envelope(wire, identity)  # properly signed: only the schema is wrong

    return build


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(wire: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        target = wire
        for name in parents:
            target = target[name]
        target[leaf] = value

    return mutate


def _delete(name: str) -> Callable[[dict[str, Any]], None]:
    def mutate(wire: dict[str, Any]) -> None:
        del wire[name]

    return mutate


NAN_SKETCH = struct.pack(f"<{SKETCH_DIM}f", float("nan"), *([0.0] * (SKETCH_DIM - 1)))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(_with_body(_delete("round")), id="missing-field"),
        pytest.param(_with_body(_delete("run_config")), id="missing-optional-field"),
        pytest.param(_with_body(_set("extra", 1)), id="extra-field"),
        pytest.param(_with_body(_set("capacity.extra", 1)), id="extra-capacity-field"),
        pytest.param(_with_body(_set("round", "1")), id="str-where-int"),
        pytest.param(_with_body(_set("round", True)), id="bool-where-int"),
        pytest.param(_with_body(_set("capacity.memory_bytes", False)), id="bool-where-int-capacity"),
        pytest.param(_with_body(_set("round", 1.5)), id="float-where-int"),
        pytest.param(_with_body(_set("timestamp", "now")), id="str-where-float"),
        pytest.param(_with_body(_set("capacity", [])), id="list-where-map"),
        pytest.param(_with_body(_set("roles", "trainer")), id="str-where-list"),
        pytest.param(_with_body(_set("roles", [1])), id="int-role"),
        pytest.param(_with_body(_set("roles", ["trainer", "admin"])), id="unknown-role"),
        pytest.param(_with_body(_set("capacity.device_kind", "tpu")), id="bad-device-kind"),
        pytest.param(_with_body(_set("capacity.samples_per_second", float("nan"))), id="nan-throughput"),
        pytest.param(_with_body(_set("sketch", NAN_SKETCH)), id="nan-in-sketch"),
        pytest.param(_with_body(_set("sketch", bytes(4 * SKETCH_DIM + 4))), id="long-sketch"),
        pytest.param(_with_body(_set("sketch", bytes(4 * SKETCH_DIM - 4))), id="short-sketch"),
        pytest.param(_with_body(_set("x25519_key", bytes(31))), id="short-x25519-key"),
        pytest.param(_with_body(_set("peer_id", "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN")), id="rsa-peer-id"),
        pytest.param(_with_body(_set("timestamp", float("nan"))), id="nan-timestamp"),
    ],
)
def test_schema_violations_are_rejected(
    alice: NodeIdentity, record_factory: RecordFactory, build: Callable[[NodeIdentity, PeerRecord], bytes]
) -> None:
    """A correctly signed body that breaks the schema is rejected before anything trusts it."""
    # Prepare
    record = record_factory(alice)
    dht_record = _dht_record(build(alice, record), alice.peer_id, record.timestamp + 10)
    validator = PeerRecordValidator([RUN])

    # Execute
    with pytest.raises(RecordError):
        validator.check(dht_record, now=record.timestamp)
    ok = validator.validate(dht_record)

    # Assert
    assert not ok
    assert validator.rejected == 1


@pytest.mark.parametrize(
    ("subkey", "expiry", "signed_at", "reason"),
    [
        pytest.param("bob", 10.0, 0.0, "subkey does not match", id="subkey-is-another-peer"),
        pytest.param(None, 10.0, 0.0, "subkey does not match", id="no-subkey"),
        pytest.param("alice", -1.0, 0.0, "expired", id="expired"),
        pytest.param("alice", MAX_TTL + 5.0, 0.0, "cap", id="expiry-beyond-cap"),
        pytest.param("alice", 365 * 86400.0, 0.0, "cap", id="expiry-a-year-out"),
        pytest.param("alice", 3600.0 + 10.0, 3600.0, "in the future", id="signed-an-hour-ahead"),
        pytest.param("alice", MAX_CLOCK_SKEW + 20.0, MAX_CLOCK_SKEW + 10.0, "in the future", id="skew-over-limit"),
        pytest.param("alice", 10.0, -MAX_TTL - 5.0, "cap", id="signed-too-long-ago"),
    ],
)
def test_misplaced_or_badly_timed_records_are_rejected(
    alice: NodeIdentity,
    bob: NodeIdentity,
    record_factory: RecordFactory,
    subkey: str | None,
    expiry: float,
    signed_at: float,
    reason: str,
) -> None:
    """A valid signature does not save a record stored under another PeerID or with a bad lifetime."""
    # Prepare
    now = get_dht_time()
    envelope = record_factory(alice, timestamp=now + signed_at).sign(alice)
    subkey_value = {"alice": alice.peer_id, "bob": bob.peer_id, None: None}[subkey]
    dht_record = _dht_record(envelope, subkey_value, now + expiry)
    validator = PeerRecordValidator([RUN])

    # Execute
    with pytest.raises(RecordError, match=reason):
        validator.check(dht_record, now=now)
    ok = validator.validate(dht_record)

    # Assert
    assert not ok
    assert validator.rejected == 1


def test_clock_skew_within_limit_is_accepted(alice: NodeIdentity, record_factory: RecordFactory) -> None:
    """A peer whose clock runs a little ahead (under MAX_CLOCK_SKEW) is still accepted."""
    # Prepare
    now = get_dht_time()
    signed_at = now + MAX_CLOCK_SKEW / 2
    dht_record = _dht_record(record_factory(alice, timestamp=signed_at).sign(alice), alice.peer_id, signed_at + 10)

    # Execute
    checked = PeerRecordValidator([RUN]).check(dht_record, now=now)

    # Assert
    assert checked.timestamp == signed_at


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc5\xff\xff", id="truncated-bin"),
        pytest.param(MSGPackSerializer.dumps(b"x") + b"\x00", id="trailing-bytes"),
        pytest.param(MSGPackSerializer.dumps(b"\xc1\xc1\xc1"), id="malformed-envelope"),
        pytest.param(MSGPackSerializer.dumps(msgpack.packb([RECORD_TAG, b"\xc1", bytes(64)])), id="malformed-body"),
        pytest.param(MSGPackSerializer.dumps(msgpack.packb([RECORD_TAG, b"", bytes(64)])), id="empty-body"),
        pytest.param(MSGPackSerializer.dumps(msgpack.packb([RECORD_TAG, b"x", bytes(63)])), id="short-signature"),
        pytest.param(MSGPackSerializer.dumps(msgpack.packb([RECORD_TAG, "x", bytes(64)])), id="str-body"),
        pytest.param(MSGPackSerializer.dumps(msgpack.packb([[[[[[]]]]]])), id="nested-lists"),
        pytest.param(MSGPackSerializer.dumps(12345), id="int-value"),
        pytest.param(MSGPackSerializer.dumps("a string"), id="str-value"),
        pytest.param(MSGPackSerializer.dumps(None), id="nil-value"),
        pytest.param(MSGPackSerializer.dumps([RECORD_TAG]), id="list-value"),
        pytest.param(MSGPackSerializer.dumps({"a": 1}), id="map-value"),
        pytest.param(MSGPackSerializer.dumps(b"\x00" * (MAX_RECORD_BYTES + 1)), id="oversized"),
    ],
)
def test_malformed_values_under_run_key_are_rejected(alice: NodeIdentity, value: bytes) -> None:
    """Under a strict key, anything that is not a bounded, well-formed signed record is rejected."""
    # Prepare
    dht_record = _dht_record(b"", alice.peer_id, get_dht_time() + 10, value=value)
    validator = PeerRecordValidator([RUN])

    # Execute
    with pytest.raises(RecordError):
        validator.check(dht_record)
    ok = validator.validate(dht_record)

    # Assert
    assert not ok
    assert validator.rejected == 1


def test_verify_refuses_oversized_and_non_bytes() -> None:
    """PeerRecord.verify refuses a non-bytes input and one over 64 KiB before decoding it."""
    # Execute / Assert
    with pytest.raises(RecordError, match="must be bytes"):
        PeerRecord.verify("not bytes")
    with pytest.raises(RecordError, match="byte limit"):
        PeerRecord.verify(bytes(MAX_RECORD_BYTES + 1))


def test_forged_record_under_unrelated_key_is_still_rejected(
    alice: NodeIdentity, bob: NodeIdentity, record_factory: RecordFactory
) -> None:
    """A value carrying our tag is checked under any key, so a forgery cannot hide under a foreign key."""
    # Prepare
    record = record_factory(alice)
    dht_record = _dht_record(_forged_signature(alice, bob, record), alice.peer_id, record.timestamp + 10, key=OTHER_KEY)
    validator = PeerRecordValidator([RUN])

    # Execute
    ok = validator.validate(dht_record)

    # Assert
    assert not ok
    assert validator.rejected == 1


def test_rejected_counts_every_refusal(alice: NodeIdentity, bob: NodeIdentity, record_factory: RecordFactory) -> None:
    """validator.rejected counts refused records and nothing else."""
    # Prepare
    record = record_factory(alice)
    good = _dht_record(record.sign(alice), alice.peer_id, record.timestamp + 10)
    bad = _dht_record(_forged_signature(alice, bob, record), alice.peer_id, record.timestamp + 10)
    foreign = DHTRecord(OTHER_KEY, DHTProtocol.IS_REGULAR_VALUE, MSGPackSerializer.dumps(1), record.timestamp + 10)
    validator = PeerRecordValidator([RUN])

    # Execute
    results = [validator.validate(r) for r in (good, bad, foreign, bad, good, bad)]

    # Assert
    assert results == [True, False, True, False, True, False]
    assert validator.rejected == 3


def test_expiry_beyond_the_signed_ttl_is_rejected(alice: NodeIdentity, record_factory: RecordFactory) -> None:
    """Nobody can re-store a node's genuine record with a longer life than the node signed."""
    # Prepare
    record = record_factory(alice, ttl=5.0)
    envelope = record.sign(alice)
    validator = PeerRecordValidator([RUN])
    within = _dht_record(envelope, alice.peer_id, record.timestamp + 5.0)
    beyond = _dht_record(envelope, alice.peer_id, record.timestamp + 20.0)

    # Execute
    within_ok = validator.validate(within)
    beyond_ok = validator.validate(beyond)

    # Assert
    assert within_ok
    assert not beyond_ok


def test_junk_under_a_peer_id_subkey_is_rejected_by_a_run_agnostic_validator(alice: NodeIdentity) -> None:
    """A validator that knows no run (a bootstrap) still refuses untagged junk stored under a PeerID subkey."""
    # Prepare
    validator = PeerRecordValidator()
    junk = DHTRecord(
        key=OTHER_KEY,
        subkey=MSGPackSerializer.dumps(alice.peer_id),
        value=MSGPackSerializer.dumps(b"junk"),
        expiration_time=get_dht_time() + 10,
    )

    # Execute
    ok = validator.validate(junk)

    # Assert
    assert not ok
    assert validator.rejected == 1


# --- the dashboard's round fields (eval_loss, round_bytes) ------------------------------------------------


def test_round_fields_roundtrip_and_stay_off_the_wire_at_their_defaults(
    alice: NodeIdentity, record_factory: RecordFactory
) -> None:
    """eval_loss and round_bytes verify back; at their defaults the body holds neither (older nodes' form)."""
    # Prepare
    with_round = record_factory(alice, eval_loss=2.5, round_bytes=12345)
    without = record_factory(alice)

    # Execute
    verified = PeerRecord.verify(with_round.sign(alice))
    _, body, _ = msgpack.unpackb(without.sign(alice), raw=False)
    old_body = msgpack.unpackb(body, raw=False)

    # Assert
    assert (verified.eval_loss, verified.round_bytes) == (2.5, 12345)
    assert not {"eval_loss", "round_bytes", "stages"} & set(old_body)
    assert PeerRecord.verify(without.sign(alice)) == without


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"eval_loss": float("nan")}, id="nan-loss"),
        pytest.param({"eval_loss": -0.5}, id="negative-loss"),
        pytest.param({"eval_loss": 1e7}, id="huge-loss"),
        pytest.param({"round_bytes": -1}, id="negative-bytes"),
        pytest.param({"round_bytes": 2**64}, id="bytes-over-64-bits"),
    ],
)
def test_out_of_range_round_fields_are_refused(
    alice: NodeIdentity, record_factory: RecordFactory, fields: dict[str, Any]
) -> None:
    """The round fields are bounded like the others: signing refuses them, and so does verification."""
    # Prepare
    record = record_factory(alice, **fields)
    wire = {**_wire(record_factory(alice)), **fields}

    # Execute / Assert
    with pytest.raises(RecordError):
        record.sign(alice)
    if fields.get("round_bytes", 0) < 2**64:  # msgpack cannot even encode a larger integer
        with pytest.raises(RecordError):
            PeerRecord.verify(_envelope(wire, alice))


def test_validator_counts_rejections_by_reason(
    alice: NodeIdentity, bob: NodeIdentity, record_factory: RecordFactory
) -> None:
    """rejected_by_reason labels each refusal with a bounded reason (what the bootstrap's /metrics reports)."""
    # Prepare
    validator = PeerRecordValidator([RUN])
    record = record_factory(alice)
    forged = _dht_record(_forged_signature(alice, bob, record), alice.peer_id, record.timestamp + 10)
    expired = _dht_record(record.sign(alice), alice.peer_id, get_dht_time() - 1)

    # Execute
    results = [validator.validate(forged), validator.validate(expired)]

    # Assert
    assert results == [False, False]
    assert validator.rejected == 2
    assert {k: v for k, v in validator.rejected_by_reason.items() if v} == {"signature": 1, "expired": 1}
