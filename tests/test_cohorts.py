"""Cohorts: the data sketch, the clustering rule, and 12-13 real DHT peers on 127.0.0.1 agreeing on it.

The rule is tested on real text of three domains in one language and alphabet (plays, the Python
language reference, software licences: benchmarks/domain_corpora.py), not only on generated corpora
in different alphabets, which any threshold separates.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import LOCALHOST_MADDR, REPO_ROOT, domain_texts, wait_until, write_run_config

from dht import Cohort, CohortMatcher, PeerRecord, adjusted_rand_index, encode_sketch, list_peers, publish_record
from node.cli import main
from node.data import CORPUS_STYLES, generate_corpus
from node.sketch import data_sketch

if TYPE_CHECKING:
    from conftest import SwarmPeer

RecordFactory = Callable[..., PeerRecord]
SLICE = 20_000  # bytes of data per peer
THRESHOLD = 0.1  # the old default cohorts.distance_threshold, now an override
DOMAIN_SLICE = 40_000  # bytes of real text per peer


def domain_slices(per_domain: int, domains: tuple[str, ...] = ("drama", "docs", "legal")) -> list[tuple[int, bytes]]:
    """(domain index, contiguous slice) for ``per_domain`` peers of each real-text domain."""
    texts = domain_texts()
    return [
        (k, texts[name][i * DOMAIN_SLICE : (i + 1) * DOMAIN_SLICE])
        for k, name in enumerate(domains)
        for i in range(per_domain)
    ]


def corpus_slices(styles: int, per_style: int) -> list[tuple[int, bytes]]:
    """(true cohort, data) for ``per_style`` peers of each of ``styles`` clearly different corpora."""
    out = []
    for k in range(styles):
        corpus = generate_corpus(per_style * SLICE, seed=k, style=CORPUS_STYLES[k])
        out += [(k, corpus[i * SLICE : (i + 1) * SLICE]) for i in range(per_style)]
    return out


def partition(cohorts: list[Cohort]) -> dict[str, str]:
    return {member: c.cohort_id for c in cohorts for member in c.members}


# --- the sketch ------------------------------------------------------------------------------------------


def test_sketch_is_a_fixed_size_unit_vector_that_separates_corpora() -> None:
    """Same-corpus slices sketch close together, different corpora far apart, at unit norm and fixed size."""
    # Prepare
    (_, a1), (_, a2), (_, b1), _ = corpus_slices(2, 2)

    # Execute
    sa1, sa2, sb1 = data_sketch(a1), data_sketch(a2), data_sketch(b1)

    # Assert
    assert len(sa1) == 256 and abs(sum(v * v for v in sa1) - 1) < 1e-9
    assert data_sketch(a1) == sa1  # deterministic without noise
    near = 1 - sum(x * y for x, y in zip(sa1, sa2, strict=True))
    far = 1 - sum(x * y for x, y in zip(sa1, sb1, strict=True))
    assert near < THRESHOLD / 10 and far > 2 * THRESHOLD


def test_sketch_noise_blurs_but_keeps_the_unit_norm() -> None:
    """With noise the sketch differs on every call and keeps norm 1; bad input raises one clear error."""
    # Prepare
    data = generate_corpus(SLICE, seed=1)

    # Execute
    noisy = [data_sketch(data, noise=0.01) for _ in range(2)]

    # Assert
    assert noisy[0] != noisy[1] and abs(sum(v * v for v in noisy[0]) - 1) < 1e-9
    with pytest.raises(ValueError, match="at least 3 bytes"):
        data_sketch(b"ab")
    with pytest.raises(ValueError, match="noise"):
        data_sketch(data, noise=-1.0)


# --- the rule --------------------------------------------------------------------------------------------


def signed_records(identity_factory, record_factory: RecordFactory, slices, **overrides) -> list[PeerRecord]:  # type: ignore[no-untyped-def]
    return [
        record_factory(identity_factory(None), sketch=encode_sketch(data_sketch(data)), **overrides)
        for _, data in slices
    ]


def test_rule_ignores_record_order_and_only_counts_trainers_of_the_run(identity_factory, record_factory) -> None:  # type: ignore[no-untyped-def]
    """The same records in any order give the same cohorts; servers, other runs and empty sketches don't join."""
    # Prepare
    slices = domain_slices(3)
    records = signed_records(identity_factory, record_factory, slices)
    outsiders = [
        record_factory(identity_factory(None), roles=("server",)),
        record_factory(identity_factory(None), run_hash="cd" * 16),
    ]
    blank = record_factory(identity_factory(None), sketch=encode_sketch([0.0] * 256))
    matcher = CohortMatcher("run")

    # Execute
    shuffled = [*records, *outsiders, blank]
    random.Random(0).shuffle(shuffled)
    first, second = matcher.cohorts([*records, blank], "ab" * 16), matcher.cohorts(shuffled, "ab" * 16)

    # Assert
    assert first == second
    assert sorted(len(c) for c in first) == [1, 3, 3, 3]
    assert matcher.cohort_of(blank.peer_id, shuffled, "ab" * 16).members == (blank.peer_id,)
    truth = [k for k, _ in slices]
    found = partition(first)
    assert adjusted_rand_index(truth, [found[r.peer_id] for r in records]) == 1.0
    assert CohortMatcher("other-run").cohorts(records)[0].cohort_id not in {c.cohort_id for c in first}


