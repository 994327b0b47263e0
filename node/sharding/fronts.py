"""Averaging the trainers' own parts of a sharded run: embeddings, first blocks and head.

A sharded trainer keeps its front (token and position embeddings, the first ``local_blocks``
blocks) and its head; the middle blocks live on stage servers, which average among themselves
(averaging.py). Without this module each trainer's front and head stayed its own: N trainers
trained N different embeddings and heads around one shared middle, so no trainer held the model
the run trained. Now, every round (``train.inner_steps`` steps), the trainers average their parts
as data-parallel trainers average their models (node/training/outer.py, with outer lr 1 and no
momentum: plain averaging of the round's change):

1. each trainer's update is ``anchor - params``, the change of its parts since the parts it held
   after the last averaged round (the anchor; at the start: the run's seeded initialization,
   the same on every trainer);
2. the updates are averaged, weighted by the round's samples, through the run's aggregator
   (``aggregation.mode``: the masked all-reduce by default, groups of at least
   ``aggregation.min_group_size``, under the run's own key: the run's stage servers average under
   ``<run_id>-stage<k>``, and a sharded run has no data-parallel trainers);
3. each member sets ``params = anchor - mean`` and takes it as its new anchor. Members that
   held the same anchor leave bit-identical (the secure ring decodes the same bits on every
   member); AdamW's moments stay each trainer's own, as in DiLoCo.

A round is averaged only while at least ``min_group_size`` trainers of the run are listed (a
secure sum of two would reveal both inputs); otherwise, or when no group forms in time, the
trainer keeps its parts and its anchor, so its next group averages the change since then. With
``[run.compression]`` what the ring left out of our update (``residual``) is added to the next
round's, as a data-parallel trainer does.

With ``[run.cohorts]`` the aggregator is the hierarchical one (node/aggregation/hierarchy.py) over
the trainers' parts: the cohort rule tags them by name (``local_patterns``: never sent;
``cohort_patterns``: averaged within the cohort; the rest also across cohorts every
``global_every`` rounds), and trainers place themselves in cohorts from their signed records'
sketches. The blocks on stage servers are shared by every cohort: the patterns apply to the
trainers' parts only (a served block they match is still trained by every cohort's trainers,
logged at start). Global parts keep their anchor from one cross-cohort round to the next: a cohort
ring averages each member's change since that anchor (so it carries the cohort's earlier means
too), and the cross-cohort ring's mean, the same bits on every member, moves every trainer of
every cohort to one set of global parts; cohort and local parts re-anchor each round. A trainer
that joins late takes the averaged parts and their anchors from the trainers ahead of it, of its own
cohort (node/sharding/catchup.py).

The gate (synchronous mode; node/training/gate.py): before a mean is applied the trainer evaluates its held-out
loss with the averaged parts at their anchors and the stages as they are now, then with the mean applied, and
keeps its own parts if the step raises it by more than ``aggregation.gate_tolerance`` (mode ``rejected``). The
reference is evaluated anew each round (the stages moved), so a poisoner can raise the loss by just under the
tolerance every round. Summing the applied steps' rises does not close that: honest steps rise too, a little,
round after round (the stages were trained with each trainer's own parts, not with the mean), and a sum capped
at the tolerance rejected 22-30 of 100 honest rounds per trainer (BENCHMARKS.md, benchmarks/sharded_fronts.py).

Overlap (``sharding.overlap_averaging``, off by default: BENCHMARKS.md shows it even with waiting
in loss, not better). ``send`` starts the round's averaging on a worker thread and the trainer
trains on; ``land`` applies the mean as ``params = (anchor - mean) + (params - sent)``, keeping the
steps trained since the update was taken, at the first step after it lands or at the next round's
end at the latest. Members then share the anchor, not the parameters.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import hivemind
import torch

from dht import NodeIdentity, PeerRecord
from node.aggregation.base import AggregationError, AggregationResult, Aggregator
from node.aggregation.factory import make_aggregator
from node.aggregation.hierarchy import HierarchicalAggregator, partition_parameters
from node.config import ConfigError, RunConfig
from node.sharding.stages import stage_ranges
from node.training.gate import admits, l2_norm, norm_admits, norm_ratio_for
from node.training.privacy import compression_bound
from node.training.report import RoundOutcome

logger = logging.getLogger(__name__)


@dataclass
class _Sent:
    """A round's update as it was sent, with the parameters it was taken from (``_apply`` keeps what came after)."""

    params: list[torch.Tensor]
    updates: list[torch.Tensor]  # replaced in place by the group's mean


