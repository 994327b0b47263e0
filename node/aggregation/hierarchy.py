"""Hierarchical averaging: cohort parameters within the cohort, global ones also across cohorts, local never.

Every parameter of the model carries one tag, from its name (``ParameterPartition``), or from its
canonical name: a Hugging Face causal LM's names (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, OPT, Phi
shapes, behind ``HFCausalLM`` and peft's LoRA wrapper) read as the built-in GPT's (``canonical_name``:
the final norm is ``ln_f``, decoder layer i is ``blocks.i``, the token and position embeddings
``wte`` and ``wpe``, the output head ``head``), so the default patterns tag the same roles in either
family and keep the run hash they had:

- ``local`` (``cohorts.local_patterns``, fnmatch): personalization layers. They are never handed to
  an aggregator, so they never leave the node; each node applies its own delta to them.
- ``cohort`` (``cohorts.cohort_patterns``): averaged every round within the node's cohort.
- ``global`` (everything else): averaged every round within the cohort, and every
  ``cohorts.global_every`` rounds also across cohorts, through the run-wide aggregator.

One round of ``HierarchicalAggregator.aggregate`` (it is the trainer's Aggregator; the trainer's
overlapped loop, staleness rule and round alignment are unchanged):

1. place this node (``prepare_round``, from the trainer's main thread): ``CohortMatcher`` over the
   run's live trainer records (dht/cohorts.py);
2. cohort step: the cohort and global tensors through the cohort's own aggregator, keyed
   ``<run_id>-cohort-<cohort id>`` (another hivemind matchmaking key, so groups form inside the
   cohort), weighted by samples;
3. cross-cohort step, on rounds that are multiples of ``global_every``: the global tensors, now
   holding the cohort's mean, through the run-wide aggregator with the importance weight
   ``samples * cohort_size ** -alpha``. A cohort's members together weigh
   ``cohort_samples * cohort_size ** -alpha``: alpha = 0 weighs cohorts by their samples, alpha = 1
   (with equal samples per peer) weighs every cohort the same, so small cohorts are weighted up.

A cohort smaller than the aggregation's ``min_group_size`` (a secure group needs 3) cannot average
on its own: its members skip the cohort step, train their cohort params solo, and still bring
their global params to the cross-cohort rounds (with their own delta in place of a cohort mean).

With user-level DP (a ``noise`` share) each ring adds its own noise share, sized for its own group,
and each ring's release is its own accounting event: the cohort ring releases under slot 0 of the
release ledger (node/secagg/privacy.py), the cross-cohort ring under slot 1 (``CROSS_COHORT_RING``).
Counting the cross-cohort release is an upper bound when the cohort ring decoded (its input is then
the cohort's noised mean, post-processing), and exact when it did not (our own clipped update). A round
whose cohort ring released no mean for us while the cross-cohort ring did would otherwise apply our
own un-noised update to the cohort params, which ``StateSharer`` serves: under DP that part is
withheld (zero in the mean, all of it in ``residual``), so it stays in the local model, to be sent
with a later cohort group, as a solo round's update does (node/training/privacy.py).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import hivemind
import torch

from dht import Cohort, CohortMatcher, list_peers
from node.aggregation.base import AggregationError, AggregationResult, Aggregator, Lineage, StateDigest
from node.aggregation.factory import make_aggregator
from node.config import CohortConfig, ConfigError
from node.secagg.privacy import NoiseShare

logger = logging.getLogger(__name__)

TAGS = ("global", "cohort", "local")
CROSS_COHORT_RING = 1  # the release ledger's slot of the cross-cohort ring (the cohort ring's is 0)


@dataclass(frozen=True)
class ParameterPartition:
    """Indices (in ``model.named_parameters()`` order) of each tag's parameters."""

    names: tuple[str, ...]
    global_: tuple[int, ...]
    cohort: tuple[int, ...]
    local: tuple[int, ...]

    @property
    def shared(self) -> tuple[int, ...]:
        """What the cohort step averages: cohort and global params, in model order."""
        return tuple(sorted(self.global_ + self.cohort))

    def tag(self, index: int) -> str:
        return "local" if index in self.local else "cohort" if index in self.cohort else "global"


