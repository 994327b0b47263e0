"""Proof of equivocation (node/secagg/evidence.py): only a peer whose own signature shows two stories is named.

Real Ed25519 identities bound to real PeerIDs; the messages are sealed as the protocol seals them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hivemind.p2p import PeerID
from nacl.signing import SigningKey

from dht.identity import NodeIdentity
from node.secagg.evidence import EquivocationCheck
from node.secagg.messages import CLAIM_ATTEMPTS, MAX_GROUP, Message, parse_header

GROUP, ROUND, N = b"g" * 20, 7, 4
LAST = CLAIM_ATTEMPTS - 1


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> list[NodeIdentity]:
    folder = tmp_path_factory.mktemp("evidence")
    return [NodeIdentity.load_or_create(folder / f"peer{i}") for i in range(N)]


def keys_data(identity: NodeIdentity, bound_exp: int = -3) -> dict[str, Any]:
    return {
        "c_pk": bytes(range(32)),
        "s_pk": bytes(range(1, 33)),
        "b_commit": bytes(32),
        "signing_pk": identity.signing_public_key,
        "binding": identity.binding,
        "bound_exp": bound_exp,
    }


def claim_data(maskset: list[int], attempt: int = LAST) -> dict[str, Any]:
    return {"attempt": attempt, "holders": list(range(N)), "maskset": maskset}


def sent(identity: NodeIdentity, kind: str, data: dict, sender: int, to: int, **changes: Any) -> Message:
    """A message as its recipient holds it (sealed, then parsed: body and signature kept; the payload not)."""
    fields: dict[str, Any] = dict(kind=kind, group=GROUP, round=ROUND, sender=sender, recipient=to, data=data)
    fields |= changes
    return parse_header(Message(**fields).seal(identity.sign))[0]


def test_two_partial_sums_of_one_part_name_their_holder(identities: list[NodeIdentity]) -> None:
    """Holder 2 sent us and peer 3 different words for part 1: the bodies sign different payload digests."""
    data = {"part": 1, "senders": [0, 1, 3]}
    to_us = sent(identities[2], "sum", data, sender=2, to=0, payload=b"\x01" * 16)
    to_three = sent(identities[2], "sum", data, sender=2, to=3, payload=b"\x02" * 16)
    same = sent(identities[2], "sum", data, sender=2, to=1, payload=b"\x01" * 16)
    other_part = sent(identities[2], "sum", dict(data, part=2), sender=2, to=3, payload=b"\x03" * 16)

    assert check(identities).equivocators([to_us], forward(to_three)) == [2]
    assert check(identities).equivocators([to_us], forward(same, other_part)) == []


def check(identities: list[NodeIdentity], index: int = 0) -> EquivocationCheck:
    keys = {j: identity.signing_public_key for j, identity in enumerate(identities)}
    return EquivocationCheck(
        group_id=GROUP,
        round_no=ROUND,
        peer_ids=[PeerID.from_base58(identity.peer_id) for identity in identities],
        index=index,
        signing_keys=lambda: keys,
    )


def forward(*messages: Message) -> list[list[bytes]]:
    return [[m.body, m.signature] for m in messages]


def test_two_different_signed_claims_name_their_signer_only(identities: list[NodeIdentity]) -> None:
    """Peer 1 told us one maskset and peer 3 another: peer 1 is proven to have equivocated, nobody else."""
    to_us = sent(identities[1], "claim", claim_data([0, 1, 2, 3]), sender=1, to=0)
    to_three = sent(identities[1], "claim", claim_data([0, 1, 2]), sender=1, to=3)
    honest_claim = sent(identities[2], "claim", claim_data([0, 1, 2, 3]), sender=2, to=3)

    assert check(identities).equivocators([to_us], forward(to_three, honest_claim)) == [1]


def test_two_forwarded_keys_with_different_bounds_name_their_signer(identities: list[NodeIdentity]) -> None:
    """Both copies forwarded by others (none received by us): the keys' own bound signing key proves it."""
    to_two = sent(identities[3], "keys", keys_data(identities[3], bound_exp=-1), sender=3, to=2)
    to_one = sent(identities[3], "keys", keys_data(identities[3], bound_exp=-5), sender=3, to=1)

    assert check(identities).equivocators([], forward(to_two, to_one)) == [3]