def test_adaptive_rule_separates_real_domains_where_the_fixed_threshold_merges_them(  # type: ignore[no-untyped-def]
    identity_factory, record_factory
) -> None:
    """Three domains of English text form three cohorts (ARI 1); the old fixed 0.1 puts them in one."""
    # Prepare
    slices = domain_slices(4)
    records = signed_records(identity_factory, record_factory, slices)
    truth = [k for k, _ in slices]

    # Execute
    adaptive = partition(CohortMatcher("run").cohorts(records))
    fixed = partition(CohortMatcher("run", THRESHOLD).cohorts(records))

    # Assert
    assert adjusted_rand_index(truth, [adaptive[r.peer_id] for r in records]) == 1.0
    assert len(set(fixed.values())) == 1


@pytest.mark.parametrize("domain", ["drama", "docs", "legal"])
def test_one_domain_stays_one_cohort(identity_factory, record_factory, domain: str) -> None:  # type: ignore[no-untyped-def]
    """Nine peers with slices of one domain: no cut stands out, so the rule falls back to one cohort."""
    # Prepare
    records = signed_records(identity_factory, record_factory, domain_slices(9, (domain,)))

    # Execute
    cohorts = CohortMatcher("run").cohorts(records)

    # Assert
    assert [len(c) for c in cohorts] == [9]


def test_one_peer_joining_or_leaving_moves_nobody_else(identity_factory, record_factory) -> None:  # type: ignore[no-untyped-def]
    """Every one of 18 peers leaving in turn, and an outlier joining, leave the others' cohorts as they were."""
    # Prepare
    records = signed_records(identity_factory, record_factory, domain_slices(6))
    outlier = signed_records(identity_factory, record_factory, corpus_slices(4, 1)[3:])[0]  # DNA letters
    matcher = CohortMatcher("run")

    def together(cohorts: list[Cohort], ids: list[str]) -> set[frozenset[str]]:
        return {frozenset(m for m in c.members if m in ids) for c in cohorts} - {frozenset()}

    ids = [r.peer_id for r in records]
    before = together(matcher.cohorts(records), ids)

    # Execute
    left = [together(matcher.cohorts(records[:i] + records[i + 1 :]), ids) for i in range(len(records))]
    joined = matcher.cohorts([*records, outlier])

    # Assert
    assert len(before) == 3
    for i, after in enumerate(left):
        assert after == {frozenset(c - {ids[i]}) for c in before}
    assert together(joined, ids) == before and sum(map(len, joined)) == 19  # no cohort of one for the outlier


def test_no_cohort_is_smaller_than_the_secure_minimum(identity_factory, record_factory) -> None:  # type: ignore[no-untyped-def]
    """Two peers of a domain are too few to average securely: they join the nearest cohort instead."""
    # Prepare
    slices = domain_slices(4, ("drama", "docs"))[:6]  # 4 drama, 2 docs
    records = signed_records(identity_factory, record_factory, slices)

    # Execute
    cohorts = CohortMatcher("run", min_cohort=3).cohorts(records)
    pairs_allowed = CohortMatcher("run", min_cohort=2).cohorts(records)

    # Assert
    assert [len(c) for c in cohorts] == [6]
    assert sorted(len(c) for c in pairs_allowed) == [2, 4]


def test_a_bridging_record_merges_and_its_loss_splits_only_what_it_bridged(identity_factory, record_factory) -> None:  # type: ignore[no-untyped-def]
    """Single linkage: a record between two cohorts merges them; other cohorts and ids are untouched."""
    # Prepare
    records = signed_records(identity_factory, record_factory, corpus_slices(3, 2))
    a, b = (record.sketch_vector() for record in records[:3:2])
    bridge_vector = [x + y for x, y in zip(a, b, strict=True)]  # halfway between cohorts 0 and 1
    bridge = record_factory(identity_factory(None), sketch=encode_sketch(bridge_vector))
    matcher = CohortMatcher("run", 0.2)

    # Execute
    before, after = matcher.cohorts(records), matcher.cohorts([*records, bridge])

    # Assert
    assert sorted(len(c) for c in before) == [2, 2, 2]
    assert sorted(len(c) for c in after) == [2, 5]
    untouched = {(c.members, c.cohort_id) for c in before} & {(c.members, c.cohort_id) for c in after}
    assert len(untouched) == 1


@pytest.mark.parametrize(
    ("truth", "found", "expected"),
    [
        ([0, 0, 1, 1], [5, 5, 7, 7], 1.0),
        ([0, 0, 1, 1], [0, 1, 0, 1], -0.5),
        ([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2], 0.24),
    ],
)
def test_adjusted_rand_index_matches_known_values(truth: list[int], found: list[int], expected: float) -> None:
    """ARI of small labelings equals the textbook values (label names do not matter)."""
    assert adjusted_rand_index(truth, found) == pytest.approx(expected, abs=0.01)


