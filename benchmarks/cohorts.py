"""Cohorts: do peers with similar data find each other, and does personalization pay?

One invocation, on 127.0.0.1::

    python benchmarks/cohorts.py --peers 12 --corpora 3 --json
    python benchmarks/domain_corpora.py --out /tmp/domains   # real text: drama, docs, legal
    python benchmarks/cohorts.py --corpora-dir /tmp/domains --peers 9 --bytes-per-peer 40000 --json

(a) Discovery with real peers: N hivemind DHT peers, each with a slice of one of K clearly different
    generated corpora (``node.data.CORPUS_STYLES``: English words, digits, Cyrillic, DNA), or of the
    domains of ``--corpora-dir`` (one sub-folder per domain, contiguous slices), publish
    signed PeerRecords with their data sketch (node/sketch.py). Every peer runs the cohort rule
    (dht/cohorts.py) over the records it lists until all N views agree. ``ari`` is the adjusted Rand
    index of the agreed cohorts against the corpora; ``seconds_to_stable`` runs from the first
    publication to the agreement (DHT startup excluded).
(b) Personalization, in one process: the same N peers train the run's GPT for ``--rounds`` outer
    rounds of ``--inner-steps`` AdamW steps on their own slices, twice on the same batches:
    - hierarchical: the cohorts found in (a), the run's default tags (``blocks.*`` cohort,
      ``ln_f.*`` local, embeddings global), cohort means every round, cross-cohort means with
      importance weights every ``--global-every`` rounds (node/aggregation/hierarchy.py's functions);
    - global only: every parameter averaged over all N peers every round (plain DiLoCo).
    The averaging is the exact weighted mean the secure all-reduce computes (its quantization error is
    below 1e-6), synchronously (no overlap), so this part measures the model, not the network.
    ``per_cohort_val_loss`` / ``global_only_val_loss``: each cohort's mean held-out loss on its own
    members' data (the last 10% of each slice), of the members' own models / of the global model.

JSON fields: ``ari``, ``seconds_to_stable``, ``cohorts`` (found), ``per_cohort_val_loss``,
``global_only_val_loss`` (both keyed by cohort id), ``mean_cohort_val_loss``,
``mean_global_only_val_loss``, and the setup.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hivemind.utils import get_dht_time  # noqa: E402

from dht import (  # noqa: E402
    Capacity,
    Cohort,
    CohortMatcher,
    NodeIdentity,
    PeerRecord,
    SwarmConfig,
    adjusted_rand_index,
    encode_sketch,
    list_peers,
    publish_record,
    start_dht,
)
from node.aggregation.hierarchy import ParameterPartition, importance_weight, partition_parameters  # noqa: E402
from node.config import CohortConfig, ModelConfig  # noqa: E402
from node.data import CORPUS_STYLES, ByteBatches, generate_corpus  # noqa: E402
from node.model import build_model  # noqa: E402
from node.sketch import data_sketch  # noqa: E402

RUN_ID = "zen-cohorts"
RUN_HASH = "ab" * 16
EVAL_BATCHES = 8


def peer_data(peers: int, corpora: int, size: int) -> list[tuple[int, bytes]]:
    """(true corpus, slice) per peer: peer i draws from corpus i mod K."""
    counts = [len(range(k, peers, corpora)) for k in range(corpora)]
    texts = [generate_corpus(counts[k] * size, seed=k, style=CORPUS_STYLES[k]) for k in range(corpora)]
    taken = [0] * corpora
    out = []
    for i in range(peers):
        k = i % corpora
        out.append((k, texts[k][taken[k] * size : (taken[k] + 1) * size]))
        taken[k] += 1
    return out


def dir_data(folder: Path, peers: int, size: int) -> tuple[list[tuple[int, bytes]], list[str]]:
    """(domain index, slice) per peer from ``folder/<domain>/`` (its ``.txt`` files, in name order), peer i
    drawing contiguous slices of domain i mod K; and the domain names.

    Raises:
        SystemExit: the folder has no domain with text, or a domain has too little for its peers.
    """
    domains = sorted(d for d in folder.iterdir() if d.is_dir() and any(d.glob("*.txt"))) if folder.is_dir() else []
    if not domains:
        raise SystemExit(f"--corpora-dir {folder}: no sub-folder with .txt files (one sub-folder per domain)")
    texts = [b"\n".join(f.read_bytes() for f in sorted(d.glob("*.txt"))) for d in domains]
    out, taken = [], [0] * len(domains)
    for i in range(peers):
        k = i % len(domains)
        piece = texts[k][taken[k] * size : (taken[k] + 1) * size]
        if len(piece) < size:
            raise SystemExit(f"--corpora-dir: {domains[k]} has {len(texts[k])} bytes, too few for its peers")
        out.append((k, piece))
        taken[k] += 1
    return out, [d.name for d in domains]


def discover(
    data: list[tuple[int, bytes]], threshold: float | None, timeout: float
) -> tuple[list[Cohort], list[str], float]:
    """Real DHT peers publish their sketches and cluster until every view agrees (part a)."""
    matcher = CohortMatcher(RUN_ID, threshold)
    dhts: list[Any] = []
    with tempfile.TemporaryDirectory() as folder:
        try:
            identities, initial = [], []
            for i in range(len(data)):
                identity = NodeIdentity.load_or_create(Path(folder) / f"peer{i}")
                swarm = SwarmConfig(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial)
                dhts.append(start_dht(swarm, identity, [RUN_ID]))
                initial = initial or [str(m) for m in dhts[0].get_visible_maddrs()]
                identities.append(identity)
            started = time.monotonic()
            for dht, identity, (_, text) in zip(dhts, identities, data, strict=True):
                publish_record(dht, RUN_ID, record(identity, data_sketch(text)).sign(identity))
            while True:
                views = [matcher.cohorts(list_peers(dht, RUN_ID)) for dht in dhts]
                if all(sum(map(len, v)) == len(data) for v in views) and all(v == views[0] for v in views):
                    return views[0], [i.peer_id for i in identities], time.monotonic() - started
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"the {len(data)} peers did not agree on cohorts within {timeout}s")
                time.sleep(0.2)
        finally:
            for dht in reversed(dhts):
                dht.shutdown()


def record(identity: NodeIdentity, sketch: list[float]) -> PeerRecord:
    return PeerRecord(
        peer_id=identity.peer_id,
        signing_key=identity.signing_public_key,
        binding=identity.binding,
        x25519_key=identity.x25519_public_key,
        version="0.1.0",
        run_hash=RUN_HASH,
        capacity=Capacity(),
        sketch=encode_sketch(sketch),
        roles=("trainer",),
        round=0,
        state_digest=b"",
        timestamp=get_dht_time(),
    )


class SimulatedPeer:
    """One peer's model, global params, outer optimizer, batches and held-out batches."""

    def __init__(self, model_config: ModelConfig, text: bytes, args: argparse.Namespace, seed: int):
        split = int(len(text) * 0.9)
        self.model = build_model(model_config, seed=0)
        self.global_params = [torch.nn.Parameter(p.detach().clone()) for p in self.model.parameters()]
        self.outer = torch.optim.SGD(self.global_params, lr=0.7, momentum=0.9, nesterov=True)
        self.inner = torch.optim.AdamW(self.model.parameters(), lr=args.inner_lr)
        self.batches = ByteBatches(text[:split], model_config.context, args.batch_size, seed=seed)
        held_out = ByteBatches(text[split:], model_config.context, args.batch_size, seed=1234)
        self.eval_set = [held_out.next() for _ in range(EVAL_BATCHES)]

    def inner_phase(self, steps: int) -> list[torch.Tensor]:
        """AdamW steps from the global params; returns the delta (global - local)."""
        with torch.no_grad():
            for local, param in zip(self.model.parameters(), self.global_params, strict=True):
                local.copy_(param)
        for _ in range(steps):
            loss = self.model(*self.batches.next())
            self.inner.zero_grad(set_to_none=True)
            loss.backward()
            self.inner.step()
        with torch.no_grad():
            return [g.detach() - p.detach() for g, p in zip(self.global_params, self.model.parameters(), strict=True)]

    def outer_step(self, mean: list[torch.Tensor]) -> None:
        for param, grad in zip(self.global_params, mean, strict=True):
            param.grad = grad.clone()
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)

    def val_loss(self, params: list[torch.nn.Parameter] | None = None) -> float:
        with torch.no_grad():
            for local, param in zip(self.model.parameters(), params or self.global_params, strict=True):
                local.copy_(param)
            return sum(float(self.model(x, y)) for x, y in self.eval_set) / len(self.eval_set)


