"""Ledger receipts carry the secure round's consistency certificate, and anyone can check it.

Real masked all-reduce groups on 127.0.0.1 (secagg_harness) produce the certificates, their statements
bound to run ``RUN``'s scope as a node's averager binds them (its endpoint's protocol name; the
harness serves another, so the sessions here are told the run's); the checks are
node/ledger/certificate.py's, through receipts (node/ledger/receipts.py) and the audit of presented
receipts that ``zen-node ledger`` runs (node/ledger/audit.py).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import torch
from secagg_harness import DroppingAllReduce, SecAggSwarm, module_swarm, random_inputs, results_of

from dht import NodeIdentity
from dht.ledger import LedgerSummary, SummaryEntry
from node.aggregation.base import AggregationResult
from node.aggregation.secure import SecureAggregator
from node.config import AggregationConfig
from node.ledger.audit import apply_audit, audit_receipts
from node.ledger.certificate import (
    MAX_CERTIFICATE_BYTES,
    CertificateError,
    GroupCertificate,
    UnboundCertificateError,
    scope_of_run,
    secagg_scope,
)
from node.ledger.contributors import claims_from_entries, contributor_rows, rows_as_csv
from node.ledger.receipts import (
    RECEIPTS_FILE,
    Receipt,
    append_receipt,
    certificate_verdict,
    contributors_digest,
    read_receipts,
    sign_receipt,
    totals,
    verify_receipt,
)
from node.secagg.protocol import MaskedAllReduce

if TYPE_CHECKING:
    from conftest import SwarmPeer

swarm = module_swarm("certificates", 4)
RUN = "test-run"
RUN_HASH = "ab" * 16
ROUND = 7
Identities = Callable[[str | None], NodeIdentity]


def _of_run(base: type[MaskedAllReduce], run_id: str = RUN) -> type[MaskedAllReduce]:
    """``base`` with its statements bound to ``run_id``'s scope, as the node's averager binds them."""

    def __init__(self: MaskedAllReduce, **kwargs: Any) -> None:
        base.__init__(self, **kwargs)
        self.agreement.scope = secagg_scope(run_id)

    return type(f"{base.__name__}OfRun", (base,), {"__init__": __init__})


def _secure_round(swarm: SecAggSwarm, n: int = 3, drop: int | None = None) -> tuple[bytes, list[GroupCertificate]]:
    """One masked all-reduce of peers 0..n-1 of run ``RUN`` at ``ROUND`` (peer ``drop`` leaves before its parts):
    the group id and each surviving peer's certificate."""
    vectors, weights = random_inputs(n, seed=3, numel=40)
    dropping = type("Dropping", (DroppingAllReduce,), {"drop_at": "parts"})
    classes = {i: _of_run(dropping if i == drop else MaskedAllReduce) for i in range(n)}
    sessions = swarm.sessions(vectors, weights, round_no=ROUND, classes=classes)
    outcomes = swarm.run(sessions)
    survivors = [i for i in range(n) if i != drop]
    results_of(outcomes, survivors)
    certificates = [sessions[i].agreement.group_certificate() for i in survivors]
    assert all(c is not None for c in certificates)
    return sessions[0].group_id, [c for c in certificates if c is not None]


def _receipt_line(identity: NodeIdentity, group_id: bytes, peers: list[str], certificate: bytes, **over: object) -> str:
    values: dict[str, object] = dict(
        peer_id=identity.peer_id,
        signing_key=identity.signing_public_key,
        binding=identity.binding,
        run_id=RUN,
        run_hash=RUN_HASH,
        round=ROUND,
        group_id=group_id.hex(),
        contributors=tuple(sorted(peers)),
        contributors_digest=contributors_digest(group_id.hex(), ROUND, peers, []),
        samples=64,
        compute_seconds=1.5,
        outcome="group",
        timestamp=1.0e9,
        certificate=certificate,
    )
    values.update(over)
    return sign_receipt(identity, Receipt(**values))  # type: ignore[arg-type]


def _peer_ids(swarm: SecAggSwarm, members: list[int]) -> list[str]:
    return [swarm.identities[i].peer_id for i in members]


def test_a_secure_rounds_certificate_verifies_for_anyone(swarm: SecAggSwarm) -> None:
    """Every survivor holds the same certificate; from its bytes alone it names U by PeerID, signed by >= t members."""
    # Execute
    group_id, certificates = _secure_round(swarm)
    encoded = {c.encode() for c in certificates}
    certified = GroupCertificate.decode(encoded.pop()).verify(group_id, ROUND, RUN)

    # Assert
    assert not encoded, "the survivors hold different certificates"
    assert set(certified.contributors) == set(_peer_ids(swarm, [0, 1, 2]))
    assert certified.group_size == 3 and certified.threshold == 2
    assert set(certified.signers) == set(_peer_ids(swarm, [0, 1, 2]))