class FrontAverager:
    """The per-round averaging of one sharded trainer's own parts (module docstring).

    Build it from the main thread (hivemind starts an averager's process only from there).

    Args:
        dht: the trainer's running DHT.
        run: the run (its id, aggregation, compression and cohort settings, and samples per round).
        identity: the trainer's identity (signs its secure-aggregation messages).
        parameters: the trainer's own parameters by name, in a fixed order (the same on every trainer).
        stop_event: when set, a pending round gives up.
        evaluate: the held-out loss of the trainer's parts as they are now; given, a synchronous round's mean is
            gated (``aggregation.gate_tolerance``, module docstring).
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run: RunConfig,
        identity: NodeIdentity,
        parameters: Sequence[tuple[str, torch.nn.Parameter]],
        stop_event: threading.Event,
        evaluate: Callable[[], float] | None = None,
    ):
        self.run, self.peer_id = run, identity.peer_id
        self.names = [name for name, _ in parameters]
        self.parameters = [param for _, param in parameters]
        with torch.no_grad():
            self.anchor = [p.detach().clone() for p in self.parameters]
            self.carry = [torch.zeros_like(p, dtype=torch.float32, device="cpu") for p in self.parameters]
        templates = [p.detach().float().cpu() for p in self.parameters]
        options: dict[str, Any] = dict(
            config=run.aggregation,
            identity=identity,
            weight_bound=float(run.train.inner_steps * run.train.batch_size),
            stop_event=stop_event,
            compression=run.compression,
            compression_bound=compression_bound(run),
        )
        self.aggregator: Aggregator
        self.global_: frozenset[int] = frozenset(range(len(self.parameters)))  # anchored at cross-cohort rounds
        self.shared: tuple[int, ...] = tuple(range(len(self.parameters)))  # averaged (not local): a joiner takes them
        if run.cohorts.enabled:
            partition = partition_parameters(self.names, run.cohorts)
            self.global_, self.shared = frozenset(partition.global_), tuple(partition.shared)
            size = run.aggregation.min_group_size
            self.aggregator = HierarchicalAggregator(
                dht, run.run_id, run.digest(), self.peer_id, templates, partition, run.cohorts, size, **options
            )
            served = [i for stage in stage_ranges(run.model.n_layer, run.sharding) for i in stage]
            logger.info(
                f"cohorts: blocks {served[0]}-{served[-1]} live on stage servers and are shared by every cohort; "
                "the cohort patterns tag this trainer's own parts only"
            )
        else:
            self.aggregator = make_aggregator(dht, run.run_id, templates, **options)
        self.stats: Counter[str] = Counter()  # round outcomes: averaged, alone, rejected
        gated = evaluate is not None and not run.sharding.overlap_averaging  # overlapped: lands on moved parts
        self.tolerance = run.aggregation.gate_tolerance if gated else 0.0
        self.norm_ratio = norm_ratio_for(run) if gated else 0.0
        self._own_norm = 0.0  # the L2 norm of the update we last sent (the mean overwrites it)
        self._evaluate = evaluate or (lambda: float("nan"))
        self.outcome = RoundOutcome.SOLO  # how the last round ended (GROUP, REJECTED by the gate, or SOLO)
        self.last_round: AggregationResult | None = None  # the last round's group, applied or rejected (receipts)
        self.last: AggregationResult | None = None  # the last round that averaged
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zen-fronts")  # ``send``'s rounds
        self._in_flight: tuple[int, Future[AggregationResult | None], _Sent] | None = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this averager: the anchors and the compression carry (on the CPU)."""
        return {"anchor": [a.detach().cpu() for a in self.anchor], "carry": [c.clone() for c in self.carry]}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back ``state()`` from a checkpoint.

        Raises:
            ConfigError: it does not hold anchors and a carry of these parts' shapes.
        """
        anchor, carry = state.get("anchor"), state.get("carry")
        shapes = [tuple(p.shape) for p in self.parameters]
        for name, tensors in (("anchor", anchor), ("carry", carry)):
            if not isinstance(tensors, list) or [tuple(getattr(t, "shape", ())) for t in tensors] != shapes:
                raise ConfigError(
                    f"the checkpoint's {name} of the trainers' parts does not fit them; use another --workdir"
                )
        with torch.no_grad():
            for mine, value in zip(self.anchor, anchor, strict=True):  # type: ignore[arg-type]
                mine.copy_(value)
        self.carry = [t.to(torch.float32, copy=True) for t in carry]  # type: ignore[union-attr]

    def served(self) -> list[torch.Tensor]:
        """What a late joiner takes from us (node/sharding/catchup.py): our parameters, then their anchors (CPU)."""
        with torch.no_grad():
            return [t.detach().float().cpu().clone() for t in (*self.parameters, *self.anchor)]

    def adopt(self, served: Sequence[torch.Tensor]) -> None:
        """Take ``served()`` of the trainers ahead (their combination) for the averaged parts; local ones stay."""
        count = len(self.parameters)
        with torch.no_grad():
            for i in self.shared:
                self.parameters[i].copy_(served[i])
                self.anchor[i].copy_(served[count + i])

    def take_cohort(self, served: Sequence[torch.Tensor]) -> None:
        """After a move: the new cohort's cohort parts and anchors from ``served()`` of its members (combined), the
        change we trained since our own anchor kept on top; the global and local parts stay ours."""
        count = len(self.parameters)
        with torch.no_grad():
            for i in self.shared:
                if i in self.global_:
                    continue
                progress = self.parameters[i] - self.anchor[i]
                self.anchor[i].copy_(served[count + i])
                self.parameters[i].copy_(self.anchor[i] + progress)
                self.carry[i].zero_()  # the old cohort ring's compression residual

    def moved(self) -> bool:
        """Whether the last ``prepare`` placed us in another cohort (asked once: it resets)."""
        return self.aggregator.moved()

    @property
    def cohort_members(self) -> tuple[str, ...] | None:
        """With cohorts, the members of our cohort as last placed (``prepare``); None without cohorts."""
        return self.aggregator.cohort_members if isinstance(self.aggregator, HierarchicalAggregator) else None

    def prepare(self, round_no: int) -> None:
        """Ready ``round_no`` (with cohorts: place this trainer). Call from the main thread (hivemind starts an
        averager's process from there only), before ``average``."""
        self.aggregator.prepare_round(round_no)

    @property
    def cohort_id(self) -> str | None:
        return self.aggregator.cohort_id

    def average(self, round_no: int, samples: int, peers: Sequence[PeerRecord]) -> AggregationResult | None:
        """Average this round's change with the group (module docstring) and apply the mean now; None if this
        trainer stays alone.

        Args:
            round_no: the round just finished (trainers meet at the same round number).
            samples: the sequences this trainer trained on in the round (its weight).
            peers: the run's listed records now (the trainers among them decide whether a group can form).
        """
        sent = self._updates(peers)
        if sent is None:
            self.stats["alone"] += 1
            return None
        return self._apply(round_no, self._aggregate(round_no, sent.updates, samples), sent)

    def send(self, round_no: int, samples: int, peers: Sequence[PeerRecord]) -> None:
        """``sharding.overlap_averaging``: start this round's averaging in the background (land the previous
        round first, then ``prepare``); the trainer trains on meanwhile and ``land`` applies the mean."""
        if self._in_flight is not None:
            raise RuntimeError("the previous round is still in flight; land(wait=True) it first")
        sent = self._updates(peers)
        if sent is None:
            self.stats["alone"] += 1
            return
        future = self._worker.submit(self._aggregate, round_no, sent.updates, samples)
        self._in_flight = (round_no, future, sent)

    def land(self, wait: bool) -> AggregationResult | None:
        """Apply the mean of the round in flight if it has landed (``wait``: wait for it), keeping what the trainer
        trained since it was sent; returns that round's result (None: none landed, or it averaged alone)."""
        if self._in_flight is None or not (wait or self._in_flight[1].done()):
            return None
        round_no, future, sent = self._in_flight
        self._in_flight = None
        return self._apply(round_no, future.result(), sent)

    def _updates(self, peers: Sequence[PeerRecord]) -> _Sent | None:
        """This round's update, ``anchor - params`` plus the compression carry, with the parameters it was taken
        from; None while fewer than ``min_group_size`` trainers are listed."""
        trainers = {p.peer_id for p in peers if "trainer" in p.roles} | {self.peer_id}
        if len(trainers) < self.run.aggregation.min_group_size:
            return None
        with torch.no_grad():
            params = [p.detach().clone() for p in self.parameters]
            updates = [(a - p).float().cpu() + c for a, p, c in zip(self.anchor, params, self.carry, strict=True)]
        return _Sent(params, updates)

    def _aggregate(self, round_no: int, updates: list[torch.Tensor], samples: int) -> AggregationResult | None:
        self._own_norm = l2_norm(updates) if self.norm_ratio else 0.0
        try:
            return self.aggregator.aggregate(round_no, updates, weight=float(max(samples, 1)))
        except AggregationError as e:
            logger.warning(f"round {round_no}: averaging the trainers' parts failed: {e}")
            return None

    def _apply(self, round_no: int, result: AggregationResult | None, sent: _Sent) -> AggregationResult | None:
        """``params = anchor - mean`` plus what was trained since ``sent`` was taken; re-anchor (module docstring),
        unless the gate rejects the mean: our parts and anchors then stay as they were."""
        self.outcome, self.last_round = RoundOutcome.SOLO, result
        if result is None:
            self.stats["alone"] += 1
            return None
        what = "the group's mean of the trainers' parts"
        if self.norm_ratio and not norm_admits(
            l2_norm(sent.updates), self._own_norm, self.norm_ratio, round_no, what, "keeping our own parts"
        ):
            self.outcome = RoundOutcome.REJECTED
            self.stats["rejected"] += 1
            return result
        saved = [[t.clone() for t in tensors] for tensors in (self.parameters, self.anchor, self.carry)]
        before = self._loss_at_anchor() if self.tolerance else float("nan")
        self._step(result, sent)
        after = self._evaluate() if self.tolerance else float("nan")
        if not admits(before, after, self.tolerance):
            with torch.no_grad():
                for mine, kept in zip([*self.parameters, *self.anchor], [*saved[0], *saved[1]], strict=True):
                    mine.copy_(kept)
            self.carry, self.outcome = saved[2], RoundOutcome.REJECTED
            self.stats["rejected"] += 1
            logger.warning(
                f"round {round_no}: rejected the group's mean of the trainers' parts: it takes the held-out loss "
                f"to {after:.4f}, {after / before - 1:+.1%} over the last group's parts' {before:.4f} "
                f"(aggregation.gate_tolerance = {self.tolerance:.1%}); keeping our own parts"
            )
            return result
        self.outcome = RoundOutcome.GROUP
        self.stats["averaged"] += 1
        self.last = result
        crossed = not isinstance(self.aggregator, HierarchicalAggregator) or self.aggregator.crossed
        across = " (and the global ones across cohorts)" if crossed and self.run.cohorts.enabled else ""
        logger.info(f"round {round_no}: averaged the trainers' parts in a group of {result.group_size}{across}")
        return result

    def _loss_at_anchor(self) -> float:
        """The held-out loss with the averaged parts at their anchors (the last group's), our local ones as they are:
        what the gate compares a new mean with (paired: the same batches and the stages as they are now)."""
        with torch.no_grad():
            own = [p.clone() for p in self.parameters]
            for i in self.shared:
                self.parameters[i].copy_(self.anchor[i])
            try:
                return self._evaluate()
            finally:
                for param, value in zip(self.parameters, own, strict=True):
                    param.copy_(value)

    def _step(self, result: AggregationResult, sent: _Sent) -> None:
        residual = self.aggregator.residual
        crossed = not isinstance(self.aggregator, HierarchicalAggregator) or self.aggregator.crossed
        with torch.no_grad():
            for i, (anchor, param, before, mean) in enumerate(
                zip(self.anchor, self.parameters, sent.params, sent.updates, strict=True)
            ):
                averaged = anchor - mean.to(anchor.device, anchor.dtype)
                param.copy_(averaged + (param - before))  # the steps since the send stay ours (none: bit-exact)
                if crossed or i not in self.global_:
                    anchor.copy_(averaged)
            sizes = [c.numel() for c in self.carry]
            pieces = residual.split(sizes) if residual is not None else [torch.zeros(n) for n in sizes]
            self.carry = [p.view_as(c).to(torch.float32, copy=True) for p, c in zip(pieces, self.carry, strict=True)]

    def shutdown(self) -> None:
        self.aggregator.shutdown()  # a round in flight gives up (the stop event is set first)
        self._worker.shutdown(wait=True, cancel_futures=True)