def test_the_same_message_to_everyone_proves_nothing(identities: list[NodeIdentity]) -> None:
    """An honest peer sends the same data to every recipient: the recipient field differs, the data does not."""
    copies = [sent(identities[2], "claim", claim_data([0, 1, 2, 3]), sender=2, to=to) for to in (0, 1, 3)]
    keys = [sent(identities[2], "keys", keys_data(identities[2]), sender=2, to=to) for to in (0, 1, 3)]

    assert check(identities).equivocators([copies[0], keys[0]], forward(*copies[1:], *keys[1:])) == []


def test_a_liar_cannot_frame_an_honest_peer(identities: list[NodeIdentity]) -> None:
    """Peer 3 forwards a claim 'from peer 2' that it signed itself, with its own key or a fresh one: ignored."""
    honest = sent(identities[2], "claim", claim_data([0, 1, 2, 3]), sender=2, to=0)
    framed = Message("claim", GROUP, ROUND, 2, 3, claim_data([0, 1, 2]))
    by_liar = parse_header(framed.seal(identities[3].sign))[0]
    # a keys message for peer 2 with a fresh signing key and the liar's binding: not bound to peer 2's PeerID
    fresh = SigningKey.generate()
    fake_keys = dict(keys_data(identities[2]), signing_pk=bytes(fresh.verify_key), binding=identities[3].binding)
    unbound = parse_header(Message("keys", GROUP, ROUND, 2, 3, fake_keys).seal(lambda b: fresh.sign(b).signature))[0]
    by_fresh = parse_header(framed.seal(lambda b: fresh.sign(b).signature))[0]

    named = check(identities).equivocators([honest], forward(by_liar, by_fresh, unbound))

    assert named == []


def test_other_rounds_groups_attempts_and_garbage_prove_nothing(identities: list[NodeIdentity]) -> None:
    """A different claim of peer 1 from another round, group or an earlier attempt is no equivocation here."""
    ours = sent(identities[1], "claim", claim_data([0, 1, 2, 3]), sender=1, to=0)
    elsewhere = [
        sent(identities[1], "claim", claim_data([0, 1]), sender=1, to=2, round=ROUND + 1),
        sent(identities[1], "claim", claim_data([0, 1]), sender=1, to=2, group=b"h" * 20),
        sent(identities[1], "claim", claim_data([0, 1], attempt=0), sender=1, to=2),
    ]
    garbage = [[b"\xc1" * 10, bytes(64)], [b"", bytes(64)], [ours.body, bytes(64)]]

    assert check(identities).equivocators([ours], forward(*elsewhere) + garbage) == []


def test_our_own_messages_forwarded_back_prove_nothing_about_us(identities: list[NodeIdentity]) -> None:
    """We (index 0) are never named by our own check, whatever is forwarded."""
    mine = [sent(identities[0], "claim", claim_data(m), sender=0, to=to) for m, to in (([0, 1], 1), ([0, 2], 2))]

    assert check(identities, index=0).equivocators([], forward(*mine)) == []
    assert check(identities, index=1).equivocators([], forward(*mine)) == [0]


def test_evidence_fits_a_header_for_the_largest_group(tmp_path: Path) -> None:
    """An agree forwarding keys and a claim from each of 63 others stays under the header bound."""
    identity = NodeIdentity.load_or_create(tmp_path / "big")
    group = b"G" * 64
    n = MAX_GROUP
    bodies = []
    for sender in range(1, n):
        for kind, data in (
            ("keys", keys_data(identity)),
            ("claim", {"attempt": LAST, "holders": [-1] * n, "maskset": list(range(n))}),
        ):
            bodies.append(Message(kind, group, 2**62, sender, 0, data))
    evidence = []
    for m in bodies:
        m.seal(identity.sign)
        evidence.append([m.body, m.signature])
    agree = Message(
        "agree", group, 2**62, 0, 1, {"u": list(range(n)), "digest": bytes(32), "sig": bytes(64), "evidence": evidence}
    )

    message = parse_header(agree.seal(identity.sign))[0]

    assert len(message.data["evidence"]) == 2 * (n - 1)