def test_a_dropout_is_outside_the_certified_contributors(swarm: SecAggSwarm) -> None:
    """A peer that left before its parts is not in the certified U; its round keys are in the digest's inputs."""
    # Execute
    group_id, certificates = _secure_round(swarm, n=4, drop=3)
    certified = GroupCertificate.decode(certificates[0].encode()).verify(group_id, ROUND, RUN)

    # Assert
    assert set(certified.contributors) == set(_peer_ids(swarm, [0, 1, 2]))
    assert certified.group_size == 4 and certified.threshold == 3 and len(certified.signers) >= 3


def _swap_order(c: GroupCertificate) -> GroupCertificate:
    """Re-label the group: the first contributor and the last member trade places in the peer order."""
    peers = list(c.peer_ids)
    peers[0], peers[-1] = peers[-1], peers[0]
    return replace(c, peer_ids=tuple(peers))


TAMPERINGS: dict[str, tuple[Callable[[GroupCertificate], GroupCertificate], str]] = {
    "peer order": (_swap_order, "do not hash to its digest"),
    "contributors": (
        lambda c: replace(
            c,
            contributors=c.contributors[:-1],
            holders=c.holders[:-1],
            dropped=tuple(sorted((*c.dropped, c.contributors[-1]))),
        ),
        "do not hash to its digest",
    ),
    "signature": (lambda c: replace(c, signatures=(bytes(64), *c.signatures[1:])), "signature does not verify"),
    "binding": (lambda c: replace(c, bindings=(c.bindings[1], c.bindings[0], *c.bindings[2:])), "not bound"),
    "too few signers": (
        lambda c: replace(
            c,
            signers=c.signers[:1],
            signatures=c.signatures[:1],
            signing_keys=c.signing_keys[:1],
            bindings=c.bindings[:1],
        ),
        "only 1 of 3 members signed",
    ),
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_a_tampered_certificate_does_not_verify(swarm: SecAggSwarm, tampering: str) -> None:
    """Re-labelled order, another U, a forged signature, a key bound to another PeerID, or < t signers: refused."""
    # Prepare
    group_id, certificates = _secure_round(swarm)
    change, reason = TAMPERINGS[tampering]
    tampered = GroupCertificate.decode(change(certificates[0]).encode())

    # Execute / Assert
    with pytest.raises(CertificateError, match=reason):
        tampered.verify(group_id, ROUND, RUN)
    with pytest.raises(CertificateError, match="digest"):
        certificates[0].verify(group_id, ROUND + 1, RUN)  # another round's statement


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 10, msgpack.packb({"v": 1}), msgpack.packb([1, 2, 3]), b"\x91" * (MAX_CERTIFICATE_BYTES + 1)],
    ids=["empty", "garbage", "missing fields", "not a map", "oversized"],
)
def test_a_malformed_certificate_is_a_one_line_error(data: bytes) -> None:
    """Bytes that are not a certificate raise CertificateError with one line, never another exception."""
    with pytest.raises(CertificateError) as caught:
        GroupCertificate.decode(data)
    assert "\n" not in str(caught.value)


def test_a_receipt_carries_its_certificate_and_a_third_party_checks_it(swarm: SecAggSwarm, tmp_path: Path) -> None:
    """The signed receipt line holds the certificate; reading the file back checks it against the receipt's U."""
    # Prepare
    group_id, certificates = _secure_round(swarm)
    me, peers = swarm.identities[0], _peer_ids(swarm, [0, 1, 2])
    certificate = certificates[0].encode()
    append_receipt(tmp_path, _receipt_line(me, group_id, peers, certificate))
    lying = _receipt_line(me, group_id, [*peers[:2], swarm.identities[3].peer_id], certificate, round=ROUND + 1)
    append_receipt(tmp_path, lying)

    # Execute
    receipts, failed = read_receipts(tmp_path)
    verdicts = [certificate_verdict(s.receipt) for s in receipts]

    # Assert
    assert failed == 0 and [s.receipt.certificate for s in receipts] == [certificate, certificate]
    line = json.loads((tmp_path / RECEIPTS_FILE).read_text().splitlines()[0])
    assert len(line["receipt"]["certificate"]) == 64  # the readable copy names it by digest
    assert verdicts[0].certified is not None and verdicts[0].note == ""
    assert verdicts[1].certified is None and "does not verify" in verdicts[1].note


