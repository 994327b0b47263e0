"""Aggregators backed by a hivemind averager: the shared step loop and the plain (unmasked) one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage

from dht import reap
from node.aggregation.base import (
    AggregationError,
    AggregationResult,
    Aggregator,
    AloneThisRound,
    Lineage,
    StateDigest,
    round_group_bits,
)
from node.config import AggregationConfig
from node.secagg.state import SAT_OUT, refusal_of, refused_group
from node.secagg.suspicion import Suspicion

logger = logging.getLogger(__name__)

STOP_POLL = 0.2  # seconds between looks at the stop event while a step runs (its end wakes the wait at once)
# a step that has looked for a group this many matchmaking windows in a row has missed at least one slot (it
# declares 0.5-1.5 windows ahead of one, which reveals half a window after): from then on it asks, at most
# once per ASK_EVERY s, whether a group of its round can still come (``Aggregator.watch_ahead``)
MISSED_AFTER_WINDOWS = 3
ASK_EVERY = 1.0


def averager_kwargs(config: AggregationConfig) -> dict[str, Any]:
    return dict(
        start=True,
        min_group_size=config.min_group_size,
        min_matchmaking_time=config.matchmaking_time,
        request_timeout=min(1.0, config.matchmaking_time / 2),
        initial_group_bits=round_group_bits(0),
        allow_state_sharing=False,
        shutdown_timeout=2,
    )


def averager_buffers(templates: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The averager's own float32 CPU copies of the update (shared with its process)."""
    return [torch.zeros_like(t, dtype=torch.float32, device="cpu") for t in templates]


class AveragerAggregator(Aggregator):
    """Runs one step of a hivemind averager per round; subclasses build the averager."""

    def __init__(self, averager: DecentralizedAverager, config: AggregationConfig, stop_event: threading.Event | None):
        self.config = config
        self._stop = stop_event or threading.Event()
        self._averager = averager
        self._state = ""  # the lineage we declare (``declare_state``)
        self._cohort: dict[str, str | int] = {}  # the cohort we declare in a cross-cohort ring (``declare_cohort``)
        self._suspicion = Suspicion(str(averager.peer_id))  # our gate's verdicts: split, suspects (``verdict``)
        self._hopeless: Callable[[int], bool] | None = None  # whether no group of a round is coming (``watch_ahead``)

    def watch_ahead(self, hopeless: Callable[[int], bool]) -> None:
        self._hopeless = hopeless

    def declare_state(self, digest_of: StateDigest) -> None:
        self._state = digest_of(None)

    def declare_cohort(self, cohort_id: str, cohorts: int) -> None:
        self._cohort = {"cohort": cohort_id, "cohorts": cohorts}

    def verdict(self, result: AggregationResult, accepted: bool) -> None:
        self._suspicion.note(result.round, result.peers, accepted)

    def aggregate(self, round_no: int, tensors: Sequence[torch.Tensor], weight: float) -> AggregationResult | None:
        if weight <= 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        with self._averager.get_tensors() as buffers:
            for buffer, tensor in zip(buffers, tensors, strict=True):
                buffer.copy_(tensor.detach().float().cpu())
        self._averager.set_group_bits(round_group_bits(round_no))
        gather = {"round": round_no, **({"state": self._state} if self._state else {}), **self._cohort}
        gather |= self._suspicion.gathered()
        control = self._averager.step(
            gather=gather,
            weight=float(weight),
            timeout=self.config.timeout,
            allow_retries=True,
            wait=False,
        )
        missed = _MissedRound(control, round_no, self.config.matchmaking_time, self._hopeless)
        while not control.done():
            futures.wait([control], timeout=STOP_POLL)  # woken the moment the step ends
            if not control.done() and (self._stop.is_set() or missed()):
                control.cancel()
                return None
        try:
            gathered = control.result()
        except Exception as e:  # hivemind reports a failed all-reduce as an exception of its own
            logger.warning(f"round {round_no}: averaging failed: {e}")
            return None
        if not gathered:
            return None
        if gathered.get(SAT_OUT) == 1:
            raise AloneThisRound(f"round {round_no}: a split slot too small for two groups; we sit this round out")
        refusal = refusal_of(gathered)
        if refusal is not None:  # every member refused the group's sum: the round ends without a mean
            self._suspicion.note(round_no, refused_group(gathered), accepted=False)  # as a rejected mean
            raise AloneThisRound(f"round {round_no}: {refusal}")
        rounds = {str(peer): data.get("round") if isinstance(data, dict) else None for peer, data in gathered.items()}
        if set(rounds.values()) != {round_no}:
            raise AggregationError(f"group mixed rounds {rounds}; the average of round {round_no} is discarded")
        with self._averager.get_tensors() as buffers:
            if not all(torch.isfinite(buffer).all() for buffer in buffers):
                raise AggregationError(f"round {round_no}: the group's mean holds non-finite values")
            for buffer, tensor in zip(buffers, tensors, strict=True):
                tensor.copy_(buffer.to(tensor.device, tensor.dtype))
        return _result(round_no, gathered)

    def shutdown(self) -> None:
        self._averager.shutdown()
        reap(self._averager, "the averager process")


