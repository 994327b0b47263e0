"""What a trainer writes after each round: one JSON line in ``<workdir>/report.jsonl``.

``RoundReport`` is a TrainingNode's line (and what its progress line shows); its ``mode`` is a
``RoundOutcome``, a ``str`` enum, so the JSON holds the plain strings ("group", "solo", ...). The
sharded trainer writes a ``RoundReport`` per round there too, and its ``StepReport`` lines to ``steps.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

REPORT_FILE = "report.jsonl"
STEPS_FILE = "steps.jsonl"  # a sharded trainer's line per step (node/sharding/trainer.py)


class RoundOutcome(StrEnum):
    """How an outer round ended (``RoundReport.mode``; the values are report.jsonl's strings)."""

    INITIAL = "initial"  # the report before the first round: the starting state's evaluation
    LOADED = "loaded"  # the swarm's state was downloaded at join
    GROUP = "group"  # a group's mean was applied
    SOLO = "solo"  # no group formed: our own update was applied alone
    RESYNC = "resync"  # no group formed: a peer's newer state was downloaded, our progress kept on top
    REJECTED = "rejected"  # a group's mean failed the held-out loss gate (gate.py): our own update applied alone
    LOCAL = "local"  # privacy budget spent: our own update applied, nothing sent
    STOPPED = "stopped"  # the node was stopped while aggregating: nothing applied, nothing reported

    @property
    def trained(self) -> bool:
        """Whether inner steps stand behind this report (not the initial or a downloaded state)."""
        return self not in (RoundOutcome.INITIAL, RoundOutcome.LOADED)


@dataclass
class RoundReport:
    """One line of ``report.jsonl``, and what the progress bar shows."""

    round: int
    mode: RoundOutcome
    eval_loss: float
    train_loss: float
    group_size: int
    samples: int
    samples_per_second: float
    seconds: float
    state_digest: str
    epsilon: float | None = None  # privacy spent so far (PLD, at privacy.delta); None without DP
    utilization: float = 0.0  # fraction of the wall time since the last report spent in inner steps
    bytes_sent: int = 0  # every byte this node's libp2p daemon put on the wire so far (TCP, DHT included)
    inner_steps: int = 0  # inner steps behind this report's training loss
    cohort: str | None = None  # the cohort this node placed itself in (with [run.cohorts]); None otherwise


def append_report(workdir: Path, report: Any, name: str = REPORT_FILE) -> None:
    """Append ``report`` (a dataclass) as one JSON line to ``workdir / name``."""
    with open(workdir / name, "a") as f:
        f.write(json.dumps(asdict(report)) + "\n")
