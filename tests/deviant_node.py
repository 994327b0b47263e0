"""A deviating `zen-node join`: a real trainer process that attacks the swarm (the integrity tests' harness).

It is the CLI's ``join`` with the TrainingNode swapped for a deviating subclass; the first argument names
the deviation, the rest are ``zen-node`` arguments::

    python tests/deviant_node.py poison-mean join --config run.toml --data data.txt ...

Deviations:

- ``poison-mean``: sends ``+-clip_bound`` (random signs) in every coordinate with the largest weight, the
  most a peer can pull a group's mean while staying inside the bounds every member checks
  (node/secagg/bounds.py). Random signs: a uniform shift would barely move this GPT's loss (layer norms
  and the softmax are blind to it).
- ``flip-update``: trains honestly but sends ``-FLIP_SCALE`` times its pseudo-gradient: a mean it is in stays
  within the gate's norm ratio of an honest update and, with enough honest members, still lowers the held-out
  loss, so no gate rejects it: it only slows the group down (the harm the gate's thresholds leave).
- ``poison-donor``: trains honestly, but serves late joiners tampered global parameters at a huge round,
  and offers its state with the top priority so that a joiner asks it first.
- ``forge-weight``: trains honestly, but its masked ring vector carries the largest weight word the ring holds
  in place of its own (node/secagg/ring.py), so every group sum it is in falls outside the weights an honest
  group can produce and every member refuses the round (node/secagg/bounds.py); masking hides who forged it.
- ``late-once``: trains honestly, but reaches its aggregation of round ``LATE_ROUND`` ``LATE_SECONDS`` late
  (a stalled machine), so the others form that round's group without it and move on.
- ``fork-lineage``: after round 1 lands, adds ``TAMPER`` to every global parameter (and its local model),
  then trains honestly: its next group holds two lineages, and the merge (node/training/lineage.py) must
  bring it back without letting its tampered state pull the others.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node import cli
from node.secagg.ring import RingVector
from node.training import trainer
from node.training.trainer import TrainingNode

logger = logging.getLogger("deviant_node")
POISONED_ROUND = 2**39  # the round the poisoned donor claims (within check_state's range)
TAMPER = 0.5  # what the poisoned donor adds to every global parameter it serves
LATE_ROUND, LATE_SECONDS = 3, 6.0  # the round the late trainer is late for, and by how much
FLIP_SCALE = 3.0  # the update-flipper sends -FLIP_SCALE x its own pseudo-gradient
FORGED_WEIGHT_WORD = 0x7FFFFFFF  # the weight-forging trainer's word: far beyond any honest group's weight sum


class MeanPoisoner(TrainingNode):
    """Sends ``+-clip_bound`` everywhere in place of its pseudo-gradient."""

    def _launch(self, inner: tuple[float, int]) -> None:
        bound = self.run.aggregation.clip_bound
        generator = torch.Generator().manual_seed(self.round)
        with torch.no_grad():  # the pseudo-gradient global - local is then +-bound everywhere
            for local, param in zip(self.model.parameters(), self.global_params, strict=True):
                signs = torch.randint(0, 2, param.shape, generator=generator).to(param) * 2 - 1
                local.copy_(param - bound * signs)
        logger.warning(f"deviant: sending +-{bound} in every coordinate of round {self.round + 1}")
        super()._launch(inner)


class UpdateFlipper(TrainingNode):
    """Sends ``-FLIP_SCALE`` times its honest pseudo-gradient."""

    def _launch(self, inner: tuple[float, int]) -> None:
        with torch.no_grad():  # global - local becomes -FLIP_SCALE x (global - local)
            for local, param in zip(self.model.parameters(), self.global_params, strict=True):
                local.copy_(param + FLIP_SCALE * (param - local))
        logger.warning(f"deviant: sending -{FLIP_SCALE} x our update of round {self.round + 1}")
        super()._launch(inner)


class PoisonedDonor(TrainingNode):
    """Serves tampered parameters and a huge round; first in line for joiners."""

    def _shared_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        tensors = self._state_tensors()
        count = len(self.global_params)
        tampered = [t + TAMPER if i < count else t for i, t in enumerate(tensors)]
        return {"round": POISONED_ROUND, "run_hash": self.run_hash}, tampered

    def join(self) -> None:
        super().join()
        assert self.sharer is not None
        announce = self.sharer.announce
        self.sharer.announce = lambda round_no: announce(POISONED_ROUND)  # type: ignore[method-assign]
        self.sharer.announce(0)


def forging(encode_part: Any) -> Any:
    """``RingVector.encode_part`` that writes ``FORGED_WEIGHT_WORD`` in place of the honest weight word."""

    def forged(ring: RingVector, words: Any, start: int, stop: int, seed: bytes) -> None:
        encode_part(ring, words, start, stop, seed)
        if stop > ring.values.size:  # the part that carries the weight word
            words[-1] = FORGED_WEIGHT_WORD

    return forged


class WeightForger(TrainingNode):
    """An honest trainer whose averager (a forked process: the patch travels with it) forges its weight word."""

    def join(self) -> None:
        RingVector.encode_part = forging(RingVector.encode_part)  # type: ignore[method-assign]
        logger.warning(f"deviant: every weight word sent is {FORGED_WEIGHT_WORD:#x}")
        super().join()


class LateOnce(TrainingNode):
    """An honest trainer that is ``LATE_SECONDS`` late, once, for round ``LATE_ROUND``'s group."""

    def _launch(self, inner: tuple[float, int]) -> None:
        if self.round + 1 == LATE_ROUND and not getattr(self, "_was_late", False):
            self._was_late = True
            logger.warning(f"deviant: {LATE_SECONDS} s late for round {LATE_ROUND}")
            time.sleep(LATE_SECONDS)
        super()._launch(inner)


class LineageForker(TrainingNode):
    """Leaves the run's lineage after round 1 by a shift of every global parameter."""

    def _finish_round(self, *args: Any, **kwargs: Any) -> None:
        if self.round == 1 and not getattr(self, "_forked", False):
            self._forked = True
            with torch.no_grad():
                for local, param in zip(self.model.parameters(), self.global_params, strict=True):
                    param.add_(TAMPER)
                    local.add_(TAMPER)
            logger.warning(f"deviant: shifted every global parameter by {TAMPER} after round 1")
        super()._finish_round(*args, **kwargs)


DEVIATIONS: dict[str, type[TrainingNode]] = {
    "poison-mean": MeanPoisoner,
    "flip-update": UpdateFlipper,
    "poison-donor": PoisonedDonor,
    "fork-lineage": LineageForker,
    "forge-weight": WeightForger,
    "late-once": LateOnce,
}


def main() -> int:
    """Run ``zen-node`` with the TrainingNode of ``sys.argv[1]``'s deviation."""
    trainer.TrainingNode = DEVIATIONS[sys.argv[1]]  # type: ignore[misc]  # cmd_join imports it when it runs
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
