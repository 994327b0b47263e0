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
   ``aggregation.min_group_size``, under the key ``<run_id>-trainers``);
3. each member sets ``params = anchor - mean`` and takes it as its new anchor. Members that
   held the same anchor leave bit-identical (the secure ring decodes the same bits on every
   member); AdamW's moments stay each trainer's own, as in DiLoCo.

A round is averaged only while at least ``min_group_size`` trainers of the run are listed (a
secure sum of two would reveal both inputs); otherwise, or when no group forms in time, the
trainer keeps its parts and its anchor, so its next group averages the change since then. What
is not built: a trainer that joins late starts from the seeded parts and does not download the
others' (its anchor then differs from theirs and it converges to them only through the means);
rounds are synchronous (the trainer waits for its group, no overlap).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence

import hivemind
import torch

from dht import NodeIdentity, PeerRecord
from node.aggregation.base import AggregationError, AggregationResult
from node.aggregation.factory import make_aggregator
from node.config import RunConfig

logger = logging.getLogger(__name__)


class FrontAverager:
    """The per-round averaging of one sharded trainer's own parts (module docstring).

    Build it from the main thread (hivemind starts an averager's process only from there).

    Args:
        dht: the trainer's running DHT.
        run: the run (its id, aggregation settings, and samples per round).
        identity: the trainer's identity (signs its secure-aggregation messages).
        parameters: the trainer's own parameters, in a fixed order (the same on every trainer).
        stop_event: when set, a pending round gives up.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run: RunConfig,
        identity: NodeIdentity,
        parameters: Sequence[torch.nn.Parameter],
        stop_event: threading.Event,
    ):
        self.run, self.peer_id = run, identity.peer_id
        self.parameters = list(parameters)
        with torch.no_grad():
            self.anchor = [p.detach().clone() for p in self.parameters]
        self.aggregator = make_aggregator(
            dht,
            f"{run.run_id}-trainers",
            [p.detach().float().cpu() for p in self.parameters],
            run.aggregation,
            identity=identity,
            weight_bound=float(run.train.inner_steps * run.train.batch_size),
            stop_event=stop_event,
        )
        self.stats: Counter[str] = Counter()  # round outcomes: averaged, alone
        self.last: AggregationResult | None = None  # the last round that averaged

    def average(self, round_no: int, samples: int, peers: Sequence[PeerRecord]) -> AggregationResult | None:
        """Average this round's change with the group (module docstring); None if this trainer stays alone.

        Args:
            round_no: the round just finished (trainers meet at the same round number).
            samples: the sequences this trainer trained on in the round (its weight).
            peers: the run's listed records now (the trainers among them decide whether a group can form).
        """
        trainers = {p.peer_id for p in peers if "trainer" in p.roles} | {self.peer_id}
        result = None
        if len(trainers) >= self.run.aggregation.min_group_size:
            with torch.no_grad():
                updates = [(a - p.detach()).float().cpu() for a, p in zip(self.anchor, self.parameters, strict=True)]
            try:
                result = self.aggregator.aggregate(round_no, updates, weight=float(max(samples, 1)))
            except AggregationError as e:
                logger.warning(f"round {round_no}: averaging the trainers' parts failed: {e}")
        if result is None:
            self.stats["alone"] += 1
            return None
        with torch.no_grad():
            for anchor, param, mean in zip(self.anchor, self.parameters, updates, strict=True):
                anchor.sub_(mean.to(anchor.device, anchor.dtype))
                param.copy_(anchor)
        self.stats["averaged"] += 1
        self.last = result
        logger.info(f"round {round_no}: averaged the trainers' parts with {result.group_size - 1} other trainers")
        return result

    def shutdown(self) -> None:
        self.aggregator.shutdown()