_BACKBONE = r"(?:model\.decoder|model|transformer|gpt_neox)"  # where HF causal LMs keep their decoder stack
_WRAPPERS = re.compile(r"^(?:hf_model\.)?(?:base_model\.model\.)?")  # HFCausalLM (node/model_hf.py), peft's LoRA
_ROLES = (  # an HF causal LM's module names -> the built-in GPT's (node/model.py)
    (re.compile(rf"^{_BACKBONE}\.(?:layers|h|blocks)\.(\d+)\."), r"blocks.\1."),
    (re.compile(rf"^{_BACKBONE}\.(?:norm|ln_f|final_layer_norm|final_layernorm)\."), "ln_f."),
    (re.compile(rf"^{_BACKBONE}\.(?:embed_tokens|wte|embed_in)\."), "wte."),
    (re.compile(rf"^{_BACKBONE}\.(?:wpe|embed_positions)\."), "wpe."),
    (re.compile(r"^(?:lm_head|embed_out)\."), "head."),
)


def canonical_name(name: str) -> str:
    """A parameter's name as the built-in GPT would call its role: ``hf_model.model.layers.3.mlp.up_proj.weight``
    -> ``blocks.3.mlp.up_proj.weight``, ``hf_model.transformer.ln_f.bias`` -> ``ln_f.bias``; the GPT's own
    names (and names of no known role) are unchanged."""
    stripped = _WRAPPERS.sub("", name, count=1)
    for pattern, role in _ROLES:
        renamed, found = pattern.subn(role, stripped, count=1)
        if found:
            return renamed
    return name


def partition_parameters(names: Sequence[str], config: CohortConfig) -> ParameterPartition:
    """Tag each parameter name: ``local`` if a local pattern matches it or its ``canonical_name``, else ``cohort``
    if a cohort pattern does, else ``global``.

    Raises:
        ConfigError: every parameter would be local (nothing would be averaged).
    """
    tags = []
    for name in names:
        both = (name, canonical_name(name))
        if any(fnmatch.fnmatchcase(n, p) for n in both for p in config.local_patterns):
            tags.append("local")
        elif any(fnmatch.fnmatchcase(n, p) for n in both for p in config.cohort_patterns):
            tags.append("cohort")
        else:
            tags.append("global")
    if tags and all(tag == "local" for tag in tags):
        raise ConfigError(f"cohorts.local_patterns {config.local_patterns} match every parameter; nothing is averaged")
    indices = {tag: tuple(i for i, t in enumerate(tags) if t == tag) for tag in TAGS}
    return ParameterPartition(tuple(names), indices["global"], indices["cohort"], indices["local"])


def _moved(peer_id: str, before: Cohort, now: Cohort) -> bool:
    """Whether ``peer_id`` moved from ``before`` to another cohort: fewer than half of its co-members now were
    with it before (a cohort's id follows its smallest PeerID, so a node that is the smallest member of both
    keeps the id while its company changes entirely)."""
    others = set(now.members) - {peer_id}
    return 2 * len(others & set(before.members)) < len(others)


def importance_weight(samples: float, cohort_size: int, alpha: float) -> float:
    """A member's weight in cross-cohort averaging: ``samples * cohort_size ** -alpha`` (module docstring)."""
    return float(samples) * max(1, cohort_size) ** -alpha


def cohort_matcher(run_id: str, cohorts: CohortConfig, min_group_size: int) -> CohortMatcher:
    """The run's cohort rule: adaptive unless ``cohorts.distance_threshold`` overrides it."""
    return CohortMatcher(
        run_id, cohorts.distance_threshold, min_cohort=min_group_size, min_separation=cohorts.min_separation
    )


AggregatorFactory = Callable[..., Aggregator]  # make_aggregator's signature


