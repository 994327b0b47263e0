"""Presented receipts, checked by a third party: their certificates, and the rounds they attest for each member.

The DHT holds each node's signed running summary (dht/ledger.py): totals and a digest chaining its
receipts' signatures, but not which groups it was in. So from the DHT alone nobody can check a
member's claimed round count against its groups' other members: that would need each round's
contributor set in the DHT, a new record. The receipts themselves hold it: a node's
``ledger.jsonl`` names, for every round it gave, the group's contributors, with the group's
consistency certificate under secure aggregation (node/ledger/certificate.py). ``zen-node ledger``
reads receipt files someone presents (its own, or copies other nodes hand out), and for each:

- every line's signature and binding (node/ledger/receipts.py), and its certificate: at least t
  members, named by PeerID, signed U for that group and round (``certificate_verdict``);
- the rounds each PeerID is *attested* in: rounds for which a verified certificate, in anyone's
  presented receipts, names it in U. This is the cross-check of a claim against the other
  members of its groups: a claim of more rounds than its attested ones is not disproved (its
  other groups' receipts may not have been presented) but is marked with how many are attested;
- whether a node's own presented receipts are the ones its summary commits to: the summary's
  ``receipts_digest`` must be the chain over some prefix of them.

A receipt without a certificate (plain aggregation, a cohort round over two groups, or one
written before certificates) attests nothing beyond its signer's word and is counted as such.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dht.ledger import receipts_chain
from node.ledger.contributors import Claim
from node.ledger.receipts import CHAIN_START, RECEIPTS_FILE, certificate_verdict, read_receipts_file

logger = logging.getLogger(__name__)

MAX_PRESENTED_FILES = 256  # receipt files one listing reads


@dataclass
class ReceiptAudit:
    """What the presented receipt files establish, by PeerID."""

    attested: dict[str, set[int]] = field(default_factory=dict)  # rounds a verified certificate names it in U
    chains: dict[str, set[bytes]] = field(default_factory=dict)  # receipt owner -> its chain after each receipt
    findings: dict[str, list[str]] = field(default_factory=dict)  # receipt owner -> what did not verify


def audit_receipts(paths: Sequence[Path], run_hash: str | None) -> ReceiptAudit:
    """Check the receipts in ``paths`` (``ledger.jsonl`` files, or workdirs holding one) of ``run_hash``.

    Raises:
        ValueError: more than ``MAX_PRESENTED_FILES`` paths, or a path that does not exist (one line).
    """
    if len(paths) > MAX_PRESENTED_FILES:
        raise ValueError(f"at most {MAX_PRESENTED_FILES} receipt files, got {len(paths)}")
    audit = ReceiptAudit()
    for path in paths:
        file = path / RECEIPTS_FILE if path.is_dir() else path
        if not file.exists():
            raise ValueError(f"no receipts file at {file}")
        receipts, failed = read_receipts_file(file, run_hash)
        chains: dict[str, bytes] = {}
        uncertified: dict[str, dict[str, int]] = {}
        for signed in receipts:
            receipt = signed.receipt
            chains[receipt.peer_id] = receipts_chain(chains.get(receipt.peer_id, CHAIN_START), signed.signature)
            audit.chains.setdefault(receipt.peer_id, set()).add(chains[receipt.peer_id])
            verdict = certificate_verdict(receipt)
            if verdict.certified is None:
                reasons = uncertified.setdefault(receipt.peer_id, {})
                reasons[verdict.note] = reasons.get(verdict.note, 0) + 1
                continue
            for peer in verdict.certified.contributors:
                audit.attested.setdefault(peer, set()).add(receipt.round)
        for owner, reasons in uncertified.items():
            found = audit.findings.setdefault(owner, [])
            found.extend(f"{count} receipt(s): {note}" for note, count in sorted(reasons.items()))
        if failed:
            owners = sorted(chains) or ["?"]
            logger.warning(f"{file}: {failed} receipt line(s) do not verify; not counted")
            audit.findings.setdefault(owners[0], []).append(f"{failed} line(s) of {file.name} do not verify")
    return audit


def apply_audit(claims: Iterable[Claim], audit: ReceiptAudit) -> list[Claim]:
    """The claims with their attested rounds and the audit's findings in their notes; a PeerID that presented
    certificates attest but that has no summary gets a claim of its own, unverified (it published nothing)."""
    result = []
    seen = set()
    for claim in claims:
        seen.add(claim.peer_id)
        result.append(_audited(claim, audit))
    for peer in sorted(set(audit.attested) - seen):
        rounds = len(audit.attested[peer])
        note = f"no summary in the DHT; {rounds} round(s) attested by presented certificates"
        result.append(Claim(peer, None, None, None, False, note, attested_rounds=rounds))
    return result


def _audited(claim: Claim, audit: ReceiptAudit) -> Claim:
    attested = len(audit.attested.get(claim.peer_id, ()))
    notes = [claim.note] if claim.note else []
    if claim.verified and claim.rounds is not None and attested < claim.rounds:
        notes.append(f"{attested} of {claim.rounds} claimed round(s) attested by presented certificates")
    if claim.peer_id in audit.chains and claim.receipts_digest:
        match = claim.receipts_digest in audit.chains[claim.peer_id]
        notes.append(
            "its presented receipts match its summary"
            if match
            else "its presented receipts are not the ones its summary commits to"
        )
    notes.extend(audit.findings.get(claim.peer_id, []))
    return replace(claim, note="; ".join(notes), attested_rounds=attested)
