"""Weights that agree: the replicas of a stage at one version must hold the same weights.

Why. A spot-check recomputes a server's forward with the weights that server publishes, so a
server that serves wrong weights and computes consistently with them passes it. Its replicas do
not share its weights, though: every replica of a stage starts from the same seeded weights and
applies the same steps (replication copies the committed gradients bit for bit), so honest
replicas that applied the same steps in the same order hold the same bits.

The report. A server answers the method ``weights`` with its stage's version, a *history* digest
and a *weights* digest (:func:`weights_digest`, BLAKE2b-32 over the parameters' shapes and float32
bytes), all taken together on its compute thread. The history is a hash chain over what changed
the weights, in order (:func:`chain_history`): each applied step's (trainer, step) and each
averaging round's new anchor. Two honest replicas at one version can differ when several trainers'
steps landed in different orders (AdamW steps do not commute); the history tells those apart, so
only replicas that claim the same version *and* history are compared. A joining replica copies
its donor's history with the state.

The verdict (:func:`compare_weights`). The reference class is the largest group of reports with
one (version, history), at least two strong and strictly larger than any other group. Within it,
a digest held by a strict majority is the agreed one; a member with another digest is in the
*minority*: the trainer treats it like a failed spot-check (avoids it, publishes a ban with
evidence, dht/bans.py). Reports outside the reference class (a lagging replica, a reordered one,
or a server lying about its history to dodge the comparison) are *unconfirmed*: tried after the
others until a later check confirms them, never banned on this signal. A trainer also checks the
weights a server publishes for a spot-check against the agreed digest of that version and
history, so a server cannot report one digest and compute with other weights.

Breakdown point: a strict majority of a stage's listed replicas. Colluding servers that are the
majority of a stage's replicas define the agreed digest (a Sybil can list many servers), and
differently built machines (CPU and CUDA) may round an AdamW step differently, which splits the
class: the check then bans nothing (no strict majority) rather than an honest minority of one
device kind, unless that kind is outnumbered; run a stage's replicas on one kind of device.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack
import torch

if TYPE_CHECKING:
    from node.sharding.messages import StageReply

DIGEST_BYTES = 32
HISTORY_CONTEXT = b"zen-federation/stage-history/v1"
INITIAL_HISTORY = hashlib.blake2b(HISTORY_CONTEXT, digest_size=DIGEST_BYTES).digest()


def weights_digest(tensors: Sequence[torch.Tensor]) -> bytes:
    """BLAKE2b-32 of the tensors' shapes and float32 bytes (a stage's parameters, in order)."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"zen-weights")
    for tensor in tensors:
        data = tensor.detach().float().cpu().contiguous()
        digest.update(repr(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
    return digest.digest()


def chain_history(history: bytes, event: str, *fields: object) -> bytes:
    """The history after one more change of the weights: ``event`` is "step" or "average"."""
    body = msgpack.packb([event, *fields], use_bin_type=True)
    return hashlib.blake2b(HISTORY_CONTEXT + history + body, digest_size=DIGEST_BYTES).digest()


@dataclass(frozen=True)
class WeightsReport:
    """What one server reported for its stage: version, history digest, weights digest."""

    version: int
    history: bytes
    digest: bytes


def reported_weights(reply: StageReply) -> WeightsReport | None:
    """The report a ``weights`` reply carries; None if it is not ok or its digests are not 32 bytes."""
    if not reply.ok or len(reply.digest) != DIGEST_BYTES or len(reply.history) != DIGEST_BYTES:
        return None
    return WeightsReport(reply.version, reply.history, reply.digest)


@dataclass
class WeightsVerdict:
    """The outcome of comparing the reports of one stage's servers."""

    version: int | None = None  # the reference class's version (None: no class large enough)
    history: bytes = b""  # the reference class's history
    agreed: bytes = b""  # the digest a strict majority of the class holds (b"": none)
    minority: set[str] = field(default_factory=set)  # same version and history, another digest
    unconfirmed: set[str] = field(default_factory=set)  # outside the reference class


def compare_weights(reports: Mapping[str, WeightsReport]) -> WeightsVerdict:
    """Find the agreed digest of the reference class and who departs from it (module docstring).

    Args:
        reports: each responding server's report, by PeerID (malformed ones left out by the caller).

    Returns:
        The verdict; empty (nothing agreed, nobody in the minority) when no class or digest has a
        strict majority.
    """
    classes: dict[tuple[int, bytes], list[str]] = collections.defaultdict(list)
    for peer, report in reports.items():
        classes[(report.version, report.history)].append(peer)
    ranked = sorted(classes.items(), key=lambda item: len(item[1]), reverse=True)
    if not ranked or len(ranked[0][1]) < 2 or (len(ranked) > 1 and len(ranked[1][1]) == len(ranked[0][1])):
        return WeightsVerdict()
    (version, history), members = ranked[0]
    counts = collections.Counter(reports[peer].digest for peer in members)
    agreed, count = counts.most_common(1)[0]
    verdict = WeightsVerdict(version, history, unconfirmed=set(reports) - set(members))
    if 2 * count > len(members):
        verdict.agreed = agreed
        verdict.minority = {peer for peer in members if reports[peer].digest != agreed}
    return verdict