class HierarchicalAggregator(Aggregator):
    """The trainer's Aggregator when cohorts are enabled (the round in the module docstring).

    Args:
        dht: the node's running DHT.
        run_id: the run (its records are read; its aggregation keys derive from it).
        run_hash: only records with this run hash are clustered.
        peer_id: this node's PeerID.
        templates: one tensor per model parameter (shapes and dtypes of the update).
        partition: the tags of the parameters.
        cohorts: the run's cohort settings.
        min_group_size: the smallest group an aggregator accepts; smaller cohorts skip the cohort step.
        make: builds an inner aggregator, ``make(dht, run_id, templates, noise=..., **kwargs)``; kwargs are
            passed on.
        noise: this node's user-level DP noise share (None: none); the cross-cohort ring gets a copy that
            releases under ``CROSS_COHORT_RING``.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        run_hash: str,
        peer_id: str,
        templates: Sequence[torch.Tensor],
        partition: ParameterPartition,
        cohorts: CohortConfig,
        min_group_size: int,
        make: AggregatorFactory = make_aggregator,
        noise: NoiseShare | None = None,
        **kwargs: Any,
    ):
        self.dht, self.run_id, self.run_hash, self.peer_id = dht, run_id, run_hash, peer_id
        self.partition, self.cohorts, self.min_group_size = partition, cohorts, min_group_size
        self.matcher = cohort_matcher(run_id, cohorts, min_group_size)
        self._make, self._kwargs, self._noise = make, kwargs, noise
        self._shared_templates = [templates[i] for i in partition.shared]
        cross_noise = None if noise is None else replace(noise, ring=CROSS_COHORT_RING)
        self._global = (
            make(dht, run_id, [templates[i] for i in partition.global_], noise=cross_noise, **kwargs)
            if partition.global_
            else None
        )
        self._cohort_aggregator: tuple[str, Aggregator] | None = None
        self._residual: torch.Tensor | None = None  # the last aggregate's, over every parameter (``residual``)
        self._lock = threading.Lock()
        self.cohort: Cohort | None = None  # where this node placed itself at its last round
        self._moved = False  # a placement changed this node's cohort since ``moved()`` was last asked
        self.crossed = False  # the last aggregate's cross-cohort ring gave us its mean

    def place(self) -> Cohort | None:
        """Place this node from the records it reads now, and ready its cohort's aggregator.

        Call it from the main thread before each round's ``aggregate`` (hivemind starts an averager's
        process only from the main thread), while no aggregation is in flight. Returns None until this
        node's own record is listed.
        """
        before = self.cohort
        cohorts = self.matcher.cohorts(list_peers(self.dht, self.run_id), self.run_hash)
        self.cohort = next((c for c in cohorts if self.peer_id in c.members), None)
        if self.cohort is not None and self._global is not None:  # the cross-cohort ring waits to span two cohorts
            self._global.declare_cohort(self.cohort.cohort_id, len(cohorts))
        moved = before is not None and self.cohort is not None and _moved(self.peer_id, before, self.cohort)
        self._moved = self._moved or moved  # reported by ``moved()`` until asked, however often we are placed
        wanted = self.cohort.cohort_id if self.cohort is not None and self._can_average(self.cohort) else None
        with self._lock:
            if self._cohort_aggregator is not None and self._cohort_aggregator[0] != wanted:
                logger.info(f"leaving cohort {self._cohort_aggregator[0]} for {wanted}")
                self._cohort_aggregator[1].shutdown()
                self._cohort_aggregator = None
            if wanted is not None and self._cohort_aggregator is None:
                key = f"{self.run_id}-cohort-{wanted}"
                made = self._make(self.dht, key, self._shared_templates, noise=self._noise, **self._kwargs)
                self._cohort_aggregator = (wanted, made)
        return self.cohort

    def prepare_round(self, round_no: int) -> None:
        """Place this node in its cohort for ``round_no`` (``place()``)."""
        self.place()

    @property
    def cohort_id(self) -> str | None:
        return self.cohort.cohort_id if self.cohort is not None else None

    @property
    def cohort_members(self) -> tuple[str, ...] | None:
        return self.cohort.members if self.cohort is not None else None

    def moved(self) -> bool:
        moved, self._moved = self._moved, False
        return moved

    def declare_state(self, digest_of: StateDigest) -> None:
        """Each ring declares the lineage of the parameters it carries: the cohort ring the cohort and global
        ones, the cross-cohort ring the global ones (merged by node/training/lineage.py)."""
        with self._lock:
            step = self._cohort_aggregator
        rings = ((step[1] if step else None, self.partition.shared), (self._global, self.partition.global_))
        for ring, indices in rings:
            if ring is not None:
                digest = digest_of(indices)
                ring.declare_state(lambda _, digest=digest: digest)  # type: ignore[misc]

    def _can_average(self, cohort: Cohort) -> bool:
        return len(cohort) >= self.min_group_size and bool(self.partition.shared)

    def aggregate(self, round_no: int, tensors: Sequence[torch.Tensor], weight: float) -> AggregationResult | None:
        """The round in the module docstring, in the cohort found by the last ``place()``."""
        if len(tensors) != len(self.partition.names):
            raise ValueError(f"expected {len(self.partition.names)} tensors (one per parameter), got {len(tensors)}")
        with self._lock:
            cohort, step = self.cohort, self._cohort_aggregator
        size = len(cohort) if cohort is not None else 1
        results: list[AggregationResult] = []
        rings: list[tuple[Aggregator, tuple[int, ...]]] = []  # the steps that averaged, with what they carried
        self._residual = None
        cohort_averaged = False  # whether the cohort ring gave us its (noised, under DP) mean
        if step is not None:
            shared = [tensors[i] for i in self.partition.shared]  # the same tensors: averaged in place
            result = step[1].aggregate(round_no, shared, weight)
            if result is None:
                logger.warning(f"round {round_no}: no group formed in cohort {step[0]}")
            else:
                results.append(result)
                rings.append((step[1], self.partition.shared))
                cohort_averaged = True
        if self._global is not None and round_no % self.cohorts.global_every == 0:
            global_ = [tensors[i] for i in self.partition.global_]
            try:
                result = self._global.aggregate(round_no, global_, importance_weight(weight, size, self.cohorts.alpha))
            except AggregationError as e:  # the cohort's mean (if any) still stands
                logger.warning(f"round {round_no}: cross-cohort averaging failed: {e}")
                result = None
            if result is not None:
                results.append(result)
                rings.append((self._global, self.partition.global_))
        self.crossed = any(ring is self._global for ring, _ in rings)
        if not results:
            return None
        withheld = self.partition.cohort if self._noise is not None and not cohort_averaged else ()
        self._residual = self._combined_residual(tensors, rings, withheld)
        for i in withheld:  # DP: our un-noised delta must not reach the served cohort params (module docstring)
            tensors[i].zero_()
        lineages = tuple(
            Lineage(tuple(indices), r.lineages[0].peers, r.lineages[0].states)
            for r, (_, indices) in zip(results, rings, strict=True)
            if r.lineages
        )
        if len(results) == 1:  # one ring's group: its id, keys and certificate stand for the round (ledger receipts)
            return replace(results[0], lineages=lineages)
        peers = tuple(sorted({p for r in results for p in r.peers}))
        return AggregationResult(round=round_no, group_size=results[0].group_size, peers=peers, lineages=lineages)

    @property
    def residual(self) -> torch.Tensor | None:
        """What the last round's rings left out, over every parameter in model order (None: they took all).

        Each ring keeps its own error feedback (compression residuals per ring): a cohort or global
        parameter gets what the cohort ring left out of the node's update, and on cross-cohort rounds a
        global parameter also what the run-wide ring left out of the cohort mean the node brought to it;
        the trainer adds both to the next round's update. Local parameters were never sent: zero. Under
        DP, cohort parameters that no cohort ring averaged this round are left out whole (module docstring).
        """
        return self._residual

    @staticmethod
    def _combined_residual(
        tensors: Sequence[torch.Tensor],
        rings: Sequence[tuple[Aggregator, tuple[int, ...]]],
        withheld: Sequence[int] = (),
    ) -> torch.Tensor | None:
        """The rings' residuals over every parameter, plus the whole of ``tensors[i]`` for ``withheld`` i."""
        pieces = [torch.zeros(t.numel(), dtype=torch.float32) for t in tensors]
        left_out = bool(withheld)
        for i in withheld:
            pieces[i] += tensors[i].detach().reshape(-1).to("cpu", torch.float32)
        for ring, indices in rings:
            residual = ring.residual
            if residual is None:
                continue
            left_out = True
            for i, piece in zip(indices, residual.split([tensors[i].numel() for i in indices]), strict=True):
                pieces[i] += piece.to(torch.float32)
        return torch.cat(pieces) if left_out else None

    def shutdown(self) -> None:
        with self._lock:
            for aggregator in (self._global, self._cohort_aggregator[1] if self._cohort_aggregator else None):
                if aggregator is not None:
                    aggregator.shutdown()
            self._cohort_aggregator = None
