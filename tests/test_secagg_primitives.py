"""The secure-aggregation building blocks: Shamir shares, ChaCha20 masks, the fixed-point ring code, the wire format."""

from __future__ import annotations

import itertools

import msgpack
import numpy as np
import pytest
from nacl.signing import SigningKey

from node.secagg.fixed_point import FixedPointCodec
from node.secagg.masking import apply_mask, keystream_into, pair_mask_key, pair_secret, pair_sign, self_mask_key
from node.secagg.messages import MAX_HEADER_BYTES, TAG, Message, MessageError, parse_header
from node.secagg.shamir import ShareError, combine_int, combine_secret, evaluate, split_int, split_secret

# Shamir's worked example (Wikipedia, "Shamir's secret sharing"): secret 1234, f(x) = 1234 + 166x + 94x^2 mod 1613
WIKI_PRIME, WIKI_SECRET = 1613, 1234
WIKI_SHARES = [(1, 1494), (2, 329), (3, 965), (4, 176), (5, 1188), (6, 775)]

# RFC 8439 appendix A.1, test vector #1: ChaCha20 block with an all-zero key and nonce, counter 0
RFC8439_ZERO_BLOCK = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)


def test_shamir_matches_the_known_vectors() -> None:
    """Evaluation gives the published shares, and every 3 of them rebuild the secret."""
    coefficients = [WIKI_SECRET, 166, 94]

    assert [(x, evaluate(coefficients, x, WIKI_PRIME)) for x in range(1, 7)] == WIKI_SHARES
    for subset in itertools.combinations(WIKI_SHARES, 3):
        assert combine_int(list(subset), WIKI_PRIME) == WIKI_SECRET


def test_shamir_needs_the_threshold() -> None:
    """Fewer than t shares give a value unrelated to the secret; t of any choice give it back."""
    secret = bytes(range(32))
    shares = split_secret(secret, threshold=3, count=5)

    for subset in itertools.combinations(range(5), 3):
        assert combine_secret({i + 1: shares[i] for i in subset}) == secret
    two = {1: shares[0], 2: shares[1]}
    with pytest.raises(ShareError, match="do not rebuild"):  # a random 521-bit field element, not the secret
        combine_secret(two)


def test_shamir_refuses_bad_shares() -> None:
    """Duplicated x, out-of-field values and bad parameters are refused."""
    with pytest.raises(ShareError, match="duplicate"):
        combine_int([(1, 5), (1, 7)], WIKI_PRIME)
    with pytest.raises(ShareError, match="outside the field"):
        combine_int([(1, WIKI_PRIME + 1), (2, 3)], WIKI_PRIME)
    with pytest.raises(ValueError):
        split_int(5, threshold=4, count=3)


def test_chacha20_keystream_matches_rfc8439() -> None:
    """The mask generator is standard ChaCha20: the RFC's all-zero block comes out word for word."""
    words = np.empty(16, dtype=np.uint32)

    keystream_into(words, bytes(32))

    assert words.tobytes() == RFC8439_ZERO_BLOCK


def test_masks_add_and_cancel_in_the_ring() -> None:
    """A mask added by one peer and subtracted by the other leaves the vector exactly as it was."""
    values = np.arange(100_003, dtype=np.uint32) * np.uint32(2654435761)
    original = values.copy()
    key = pair_mask_key(bytes(32), b"group", 3, 1, 0, 2)

    apply_mask(values, key, pair_sign(0, 2))
    changed = np.count_nonzero(values != original)
    apply_mask(values, key, pair_sign(2, 0))

    assert changed > 99_000 and np.array_equal(values, original)


def test_mask_keys_are_distinct_per_pair_round_and_part() -> None:
    """Keys never repeat across parts, rounds, pairs or kinds; both peers of a pair derive the same one."""
    secret = bytes(range(32))
    keys = {
        pair_mask_key(secret, b"g", round_no, part, low, high)
        for round_no in range(3)
        for part in range(3)
        for low, high in ((0, 1), (0, 2), (1, 2))
    }
    keys |= {self_mask_key(secret, b"g", round_no, part) for round_no in range(3) for part in range(3)}
    a, b = SigningKey.generate().to_curve25519_private_key(), SigningKey.generate().to_curve25519_private_key()

    assert len(keys) == 27 + 9
    assert pair_secret(bytes(a), bytes(b.public_key)) == pair_secret(bytes(b), bytes(a.public_key))