def test_receipts_without_a_certificate_still_read(identity_factory: Identities, tmp_path: Path) -> None:
    """A receipt written before certificates (no field in its body) verifies, its certificate marked unverified;
    a plain aggregation's receipt has none by design."""
    # Prepare: a pre-certificate line is exactly what sign_receipt writes without one
    me, other = identity_factory("me"), identity_factory(None)
    peers = [me.peer_id, other.peer_id]
    old = _receipt_line(me, bytes.fromhex("00ff"), peers, b"")
    plain = _receipt_line(me, b"", peers, b"", round=ROUND + 1)
    body = msgpack.unpackb(base64.b64decode(json.loads(old)["body"]), raw=False)

    # Execute
    signed_old, signed_plain = verify_receipt(old), verify_receipt(plain)

    # Assert
    assert "certificate" not in body and "certificate" not in json.loads(old)["receipt"]
    assert certificate_verdict(signed_old.receipt).note == "unverified certificate (the receipt carries none)"
    assert certificate_verdict(signed_plain.receipt).note.startswith("no certificate (plain aggregation")


def test_a_certificate_of_another_run_is_refused_naming_the_run(swarm: SecAggSwarm, tmp_path: Path) -> None:
    """A run's certificate in a receipt of another run is refused with a one-line reason, in the receipt's verdict
    and in the audit ``zen-node ledger --receipts`` prints; re-labelled to that run, its signatures fail."""
    # Prepare: peer 0 presents its certificate of a round of RUN as a receipt of "other-run"
    group_id, certificates = _secure_round(swarm)
    me, peers = swarm.identities[0], _peer_ids(swarm, [0, 1, 2])
    append_receipt(tmp_path, _receipt_line(me, group_id, peers, certificates[0].encode(), run_id="other-run"))
    relabelled = GroupCertificate.decode(replace(certificates[0], scope=secagg_scope("other-run")).encode())

    # Execute
    receipts, failed = read_receipts(tmp_path)
    verdict = certificate_verdict(receipts[0].receipt)
    audit = audit_receipts([tmp_path], RUN_HASH)

    # Assert
    assert failed == 0 and verdict.certified is None and "\n" not in verdict.note
    assert verdict.note == (
        "certificate does not verify: it was signed for another run ('zen_test-run_secagg.secagg'; "
        "run 'other-run' signs 'zen_other-run_secagg.secagg')"
    )
    assert audit.attested == {} and audit.findings[me.peer_id] == [f"1 receipt(s): {verdict.note}"]
    with pytest.raises(CertificateError, match="signature does not verify"):
        relabelled.verify(group_id, ROUND, "other-run")
    assert set(certificates[0].verify(group_id, ROUND, RUN).contributors) == set(peers)


def test_a_certificate_signed_before_the_run_binding_reads_unverified(swarm: SecAggSwarm, tmp_path: Path) -> None:
    """A version-1 certificate (its statement named no run) still reads in its receipt, marked unverified, and
    attests nothing; malformed version-1 bytes are still refused as malformed."""
    # Prepare: the version-1 form is today's without its run
    group_id, certificates = _secure_round(swarm)
    wire = msgpack.unpackb(certificates[0].encode(), raw=False)
    del wire["run"]
    legacy = msgpack.packb({**wire, "v": 1}, use_bin_type=True)
    broken = msgpack.packb({**wire, "v": 1, "bits": 99}, use_bin_type=True)
    me, peers = swarm.identities[0], _peer_ids(swarm, [0, 1, 2])
    append_receipt(tmp_path, _receipt_line(me, group_id, peers, legacy))

    # Execute
    receipts, failed = read_receipts(tmp_path)
    verdict = certificate_verdict(receipts[0].receipt)
    audit = audit_receipts([tmp_path], RUN_HASH)

    # Assert
    assert failed == 0 and verdict.certified is None
    assert verdict.note == "unverified certificate (signed before certificates named the run)"
    assert audit.attested == {} and audit.findings[me.peer_id] == [f"1 receipt(s): {verdict.note}"]
    with pytest.raises(UnboundCertificateError):
        GroupCertificate.decode(legacy)
    with pytest.raises(CertificateError, match="bits") as caught:
        GroupCertificate.decode(broken)
    assert not isinstance(caught.value, UnboundCertificateError)