class _MissedRound:
    """Whether a step still looking for a group of ``round_no`` should stop: it has looked in vain for
    ``MISSED_AFTER_WINDOWS`` matchmaking windows in a row, and ``hopeless`` says no group of the round is coming
    (other peers formed theirs in a slot we missed and moved on, or none is left)."""

    def __init__(self, control: Any, round_no: int, window: float, hopeless: Callable[[int], bool] | None):
        self.control, self.round_no, self.hopeless = control, round_no, hopeless
        self.patience = MISSED_AFTER_WINDOWS * window
        self.since = self.asked = time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.control.stage is not AveragingStage.LOOKING_FOR_GROUP:  # a group runs, or the step has not begun
            self.since = now
            return False
        if self.hopeless is None or now - self.since < self.patience or now - self.asked < ASK_EVERY:
            return False
        self.asked = now
        if not self.hopeless(self.round_no):
            return False
        logger.warning(f"round {self.round_no}: no group of this round is coming (peers finished it, or none is left)")
        return True


def _result(round_no: int, gathered: dict[Any, Any]) -> AggregationResult:
    """What a round's gathered data says about its group (the secure averager adds its group and keys)."""
    peers = sorted(gathered, key=str)
    about = gathered[peers[0]]
    return AggregationResult(
        round=round_no,
        group_size=len(gathered),
        peers=tuple(map(str, peers)),
        group_id=str(about.get("group", "")),
        group_round=int(about.get("group_round", 0)),
        key_fingerprints=tuple(str(gathered[peer]["keys"]) for peer in peers if "keys" in gathered[peer]),
        certificate=about.get("certificate", b"") if isinstance(about.get("certificate"), bytes) else b"",
        lineages=(Lineage(None, tuple(map(str, peers)), tuple(_declared_state(gathered[peer]) for peer in peers)),),
    )


def _declared_state(data: Any) -> str:
    """A member's declared lineage digest (32 hex digits), or "" if it declared none or something else."""
    state = data.get("state") if isinstance(data, dict) else None
    return state if isinstance(state, str) and len(state) == 32 and all(c in "0123456789abcdef" for c in state) else ""


class PlainAggregator(AveragerAggregator):
    """hivemind's DecentralizedAverager behind the Aggregator interface (no masking: for comparison).

    Args:
        dht: the node's running DHT.
        run_id: the run; its averaging key is derived from it.
        templates: tensors with the shapes and dtypes of the update.
        config: group size, matchmaking time and timeout.
        client_mode: dial out only (a peer behind NAT).
        stop_event: when set, a pending aggregation is cancelled and returns None.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        templates: Sequence[torch.Tensor],
        config: AggregationConfig,
        client_mode: bool = False,
        stop_event: threading.Event | None = None,
    ):
        averager = DecentralizedAverager(
            averager_buffers(templates),
            dht,
            prefix=f"zen_{run_id}_grads",
            client_mode=client_mode,
            **averager_kwargs(config),
        )
        super().__init__(averager, config, stop_event)
