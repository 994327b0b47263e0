"""The consistency step of the masked all-reduce (Bonawitz et al. 2017, round "ConsistencyCheck").

Before any secret is revealed, the survivors must hold one signed statement of what the decode
depends on. Each peer derives U from the claims and computes a digest over everything its decode
uses: the group and round, the peer order, U, the designation of parts to holders, the dropouts,
every key advert of U and the dropouts (as this peer received it), the agreed code bound and the
word width. It signs (scope, group, round, U, digest) with its identity key and sends it to every live
peer ("agree"). A peer reveals only if the agree of every live peer names the same U and digest
with a valid signature and at least t signatures (its own included) verify; it forwards those
signatures with its reveal, and a reveal whose signatures do not certify the receiver's own
statement fails the round (naming the revealer). So:

- a peer that sends different keys (a different bound proposal, say) or different claims to
  different peers makes their digests differ, and every honest peer that hears both aborts
  before revealing;
- every live peer's signed agree is waited for, so an equivocating peer cannot make two honest
  peers that hear each other reveal for two statements: each sees the other's;
- a signature is evidence: a forwarded certificate names its signers, so a peer that signed two
  statements for one round can be shown to have done so;
- each agree also forwards the signed keys and final claim messages its sender received, so a peer
  that told two members different things is proven to have done so and is the only one named
  (evidence.py); without such a proof, every peer whose statement differs from ours is named.

A separate certificate round (Bonawitz's) would add a round trip and nothing here: unlike a
server-routed protocol every peer already hears every live peer's signed statement directly.
What this cannot do: honest peers that cannot hear each other at all (a partition mid-round) may
each collect t signatures from colluders and reveal for different sets.

The scope names the run: the protocol name every member's endpoint serves (``transport.handler_name``,
``zen_<run_id>_secagg.secagg`` for a node's averager: node/ledger/certificate.py ``secagg_scope``),
so a certificate of this round cannot stand for a round of another run in a ledger receipt.

The signed bytes (``statement``, ``decode_digest``) are defined in node/ledger/certificate.py, below this
layer, where a ledger receipt's copy of the certificate (``group_certificate``: the signatures with the
digest's inputs) is checked by anyone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey

from node.ledger.certificate import GroupCertificate, decode_digest, statement
from node.secagg.evidence import EquivocationCheck, forwardable
from node.secagg.messages import CLAIM_ATTEMPTS, Message
from node.secagg.state import SecAggError
from node.secagg.transport import GroupTransport

logger = logging.getLogger(__name__)

AGREE_SLOTS = [("keys", 0), ("claim", CLAIM_ATTEMPTS - 1)]  # the messages an agree's evidence carries


def valid_signers(signed: bytes, signatures: dict[int, bytes], signing_keys: dict[int, bytes]) -> list[int]:
    """The peers whose signature over ``signed`` verifies with their signing key."""
    valid = []
    for signer, signature in signatures.items():
        key = signing_keys.get(signer)
        if key is None:
            continue
        try:
            VerifyKey(key).verify(signed, signature)
        except (CryptoError, ValueError, TypeError):  # BadSignatureError is a CryptoError
            continue
        valid.append(signer)
    return sorted(valid)


class ContributorAgreement:
    """One peer's consistency step: agree on (U, digest), collect t signatures, cross-check certificates.

    Args:
        transport: the peer's ``GroupTransport``: its group, round, index and peers, and ``collect``.
        threshold: t, the signatures a statement needs.
        sign: the identity's Ed25519 signer.
        keys: each peer's verified keys advert, by index (filled in the keys phase; read when used).
        post: sends one message to each listed peer in the background (``MaskedAllReduce._post``).
    """

    def __init__(
        self,
        *,
        transport: GroupTransport,
        threshold: int,
        sign: Callable[[bytes], bytes],
        keys: dict[int, dict[str, Any]],
        post: Callable[[Iterable[int], str, dict[str, Any]], list[asyncio.Future[Any]]],
    ):
        self.index, self.peer_ids = transport.index, transport.peer_ids
        self.group_id, self.round_no = transport.group_id, transport.round_no
        self.scope = transport.handler_name  # the run the statement names (module docstring)
        self.collect, self.timeout = transport.collect, transport.timeout  # the message timeout
        self.received = transport.received
        self.threshold, self.sign, self.keys, self.post = threshold, sign, keys, post
        self.certificate: dict[str, list[Any]] = {"signers": [], "sigs": []}  # the t+ signatures we forward
        self.inputs: dict[str, Any] = {}  # what ``digest`` hashed (U, designation, dropouts, bound, width)
        self.digested = b""  # the digest ``confirm`` had certified
        self.proven: list[int] = []  # peers the evidence proves signed two different messages for a slot (evidence.py)

    def digest(
        self, contributors: list[int], designation: list[list[int]], dropped: list[int], bound: float, bits: int
    ) -> bytes:
        """``decode_digest`` for this group and round, over the keys adverts as this peer received them."""
        self.inputs = dict(contributors=contributors, designation=designation, dropped=dropped, bound=bound, bits=bits)
        return decode_digest(
            group_id=self.group_id,
            round_no=self.round_no,
            peer_ids=[peer.to_bytes() for peer in self.peer_ids],
            contributors=contributors,
            designation=designation,
            dropped=dropped,
            keys=self.keys,
            bound=bound,
            bits=bits,
        )

    @property
    def signing_keys(self) -> dict[int, bytes]:
        return {j: advert["signing_pk"] for j, advert in self.keys.items()}

    async def confirm(self, contributors: list[int], digest: bytes, live: set[int]) -> list[int]:
        """Return the peers whose signatures certify (U, digest), kept in ``certificate`` to forward with our reveal.

        Our agree forwards the keys and final claim messages we received (``evidence``), and each agree we
        collect, or abort a peer sent instead, is searched for a peer that signed two different ones
        (evidence.py): such a peer is the only one named. Our agree is delivered before we give up.

        Raises:
            SecAggError: a peer equivocated, a live peer's agree names another statement or carries a bad
                signature, or fewer than t peers signed ours.
        """
        signed = statement(self.scope, self.group_id, self.round_no, contributors, digest)
        own = self.sign(signed)
        agree = {"u": contributors, "digest": digest, "sig": own, "evidence": self.evidence()}
        sending = self.post(live, "agree", agree)
        agreed = await self.collect("agree", live, self.timeout)
        try:
            return self._certify(signed, own, contributors, digest, agreed)
        except SecAggError:
            if sending:
                await asyncio.wait(sending, timeout=self.timeout)
            raise

    def evidence(self) -> list[list[bytes]]:
        """The signed keys and final claim messages we received, forwarded with our agree or abort."""
        return forwardable(self.received, range(len(self.peer_ids)), AGREE_SLOTS)

    def _proven(self, slots: list[tuple[str, int]], carriers: list[Message]) -> list[int]:
        """The peers that signed two different messages of the (kind, slot)s, by what we received and what the
        ``carriers`` (agree, abort or total messages) forwarded as evidence (evidence.py)."""
        check = EquivocationCheck(
            group_id=self.group_id,
            round_no=self.round_no,
            peer_ids=self.peer_ids,
            index=self.index,
            signing_keys=lambda: self.signing_keys,
        )
        told = [m for j in range(len(self.peer_ids)) for kind, s in slots if (m := self.received(kind, j, s))]
        return check.equivocators(told, [e for m in carriers for e in m.data["evidence"]])

    def _certify(
        self, signed: bytes, own: bytes, contributors: list[int], digest: bytes, agreed: dict[int, Message]
    ) -> list[int]:
        """``confirm``'s checks of the agrees collected; the certificate is kept once they pass."""
        aborts = [m for j in range(len(self.peer_ids)) if (m := self.received("abort", j, 0)) is not None]
        self.proven = liars = self._proven(AGREE_SLOTS, [*agreed.values(), *aborts])
        self._require(not liars, "signed two different keys or claim messages in this round (proof forwarded)", liars)
        other = [j for j, m in agreed.items() if m.data["u"] != contributors or m.data["digest"] != digest]
        self._require(not other, "derived another contributor set or decode digest", other)
        signatures = {j: m.data["sig"] for j, m in agreed.items()} | {self.index: own}
        signers = valid_signers(signed, signatures, self.signing_keys)
        forged = sorted(set(signatures) - set(signers))
        self._require(not forged, "signed the agreed statement with a bad signature", forged)
        self._require(len(signers) >= self.threshold, f"only {len(signers)} peers signed U (need {self.threshold})")
        self.certificate = {"signers": signers, "sigs": [signatures[j] for j in signers]}
        self.digested = digest
        return signers

    def group_certificate(self) -> GroupCertificate | None:
        """The certificate of the statement ``confirm`` certified, with the digest's inputs, for a third party to
        check (node/ledger/certificate.py); None before ``confirm`` succeeded."""
        if not self.digested or self.inputs.get("contributors") is None:
            return None
        return GroupCertificate.from_round(
            scope=self.scope,
            peer_ids=[peer.to_bytes() for peer in self.peer_ids],
            digest=self.digested,
            keys=self.keys,
            signers=self.certificate["signers"],
            signatures=self.certificate["sigs"],
            **self.inputs,
        )

    async def confirm_total(self, live: set[int]) -> None:
        """Check that every live peer received the same partial sums as we did, before anyone decodes.

        A holder that sends its recipients different partial sums would have honest members apply
        different means. Each peer forwards the signed bodies of the sum messages it received (each
        signs its payload's SHA-256, computed as it arrived); two different bodies one holder signed for
        one part prove it (evidence.py): every honest peer that hears the other aborts and names it, and
        nobody else. Nothing of the total is hashed again. A peer that left after the sums is waited for
        once (the message timeout) and then not counted.

        Raises:
            SecAggError: a holder signed two different partial sums of one part.
        """
        sums = [("sum", part) for part in range(len(self.peer_ids))]
        evidence = forwardable(self.received, range(len(self.peer_ids)), sums)
        sending = self.post(live, "total", {"evidence": evidence})
        reported = await self.collect("total", live, self.timeout)
        if sending:  # the last message: ending the round now would cancel it, and the others would wait for it
            await asyncio.wait(sending, timeout=self.timeout)
        self.proven = liars = self._proven(sums, list(reported.values()))
        self._require(
            not liars, "signed two different partial sums of one part (proof forwarded); nothing applied", liars
        )

    def check_certificates(self, reveals: dict[int, Message], statement_of: tuple[list[int], bytes]) -> None:
        """Each reveal must carry t valid signatures on our statement; SecAggError naming the peer otherwise."""
        signed = statement(self.scope, self.group_id, self.round_no, *statement_of)
        signing_keys = self.signing_keys
        for j, message in reveals.items():
            data = message.data
            if len(data["signers"]) != len(data["sigs"]):
                held: list[int] = []
            else:
                held = valid_signers(signed, dict(zip(data["signers"], data["sigs"], strict=True)), signing_keys)
            self._require(len(held) >= self.threshold, "revealed without t valid signatures on our U", [j])

    def _require(self, ok: bool, reason: str, peers: list[int] | None = None) -> None:
        if ok:
            return
        named = f"peers {[str(self.peer_ids[j]) for j in peers]} " if peers else ""
        message = f"group {self.group_id.hex()[:8]} round {self.round_no}: {named}{reason}; nothing revealed"
        if peers:
            logger.warning(f"blamed: {message}")
        raise SecAggError(message)