def test_a_runs_scope_covers_its_cohorts_and_no_other_run() -> None:
    """The scope a receipt's run accepts: its own averager's, or one of its cohorts' rings; never another run's."""
    # Execute / Assert
    assert secagg_scope(RUN) == "zen_test-run_secagg.secagg"
    assert scope_of_run(secagg_scope(RUN), RUN)
    assert scope_of_run(secagg_scope(f"{RUN}-cohort-0123456789abcdef"), RUN)
    assert not scope_of_run(secagg_scope("test-run2"), RUN)
    assert not scope_of_run(secagg_scope(f"{RUN}-cohort-xyz"), RUN)
    assert not scope_of_run("test.secagg", RUN)


def _summary_entry(identity: NodeIdentity, rounds: int, receipts_digest: bytes) -> SummaryEntry:
    summary = LedgerSummary(
        peer_id=identity.peer_id,
        signing_key=identity.signing_public_key,
        binding=identity.binding,
        run_id=RUN,
        run_hash=RUN_HASH,
        rounds=rounds,
        samples=64 * rounds,
        compute_seconds=1.5,
        last_round=ROUND + rounds,
        receipts_digest=receipts_digest,
        timestamp=1.0e9,
        ttl=600.0,
    )
    envelope = summary.sign(identity)
    return SummaryEntry(identity.peer_id, envelope, LedgerSummary.verify(envelope))


def test_presented_receipts_attest_the_rounds_of_every_member(swarm: SecAggSwarm, tmp_path: Path) -> None:
    """One member's presented receipts attest its co-members' rounds: a claim of more rounds is marked with how
    many are attested, the owner's receipts are matched to its summary, and a member without a summary is listed."""
    # Prepare: peer 0 presents its receipt of one certified round with peers 1 and 2
    group_id, certificates = _secure_round(swarm)
    ids = swarm.identities
    append_receipt(tmp_path, _receipt_line(ids[0], group_id, _peer_ids(swarm, [0, 1, 2]), certificates[0].encode()))
    own = totals(read_receipts(tmp_path)[0])
    entries = [_summary_entry(ids[0], 1, own.receipts_digest), _summary_entry(ids[1], 4, bytes(32))]

    # Execute
    audit = audit_receipts([tmp_path], RUN_HASH)
    rows = contributor_rows(apply_audit(claims_from_entries(entries, RUN_HASH), audit))
    by_peer = {row.peer_id: row for row in rows}

    # Assert
    assert by_peer[ids[0].peer_id].attested_rounds == 1
    assert by_peer[ids[0].peer_id].note == "its presented receipts match its summary"
    assert by_peer[ids[1].peer_id].verified and "1 of 4 claimed round(s) attested" in by_peer[ids[1].peer_id].note
    departed = by_peer[ids[2].peer_id]
    assert not departed.verified and departed.attested_rounds == 1 and "no summary" in departed.note
    assert rows_as_csv(rows).splitlines()[0].endswith(",attested_rounds")
    with pytest.raises(ValueError, match="no receipts file"):
        audit_receipts([tmp_path / "missing.jsonl"], RUN_HASH)


@pytest.mark.slow
def test_secure_aggregators_pass_the_certificate_out(swarm_factory: Callable[..., list[SwarmPeer]]) -> None:
    """Through matchmaking and the averager's process, each node's AggregationResult carries a certificate that
    verifies for its group and round and names its peers."""
    # Prepare
    config = AggregationConfig(min_group_size=3, matchmaking_time=3.0, timeout=30.0)
    peers = swarm_factory(3)
    templates = [torch.zeros(50)]
    aggregators = [SecureAggregator(p.dht, "certs", templates, config, p.identity, weight_bound=64.0) for p in peers]
    results: list[AggregationResult | None] = [None] * 3

    def step(i: int) -> None:
        results[i] = aggregators[i].aggregate(ROUND, [torch.randn(50) / 8], 16.0)

    # Execute
    try:
        threads = [threading.Thread(target=step, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
    finally:
        for aggregator in aggregators:
            aggregator.shutdown()

    # Assert
    assert all(r is not None for r in results), results
    for result in results:
        assert result is not None and result.certificate
        certificate = GroupCertificate.decode(result.certificate)
        certified = certificate.verify(bytes.fromhex(result.group_id), ROUND, "certs")
        assert set(certified.contributors) == set(result.peers) == {p.identity.peer_id for p in peers}
        assert certificate.scope == secagg_scope("certs")  # the node's averager binds its run's scope