def test_stochastic_rounding_is_unbiased_and_within_one_step() -> None:
    """Encodings round up or down by less than one step, and average to the exact value."""
    codec = FixedPointCodec(group_size=4, bound=1.0)
    value = np.full(200_000, 0.123456789, dtype=np.float32)
    out = np.empty(value.size, np.uint32)

    codec.encode_into(value, 1.0, out)

    exact = float(value[0]) * codec.scale
    encoded = out.view(np.int32).astype(np.float64)
    assert np.all(np.abs(encoded - exact) < 1)
    assert abs(encoded.mean() - exact) < 0.01


def test_the_group_sum_never_wraps_at_the_extremes() -> None:
    """32 peers all at +B (and all at -B) with weight 1 decode to exactly +-B: the headroom bits suffice."""
    codec = FixedPointCodec(group_size=32, bound=2.0)
    for sign in (1.0, -1.0):
        encoded = np.empty(10, np.uint32)
        codec.encode_into(np.full(10, sign * 5.0, np.float32), 1.0, encoded)  # clipped to +-B
        total = np.zeros(11, np.uint32)
        for _ in range(32):
            total[:-1] += encoded
            total[-1] += np.uint32(codec.encode_weight(1.0))
        mean = np.empty(10, np.float32)

        weight_sum = codec.decode_sum(total, mean)

        assert weight_sum == pytest.approx(32.0, rel=1e-6)
        assert np.allclose(mean, sign * 2.0, atol=1e-6)


def test_non_finite_updates_are_refused() -> None:
    """A NaN would become an arbitrary ring element, so encoding refuses it."""
    codec = FixedPointCodec(group_size=3, bound=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode_into(np.array([0.0, np.nan], np.float32), 1.0, np.empty(2, np.uint32))


def sealed(kind: str = "agree", data: dict | None = None) -> bytes:
    key = SigningKey.generate()
    data = {"u": [0, 1, 2], "digest": bytes(32), "sig": bytes(64), "evidence": []} if data is None else data
    return Message(kind, b"g" * 32, 1, 0, 1, data).seal(lambda b: key.sign(b).signature)


def test_wire_format_round_trips() -> None:
    """A sealed header parses back to the same message."""
    message, size, digest = parse_header(sealed())
    assert (message.kind, message.data["u"], size, digest) == ("agree", [0, 1, 2], 0, b"")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (msgpack.packb([b"nope", b"", bytes(64)]), "bad tag"),
        (msgpack.packb([TAG, msgpack.packb({"kind": "agree"}), bytes(64)]), "malformed message body"),
        (b"\xc1" * 10, "undecodable"),
        (b"\x00" * (MAX_HEADER_BYTES + 1), "exceeds"),
    ],
)
def test_malformed_headers_are_refused(header: bytes, reason: str) -> None:
    """Bad tags, partial bodies, undecodable bytes and oversized headers are refused with a reason."""
    with pytest.raises(MessageError, match=reason):
        parse_header(header)


@pytest.mark.parametrize(
    ("kind", "data", "reason"),
    [
        ("gossip", {}, "unknown message kind"),
        ("agree", {"u": [0, 1]}, "needs fields"),
        ("agree", {"u": [0, 1], "digest": bytes(32), "sig": bytes(64), "extra": 1, "evidence": []}, "needs fields"),
        ("agree", {"u": [0, 0], "digest": bytes(32), "sig": bytes(64), "evidence": []}, "malformed fields"),
        ("agree", {"u": [0, 99], "digest": bytes(32), "sig": bytes(64), "evidence": []}, "malformed fields"),
        ("agree", {"u": [0, 1], "digest": bytes(32), "sig": bytes(63), "evidence": []}, "malformed fields"),
        (
            "agree",
            {"u": [0], "digest": bytes(32), "sig": bytes(64), "evidence": [[b"x" * 1025, bytes(64)]]},
            "malformed",
        ),
        ("agree", {"u": [0], "digest": bytes(32), "sig": bytes(64), "evidence": [[b"x", bytes(63)]]}, "malformed"),
        (
            "agree",
            {"u": [0], "digest": bytes(32), "sig": bytes(64), "evidence": [[b"x", bytes(64)]] * 129},
            "malformed",
        ),
        ("reveal", {"b": {0: b"x"}, "s": {}, "signers": [], "sigs": []}, "malformed fields"),
        ("reveal", {"b": {}, "s": {}, "signers": [0], "sigs": [b"x"]}, "malformed fields"),
        ("reveal", {"b": {}, "s": {}, "signers": [0], "sigs": [bytes(64)] * 65}, "malformed fields"),
        ("reveal", {"b": {}, "s": {}}, "needs fields"),
    ],
)
def test_schema_violations_are_refused(kind: str, data: dict, reason: str) -> None:
    """Unknown kinds, missing or extra fields, duplicated or out-of-range indices are refused when sealing."""
    with pytest.raises(MessageError, match=reason):
        sealed(kind, data)