def weighted_mean(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * v for w, v in zip(weights, vectors, strict=True)) / sum(weights)


def train(
    peers: list[SimulatedPeer],
    groups: list[list[int]],
    partition: ParameterPartition | None,
    args: argparse.Namespace,
) -> None:
    """DiLoCo rounds; ``partition`` None averages everything over all peers (global only)."""
    samples = float(args.inner_steps * args.batch_size)
    for round_no in range(1, args.rounds + 1):
        deltas = [peer.inner_phase(args.inner_steps) for peer in peers]
        means = [[d.clone() for d in delta] for delta in deltas]
        if partition is None:
            for j in range(len(deltas[0])):
                mean = weighted_mean([d[j] for d in deltas], [samples] * len(peers))
                for m in means:
                    m[j] = mean
        else:
            for members in groups:  # cohort step (a cohort below 3 peers could not form a secure group)
                for j in partition.shared if len(members) >= 3 else ():
                    mean = weighted_mean([deltas[i][j] for i in members], [samples] * len(members))
                    for i in members:
                        means[i][j] = mean
            if round_no % args.global_every == 0:  # cross-cohort step
                weights = [0.0] * len(peers)
                for members in groups:
                    for i in members:
                        weights[i] = importance_weight(samples, len(members), args.alpha)
                for j in partition.global_:
                    mean = weighted_mean([m[j] for m in means], weights)
                    for m in means:
                        m[j] = mean
        for peer, mean in zip(peers, means, strict=True):
            peer.outer_step(mean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=12, help="peers, e.g. 12")
    parser.add_argument("--corpora", type=int, default=3, help=f"distinct corpora, 1-{len(CORPUS_STYLES)}, e.g. 3")
    parser.add_argument("--bytes-per-peer", type=int, default=20_000, help="data per peer, e.g. 20000")
    parser.add_argument("--rounds", type=int, default=10, help="outer rounds of the training part, e.g. 10")
    parser.add_argument("--inner-steps", type=int, default=20, help="AdamW steps per round, e.g. 20")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step, e.g. 8")
    parser.add_argument("--inner-lr", type=float, default=3e-3, help="AdamW learning rate, e.g. 0.003")
    parser.add_argument("--global-every", type=int, default=4, help="cross-cohort averaging period, e.g. 4")
    parser.add_argument("--alpha", type=float, default=0.5, help="importance weight exponent, e.g. 0.5")
    parser.add_argument(
        "--threshold", type=float, default=None, help="fixed-rule distance threshold (default: adaptive rule), e.g. 0.1"
    )
    parser.add_argument(
        "--corpora-dir",
        type=Path,
        default=None,
        help="one sub-folder of .txt files per domain, split among the peers (instead of generated corpora), "
        "e.g. /tmp/domains from benchmarks/domain_corpora.py",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for agreement, e.g. 60")
    parser.add_argument("--json", action="store_true", help="print one JSON line, e.g. --json")
    args = parser.parse_args()
    if not 1 <= args.corpora <= len(CORPUS_STYLES) or args.peers < args.corpora:
        parser.error(f"--corpora must be in [1, {len(CORPUS_STYLES)}] and at most --peers")
    torch.set_num_threads(1)

    if args.corpora_dir is not None:
        data, domains = dir_data(args.corpora_dir, args.peers, args.bytes_per_peer)
        args.corpora = len(domains)
    else:
        data = peer_data(args.peers, args.corpora, args.bytes_per_peer)
    cohorts, ids, seconds = discover(data, args.threshold, args.timeout)
    found = {member: c.cohort_id for c in cohorts for member in c.members}
    ari = adjusted_rand_index([k for k, _ in data], [found[p] for p in ids])
    groups = [[ids.index(m) for m in c.members] for c in cohorts]

    model_config = ModelConfig(d_model=32, context=32)
    names = [name for name, _ in build_model(model_config, seed=0).named_parameters()]
    partition = partition_parameters(names, CohortConfig(enabled=True, global_every=args.global_every))
    started = time.monotonic()
    personal = [SimulatedPeer(model_config, text, args, seed=i) for i, (_, text) in enumerate(data)]
    train(personal, groups, partition, args)
    shared = [SimulatedPeer(model_config, text, args, seed=i) for i, (_, text) in enumerate(data)]
    train(shared, [list(range(len(shared)))], None, args)
    per_cohort = {
        c.cohort_id: sum(personal[i].val_loss() for i in g) / len(g) for c, g in zip(cohorts, groups, strict=True)
    }
    global_only = {
        c.cohort_id: sum(shared[i].val_loss() for i in g) / len(g) for c, g in zip(cohorts, groups, strict=True)
    }
    summary = {
        "peers": args.peers,
        "corpora": args.corpora,
        "ari": round(ari, 4),
        "seconds_to_stable": round(seconds, 2),
        "cohorts": len(cohorts),
        "per_cohort_val_loss": {k: round(v, 4) for k, v in per_cohort.items()},
        "global_only_val_loss": {k: round(v, 4) for k, v in global_only.items()},
        "mean_cohort_val_loss": round(sum(per_cohort.values()) / len(per_cohort), 4),
        "mean_global_only_val_loss": round(sum(global_only.values()) / len(global_only), 4),
        "rounds": args.rounds,
        "inner_steps": args.inner_steps,
        "global_every": args.global_every,
        "alpha": args.alpha,
        "training_seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:28s} {value}")


if __name__ == "__main__":
    main()
