"""Proof of equivocation: a peer that signed two different keys or claim messages in one round.

A peer that tells different members different things (another code bound in its keys, another
maskset in its claims) makes their decode digests differ, and every honest peer that hears both
aborts before revealing (consistency.py). Naming the liar needs more than the digests: a member
that reports "peer j told me something else" could be lying itself, so digests alone would let a
liar frame an honest peer. So each peer forwards, with its agree, the signed bodies of the keys
and final claim messages it received. Two bodies that the same peer signed for the same group,
round, kind and slot, with different data, prove that this peer equivocated: nobody else can make
its signature, and an honest peer sends one keys and one claim per attempt, the same to everyone.
Only such a peer is named.

A forwarded body counts only if it names this group and round and its signature verifies under a
signing key bound to its sender's PeerID (the key of a keys message, checked with its binding, or
the one we hold). A body that does not parse or verify is ignored: it proves nothing, about anyone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from hivemind.p2p import PeerID

from dht.identity import verify_binding
from node.secagg.messages import Message, MessageError, parse_forwarded

FORWARDED_KINDS = ("keys", "claim")


def forwardable(received: Callable[[str, int, int], Message | None], senders: Iterable[int], claim_slot: int) -> list:
    """[body, signature] of every keys message and final (``claim_slot``) claim we received from ``senders``."""
    evidence = []
    for sender in senders:
        for kind, slot in (("keys", 0), ("claim", claim_slot)):
            message = received(kind, sender, slot)
            if message is not None and message.body:
                evidence.append([message.body, message.signature])
    return evidence


class EquivocationCheck:
    """Finds the peers of one group and round that signed two different messages of one kind and slot.

    Args:
        group_id, round_no: the all-reduce; forwarded bodies naming another are ignored.
        peer_ids: the group in its agreed order (a keys message's signing key must be bound to its sender's).
        index: our position (our own messages, forwarded back, prove nothing).
        claim_slot: the claim attempt whose claims decide U.
        signing_keys: each sender's signing key as we hold it, by index (read when checked).
    """

    def __init__(
        self,
        *,
        group_id: bytes,
        round_no: int,
        peer_ids: list[PeerID],
        index: int,
        claim_slot: int,
        signing_keys: Callable[[], dict[int, bytes]],
    ):
        self.group_id, self.round_no, self.peer_ids, self.index = group_id, round_no, peer_ids, index
        self.claim_slot, self.signing_keys = claim_slot, signing_keys

    def equivocators(self, own: Iterable[Message], forwarded: Iterable[list[bytes]]) -> list[int]:
        """Senders with two different signed data for one (kind, slot): ``own`` are the messages we received
        (verified on arrival), ``forwarded`` the [body, signature] pairs others sent as evidence."""
        seen: dict[tuple[str, int], list[dict[str, Any]]] = {}
        bound = {j: {key} for j, key in self.signing_keys().items()}
        candidates = list(own)
        for body, signature in forwarded:
            try:
                candidates.append(parse_forwarded(body, signature))
            except MessageError:
                continue  # proves nothing: ignored, never held against anyone
        keys_first = sorted(candidates, key=lambda m: m.kind != "keys")  # bound keys learned before claims
        for message in keys_first:
            if not self._authentic(message, bound):
                continue
            datas = seen.setdefault((message.kind, message.sender), [])
            if message.data not in datas:
                datas.append(message.data)
        return sorted({sender for (_, sender), datas in seen.items() if len(datas) > 1})

    def _authentic(self, message: Message, bound: dict[int, set[bytes]]) -> bool:
        """Whether ``message`` is a keys or final claim message of this round, signed by its sender."""
        sender = message.sender
        if message.group != self.group_id or message.round != self.round_no or message.kind not in FORWARDED_KINDS:
            return False
        if sender >= len(self.peer_ids) or sender == self.index:
            return False
        if message.kind == "claim" and message.data["attempt"] != self.claim_slot:
            return False
        if message.kind == "keys":
            key = message.data["signing_pk"]
            if not verify_binding(str(self.peer_ids[sender]), key, message.data["binding"]):
                return False
            bound.setdefault(sender, set()).add(key)
            return _verifies(message, [key])
        return _verifies(message, bound.get(sender, set()))


def _verifies(message: Message, keys: Iterable[bytes]) -> bool:
    for key in keys:
        try:
            message.verify(key)
            return True
        except MessageError:
            continue
    return False
