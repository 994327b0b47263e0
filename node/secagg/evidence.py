"""Proof of equivocation: a peer that signed two different messages for one slot of one round.

A peer that tells different members different things (another code bound in its keys, another
maskset in its claims, another partial sum in its sums) makes their decode digests, or their
totals, differ, and every honest peer that hears both aborts (consistency.py). Naming the liar
needs more than that: a member that reports "peer j told me something else" could be lying
itself, so digests alone would let a liar frame an honest peer. So each peer forwards the signed
bodies of the messages its statement rests on: with its agree (or its abort, if it fails before
agreeing), the keys and final claim messages it received; with its total, the sum messages. Two
bodies that the same peer signed for the same group, round, kind and slot (claim attempt, part)
that differ in anything but the recipient (the data, or the payload's SHA-256 a sum's body
signs) prove that this peer equivocated: nobody else can make its signature, and an honest peer
sends one such message per slot, the same to everyone. Only such a peer is named.

A forwarded body counts only if it names this group and round and its signature verifies under a
signing key bound to its sender's PeerID (the key of a keys message, checked with its binding, or
the one we hold). A body that does not parse or verify is ignored: it proves nothing, about anyone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hivemind.p2p import PeerID

from dht.identity import verify_binding
from node.secagg.messages import MAX_EVIDENCE, Message, MessageError, parse_forwarded, signed_content

FORWARDED_KINDS = ("keys", "claim", "sum")


def forwardable(
    received: Callable[[str, int, int], Message | None], senders: Iterable[int], slots: Iterable[tuple[str, int]]
) -> list[list[bytes]]:
    """[body, signature] of the messages of the given (kind, slot)s we received from ``senders`` (at most
    MAX_EVIDENCE: parts placed on more than two holders each may leave some out, which proves less, not wrong)."""
    held = (received(kind, sender, slot) for sender in senders for kind, slot in slots)
    found = [[message.body, message.signature] for message in held if message is not None and message.body]
    return found[:MAX_EVIDENCE]


class EquivocationCheck:
    """Finds the peers of one group and round that signed two different messages of one kind and slot.

    Args:
        group_id, round_no: the all-reduce; forwarded bodies naming another are ignored.
        peer_ids: the group in its agreed order (a keys message's signing key must be bound to its sender's).
        index: our position (our own messages, forwarded back, prove nothing).
        signing_keys: each sender's signing key as we hold it, by index (read when checked).
    """

    def __init__(
        self,
        *,
        group_id: bytes,
        round_no: int,
        peer_ids: list[PeerID],
        index: int,
        signing_keys: Callable[[], dict[int, bytes]],
    ):
        self.group_id, self.round_no, self.peer_ids, self.index = group_id, round_no, peer_ids, index
        self.signing_keys = signing_keys

    def equivocators(self, own: Iterable[Message], forwarded: Iterable[list[bytes]]) -> list[int]:
        """Senders that signed two different bodies for one (kind, slot): ``own`` are the messages we received
        (verified on arrival), ``forwarded`` the [body, signature] pairs others sent as evidence.

        A forwarded body whose content equals a copy we already hold proves nothing new, so its signature is
        not checked: among honest peers no signature is verified here at all (2(n-1)^2 per round otherwise).
        """
        seen: dict[tuple[str, int, int], set[bytes]] = {}
        for message in own:
            if self._in_scope(message):
                seen.setdefault(_slot_of(message), set()).add(signed_content(message))
        bound = {j: {key} for j, key in self.signing_keys().items()}
        candidates = []
        for body, signature in forwarded:
            try:
                candidates.append(parse_forwarded(body, signature))
            except MessageError:
                continue  # proves nothing: ignored, never held against anyone
        for message in sorted(candidates, key=lambda m: m.kind != "keys"):  # bound keys learned before claims
            if not self._in_scope(message):
                continue
            content, contents = signed_content(message), seen.setdefault(_slot_of(message), set())
            if content not in contents and self._signed(message, bound):
                contents.add(content)
        return sorted({sender for (_, sender, _), contents in seen.items() if len(contents) > 1})

    def _in_scope(self, message: Message) -> bool:
        """Whether ``message`` is a keys, claim or sum message of this group and round from another peer."""
        return (
            message.group == self.group_id
            and message.round == self.round_no
            and message.kind in FORWARDED_KINDS
            and message.sender < len(self.peer_ids)
            and message.sender != self.index
        )

    def _signed(self, message: Message, bound: dict[int, set[bytes]]) -> bool:
        """Whether ``message`` carries its sender's signature (a keys message: by a key bound to its PeerID)."""
        sender = message.sender
        if message.kind == "keys":
            key = message.data["signing_pk"]
            if not verify_binding(str(self.peer_ids[sender]), key, message.data["binding"]):
                return False
            bound.setdefault(sender, set()).add(key)
            return _verifies(message, [key])
        return _verifies(message, bound.get(sender, set()))


def _slot_of(message: Message) -> tuple[str, int, int]:
    return message.kind, message.sender, message.data.get("part", message.data.get("attempt", 0))


def _verifies(message: Message, keys: Iterable[bytes]) -> bool:
    for key in keys:
        try:
            message.verify(key)
            return True
        except MessageError:
            continue
    return False