# --- real peers ------------------------------------------------------------------------------------------


def views_agree(peers: list[SwarmPeer], run_id: str, matcher: CohortMatcher, count: int) -> list[Cohort] | None:
    """The cohorts every peer computes from its own listing, if all list ``count`` records and agree."""
    views = []
    for peer in peers:
        records = list_peers(peer.dht, run_id)
        if len(records) != count:
            return None
        views.append(matcher.cohorts(records))
    return views[0] if all(view == views[0] for view in views) else None


def test_twelve_peers_from_three_corpora_form_three_cohorts_and_a_thirteenth_moves_nobody(
    swarm_factory, record_factory: RecordFactory, run_id: str
) -> None:  # type: ignore[no-untyped-def]
    """12 real peers agree on 3 cohorts matching their text domains (ARI >= 0.9) within 30 s; a 13th joins its own."""
    # Prepare
    slices = domain_slices(5)  # 15 slices: 12 peers now, the 13th from domain 1 later
    first, thirteenth = [s for i, s in enumerate(slices) if i % 5 != 4], slices[9]
    peers = swarm_factory(13, run_ids=[run_id])
    matcher = CohortMatcher(run_id)

    def publish(peer: SwarmPeer, data: bytes) -> None:
        record = record_factory(peer.identity, sketch=encode_sketch(data_sketch(data)), ttl=60.0)
        assert publish_record(peer.dht, run_id, record.sign(peer.identity), ttl=60.0)

    # Execute
    started = time.monotonic()
    for peer, (_, data) in zip(peers, first, strict=False):
        publish(peer, data)
    cohorts = wait_until(
        lambda: views_agree(peers[:12], run_id, matcher, 12), 30.0, "12 peers to agree on the cohorts of 12 records"
    )
    seconds = time.monotonic() - started
    publish(peers[12], thirteenth[1])
    grown = wait_until(
        lambda: views_agree(peers, run_id, matcher, 13), 30.0, "13 peers to agree on the cohorts of 13 records"
    )

    # Assert
    ids = [peer.identity.peer_id for peer in peers]
    found = partition(cohorts)
    assert len(cohorts) == 3, cohorts
    assert adjusted_rand_index([k for k, _ in first], [found[p] for p in ids[:12]]) >= 0.9
    assert seconds < 30
    after = partition(grown)
    moved = [
        p
        for p in ids[:12]
        if {q for q in ids[:12] if after[q] == after[p]} != {q for q in ids[:12] if found[q] == found[p]}
    ]
    assert moved == []
    newcomer_cohort = {after[p] for p, (k, _) in zip(ids, first, strict=False) if k == thirteenth[0]}
    assert newcomer_cohort == {after[ids[12]]}


@pytest.mark.slow
def test_cohort_personalized_models_beat_one_global_model_on_their_own_corpus() -> None:
    """On 12 peers from 3 corpora, each cohort's own models reach a lower held-out loss than the global model."""
    # Execute
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "cohorts.py"), "--peers", "12", "--corpora", "3"]
    command += ["--rounds", "10", "--inner-steps", "20", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)

    # Assert
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ari"] >= 0.9 and summary["cohorts"] == 3
    personal, shared = summary["per_cohort_val_loss"], summary["global_only_val_loss"]
    assert personal.keys() == shared.keys() and len(personal) == 3
    assert all(personal[c] < shared[c] for c in personal), (personal, shared)


def test_status_shows_each_peers_cohort_and_distance(
    swarm_factory, record_factory: RecordFactory, run_id: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """`zen-node status` lists the cohorts (members, distance to centroid), in text and in --json, by the run's
    rule (here the fixed-threshold override from the config file)."""
    # Prepare
    slices = corpus_slices(2, 2)[:3]  # two peers of corpus 0, one of corpus 1
    peers = swarm_factory(3, run_ids=[run_id])
    for peer, (_, data) in zip(peers, slices, strict=True):
        record = record_factory(peer.identity, sketch=encode_sketch(data_sketch(data)))
        assert publish_record(peer.dht, run_id, record.sign(peer.identity))
    config = write_run_config(tmp_path / "run.toml", run_id, cohorts={"distance_threshold": THRESHOLD})
    flags = ["--initial-peers", peers[0].maddrs[0], "--host-maddrs", LOCALHOST_MADDR, "--config", str(config)]

    # Execute
    json_code = main(["status", *flags, "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    text_code = main(["status", *flags])
    text = capsys.readouterr().out

    # Assert
    assert json_code == text_code == 0
    by_peer = {row["peer_id"]: row for row in rows}
    first, second, third = (by_peer[p.identity.peer_id] for p in peers)
    assert first["cohort"] == second["cohort"] != third["cohort"]
    assert (first["cohort_size"], third["cohort_size"]) == (2, 1)
    assert 0 < first["distance_to_centroid"] < THRESHOLD and third["distance_to_centroid"] == 0
    assert "2 cohort(s)" in text and f"cohort {first['cohort']}: 2 member(s)" in text
    assert f"{peers[2].identity.peer_id}" in text.split(f"cohort {third['cohort']}")[1]
