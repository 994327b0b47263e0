"""The training node: enroll, join, catch up, then DiLoCo outer rounds until told to stop.

``TrainingNode`` drives the loop; its parts live in their own modules:

- inner.py: the inner AdamW steps and held-out evaluation; outer.py: the outer step and the staleness rule;
- privacy.py: DP at the run's level, record (DP-SGD, dpsgd.py) or user (ring noise), and its budget;
- checkpoint.py: ``<workdir>/checkpoint.safetensors`` after every round, read back by ``--resume``;
- report.py: ``RoundOutcome`` and the ``RoundReport`` line each round appends to ``report.jsonl``;
- ledger.py: the signed receipt of each round given to a group, and this node's ledger summary in the DHT;
- gate.py: the held-out loss gate a group's mean passes; admission.py: another config's peers are refused;
- node/runtime.py: identity, DHT peer, record and heartbeat; node/aggregation/: a round's merge with a group.

With ``[run.cohorts]`` (a ``HierarchicalAggregator``, node/aggregation/hierarchy.py) local parameters never leave
(joiners get zeros for them), and joiners, movers and nodes that missed a round download from their cohort only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from dht import NodeIdentity, connect_to_peers, encode_sketch
from dht.records import Capacity
from node.aggregation.base import AggregationError, AggregationResult, Aggregator, AloneThisRound
from node.aggregation.factory import make_aggregator
from node.aggregation.hierarchy import HierarchicalAggregator, ParameterPartition, partition_parameters
from node.capacity import fit_batch_size, pick_device, probe_capacity
from node.config import NodeConfig
from node.data import TokenBatches, batch_seed, load_corpus, split_corpus
from node.model import build_run_model
from node.runtime import NodeRuntime, PhaseClock
from node.sketch import data_sketch, refreshed_sketch
from node.tokens import RunTokenizer
from node.training.admission import ConfigMismatchError, refuse_mismatched
from node.training.checkpoint import CHECKPOINT_FILE, Checkpoint, save_round_params
from node.training.gate import LossGate
from node.training.inner import evaluate, inner_phase
from node.training.ledger import ContributionLedger
from node.training.lineage import LineageMerger
from node.training.optimizers import build_inner_optimizer
from node.training.outer import AggregationOutcome, InFlight, OuterState
from node.training.privacy import TrainerPrivacy, compression_bound
from node.training.report import REPORT_FILE, RoundOutcome, RoundReport, append_report
from node.training.schedule import InnerSchedule
from node.training.state_sharing import RecordVerifier, SharedState, StateSharer, ahead_wait, wait_for_peer_ahead
from node.wire_meter import WireMeter

logger = logging.getLogger(__name__)

__all__ = ["ConfigMismatchError", "RoundOutcome", "RoundReport", "TrainingNode"]

EVAL_BATCHES = 4


class TrainingNode:
    """A data-holding trainer in the swarm.

    ``prepare()`` does all that can fail without the network, ``join()`` enters the swarm, ``run_forever()`` trains.

    Args:
        config: the node's configuration (run config included).
        stop_event: set it (e.g. from a signal handler) to stop after the current inner step.
        on_round: called with each RoundReport (the CLI's progress line).
    """

    def __init__(
        self,
        config: NodeConfig,
        stop_event: threading.Event | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
    ):
        # configuration and control
        self.config = config
        self.run = config.run
        self.run_hash = self.run.digest()
        self.workdir = config.workdir_path
        self.stop_event = stop_event or threading.Event()
        self.on_round = on_round or (lambda report: None)

        # local data, device and model: built by prepare()
        self.identity: NodeIdentity
        self.sketch: list[float]  # the data sketch in our record
        self.device: torch.device
        self.batch_size: int  # sequences per inner step (fitted to the device)
        self.batches: TokenBatches  # windows of the run's token ids (node/tokens.py)
        self.eval_set: list[tuple[torch.Tensor, torch.Tensor]]  # held-out batches
        self.model: torch.nn.Module  # the local model (inner AdamW steps)
        self.inner_opt: torch.optim.Optimizer
        self.schedule: InnerSchedule  # the inner learning rate at each of the run's inner steps
        self.outer: OuterState  # global parameters and the outer optimizer
        self.capacity = Capacity()
        self.partition: ParameterPartition | None = None  # parameter tags, with [run.cohorts]
        self.privacy: TrainerPrivacy | None = None  # DP noise and budget (privacy.enabled)
        self.gate = LossGate.for_run(self.run, self.evaluate)  # the held-out loss gate (off with user-level DP)

        # the swarm: the runtime is born in prepare() (identity), the rest in join()
        self.runtime: NodeRuntime | None = None  # identity, DHT, heartbeat; owns shutdown
        self.meter: WireMeter | None = None
        self.sharer: StateSharer | None = None
        self.aggregator: Aggregator | None = None
        self.ledger = ContributionLedger(config)  # a signed receipt per round given to a group; summary in the DHT
        self.lineage: LineageMerger | None = None  # merges a group's lineages (lineage.py)

        # round progress
        self.round = 0
        self._digest = b""  # state digest of the global parameters at ``round``
        self._inflight: InFlight | None = None
        self._unsent_samples = 0  # samples behind the progress not yet sent (carried when a round is missed)
        self._longest_round = 0.0  # seconds of the slowest round a group merged (how long to wait for a peer ahead)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aggregate")
        self.phases = PhaseClock()  # seconds per phase and what we do now (metrics, progress line; node/runtime.py)

    @property
    def global_params(self) -> list[torch.nn.Parameter]:
        return self.outer.params

    # ---- enrollment -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail without the network: identity, data, device, model, checkpoint."""
        self.runtime = NodeRuntime.create(self.config, self.phases)
        self.identity = self.runtime.identity
        corpus = load_corpus(self.config.data)
        train_bytes, eval_bytes = split_corpus(corpus, context := self.run.model.context)
        self.sketch = data_sketch(corpus, noise=self.run.cohorts.sketch_noise)
        self.device = pick_device(self.config.device)
        train = self.run.train
        self.batch_size = fit_batch_size(self.run.model, train.batch_size, self.device)
        self.capacity = probe_capacity(
            self.run.model,
            self.batch_size,
            self.device,
            self.run.min_memory_gb,
            allow_low_memory=self.config.allow_low_memory,
        )
        train_ids, eval_ids = RunTokenizer.for_model(self.run.model).split(train_bytes, eval_bytes, context)
        self.batches = TokenBatches(train_ids, context, self.batch_size, seed=batch_seed(train.seed, train_bytes))
        self.eval_set = TokenBatches(eval_ids, context, train.batch_size, seed=1234).take(EVAL_BATCHES)
        self.model = build_run_model(self.run.model, train.seed, lora=self.run.lora).to(self.device)
        self.outer = OuterState(self.model, train)
        if self.run.cohorts.enabled:
            self.partition = partition_parameters([name for name, _ in self.model.named_parameters()], self.run.cohorts)
        self.inner_opt = build_inner_optimizer(self.model, train.inner_optimizer, train.inner_lr, train.weight_decay)
        self.schedule = InnerSchedule.for_run(train, self.config.rounds)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.run.privacy.enabled:
            self.privacy = TrainerPrivacy.create(self.config, self.model, self.inner_opt, train_ids, self.batch_size)
        if self.config.resume:
            self._load_checkpoint()
        self._digest = self.outer.digest()

    def _record_fields(self) -> dict[str, Any]:
        """Our own PeerRecord fields, read at each heartbeat (the runtime signs them)."""
        return dict(
            capacity=self.capacity,
            sketch=encode_sketch(self.sketch),
            roles=("trainer",),
            round=self.round,
            state_digest=self._digest,
            epsilon=-1.0 if self.privacy is None else self.privacy.epsilon(),
        )

    def _swarm(self) -> NodeRuntime:
        if self.runtime is None:
            raise RuntimeError("TrainingNode.prepare() was not called")
        return self.runtime

    def join(self) -> None:
        """Start the DHT peer, refuse a mismatched run, publish our record, and catch up with the swarm."""
        runtime = self._swarm()
        dht = runtime.start()
        self.meter = WireMeter.for_dht(dht)
        if self.meter is not None:
            runtime.adopt("wire meter", self.meter.stop)
        peers = [p for p in runtime.peers() if p.peer_id != self.identity.peer_id]
        connect_to_peers(dht, peers)
        refuse_mismatched(self.run, self.run_hash, peers)
        runtime.announce(self._record_fields)
        params = None if self.partition is not None else len(self.global_params)  # cohorts: the round only
        verify = RecordVerifier(runtime.peers, self.run_hash, self.identity.peer_id, params)
        self.sharer = StateSharer(dht, self.run.run_id, self._shared_state, self.config.swarm.client_mode, verify)
        runtime.adopt("state sharer", self.sharer.shutdown)
        self.aggregator = self._make_aggregator()
        runtime.adopt("aggregator", self.aggregator.shutdown)
        self.aggregator.watch_ahead(runtime.no_group_coming)  # a missed group: go on, not wait out the timeout
        self.lineage = LineageMerger.start(dht, self.run, self.identity.peer_id, self._local_indices(), runtime.adopt)
        self.aggregator.prepare_round(self.round + 1)  # with cohorts: place us first, to download from our own
        if any(p.round > self.round for p in peers):
            self._catch_up(RoundOutcome.LOADED)
        self.sharer.announce(self.round)
        runtime.wait_for_trainers(self.config.min_peers, self.stop_event)  # a phase (peer_wait) of its own

    def _make_aggregator(self) -> Aggregator:
        """The run's aggregator, or with [run.cohorts] the hierarchical one around it."""
        dht = self._swarm().dht
        options: dict[str, Any] = dict(
            config=self.run.aggregation,
            identity=self.identity,
            weight_bound=float(self.run.train.inner_steps * self.run.train.batch_size),
            client_mode=self.config.swarm.client_mode,
            stop_event=self.stop_event,
            bandwidth=self.capacity.upload_bytes_per_second or None,
            noise=None if self.privacy is None else self.privacy.noise,
            compression=self.run.compression,
            compression_bound=compression_bound(self.run),
        )
        if self.partition is None:
            return make_aggregator(dht, self.run.run_id, self.global_params, **options)
        return HierarchicalAggregator(
            dht,
            self.run.run_id,
            self.run_hash,
            self.identity.peer_id,
            self.global_params,
            self.partition,
            self.run.cohorts,
            self.run.aggregation.min_group_size,
            **options,
        )

    def _local_indices(self) -> set[int]:
        return set(self.partition.local) if self.partition is not None else set()

    def _shared_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        return {"round": self.round, "run_hash": self.run_hash}, self._state_tensors()

    def _state_tensors(self) -> list[torch.Tensor]:
        """Global params and outer momentum, as shared with late joiners (local params as zeros: never sent)."""
        return self.outer.shared_tensors(self._local_indices())

    def _catch_up(self, mode: RoundOutcome) -> bool:
        """Download the most advanced peer's state and start from it; return whether it was applied."""
        logger.info(f"downloading the swarm's state (we are at round {self.round})")
        state = self._download(self.round)
        if state is None:
            logger.warning("no usable state from peers; continuing from our own")
            return False
        self._apply_state(state)
        self.outer.copy_to(self.model)
        self._finish_round(mode)
        logger.info(f"loaded the swarm's state at round {self.round}")
        return True

    def _download(self, at_least: int) -> SharedState | None:
        """The most advanced peer's state if it has finished round ``at_least`` or later (retried)."""
        assert self.sharer is not None
        donors = self.aggregator.cohort_members if self.aggregator is not None else None  # cohorts: our own
        with self.phases.phase("download", "downloading the swarm's state"):
            state = self.sharer.download_retrying(self._state_tensors(), self.run_hash, self.stop_event, donors)
        return state if state is not None and state.round >= at_least else None

    def _apply_state(self, state: SharedState) -> None:
        """Global params, outer momentum and round from a downloaded state (the local model and params are kept)."""
        self.outer.load_shared(state.tensors, self._local_indices())
        self.round = state.round

    def _adopt_cohort(self) -> None:
        """After a move: the new cohort's cohort parameters from its most advanced member, our progress on top."""
        state = self._download(0)
        if state is None or self.partition is None:
            logger.warning("no state from our new cohort; keeping our cohort parameters")
            return
        before = self.outer.snapshot()
        self.outer.load_shared(state.tensors, set(range(len(before))) - set(self.partition.cohort))
        self.outer.follow(self.model, before, None)  # local += global - before: our progress stays ours

    # ---- training ---------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean loss of the global parameters on the held-out batches."""
        with self.phases.phase("evaluation", "evaluating the held-out loss"):
            return evaluate(self.model, self.global_params, self.eval_set, self.device)

    def train_round(self) -> None:
        """Inner steps (the previous round lands between two once ready), then this round's launch (outer.py)."""
        inner = self._inner_phase()
        if self.stop_event.is_set():
            return
        if self._inflight is not None:
            self._land()
        if self.stop_event.is_set() or (self.config.rounds and self.round >= self.config.rounds):
            return
        self._launch(inner)
        last = bool(self.config.rounds) and self.round + 1 >= self.config.rounds
        if not self.run.train.overlap or last:
            self._land()

    def _inner_phase(self) -> tuple[float, int]:
        """Inner steps (node/training/inner.py): their time and samples are counted; returns mean loss and steps."""
        phase = (self._inflight.round if self._inflight is not None else self.round) + 1  # the round it sends
        train, dp = self.run.train, self.privacy
        with self.phases.phase("inner", f"round {phase}", train.inner_steps, self.batch_size * self.run.model.context):
            losses = inner_phase(
                self.model,
                self.inner_opt,
                self.batches,
                self.device,
                train,
                self.stop_event,
                schedule=self.schedule,
                first_step=(phase - 1) * train.inner_steps,
                between_steps=self._land_if_ready,
                step=None if dp is None else dp.inner_step,
                steps=None if dp is None else dp.phase_steps(train.inner_steps),
            )
            self.phases.stepped(len(losses))
        self._unsent_samples += len(losses) * (self.batch_size if dp is None else dp.step_samples(self.batch_size))
        return (sum(losses) / len(losses) if losses else math.nan), len(losses)

    def _launch(self, inner: tuple[float, int]) -> None:
        """Hand all unsent progress (global - local) to a background aggregation; ``inner``: its phase's loss, steps."""
        assert self.aggregator is not None
        samples, self._unsent_samples = self._unsent_samples, 0
        sent = self.outer.pseudo_gradient(self.model)
        round_no = self.round + 1
        future: Future[AggregationOutcome] = Future()
        if self.privacy is not None and not self.privacy.launch(sent):  # user DP: clipped; a release per ring it fits
            future.set_result((RoundOutcome.LOCAL, None))
        mean = [t.clone() for t in sent]
        undelivered: list[torch.Tensor] = []
        self.aggregator.prepare_round(round_no)  # here, not in the worker: averagers start on the main thread only
        if self.aggregator.moved():
            self._adopt_cohort()
        if self.lineage is not None:
            self.aggregator.declare_state(self.lineage.digest_of(self.outer))
        if not future.done():
            future = self._worker.submit(self._aggregate, round_no, mean, max(samples, 1), undelivered)
        self._inflight = InFlight(round_no, sent, mean, samples, undelivered, future, inner)

    def _aggregate(
        self, round_no: int, mean: list[torch.Tensor], samples: int, undelivered: list[torch.Tensor]
    ) -> AggregationOutcome:
        """Runs in the background: a group's mean, else a peer's newer state, else our own delta alone."""
        assert self.aggregator is not None
        started = time.monotonic()
        try:
            with self.phases.phase("aggregation", f"aggregating round {round_no} (matchmaking, all-reduce)"):
                result = self.aggregator.aggregate(round_no, mean, weight=samples)
        except AggregationError as e:
            logger.warning(str(e))
            if isinstance(e, AloneThisRound):  # sat out, or the sum refused: alone this round, at once
                return RoundOutcome.SOLO, None
            result = None
        if result is not None:
            self._longest_round = max(self._longest_round, time.monotonic() - started)
            residual = self.aggregator.residual
            if residual is not None:  # compression: what the sum left out stays ours
                pieces = residual.split([t.numel() for t in mean])
                undelivered += [
                    piece.view_as(t).to(t.device, t.dtype, copy=True) for piece, t in zip(pieces, mean, strict=True)
                ]
            return RoundOutcome.GROUP, result
        if self.stop_event.is_set():
            return RoundOutcome.STOPPED, None
        among, wait = self.aggregator.cohort_members, ahead_wait(self.run.aggregation, self._longest_round)
        swarm = self._swarm()
        if swarm.others_alive() and wait_for_peer_ahead(swarm, self.round, wait, self.stop_event, among):
            state = self._download(round_no)
            if state is not None:
                return RoundOutcome.RESYNC, state
        logger.warning(f"round {round_no}: no group formed; applying our own update alone")
        return RoundOutcome.SOLO, None  # ``mean`` still holds our own update

    def _land_if_ready(self, steps: int) -> None:
        """Between inner steps (``steps`` taken so far): land the in-flight round if its aggregation is done."""
        self.phases.stepped(steps)
        if self._inflight is None or not self._inflight.ready():
            return
        logger.info(f"round {self._inflight.round} lands {steps} inner steps into the next phase")
        with self.phases.phase("aggregation_wait", f"landing round {self._inflight.round}"):  # not training
            self._land()

    def _land(self) -> None:
        """Wait for the in-flight aggregation and apply it (the staleness rule, node/training/outer.py)."""
        flight, self._inflight = self._inflight, None
        assert flight is not None
        with self.phases.phase("aggregation_wait", f"waiting for round {flight.round}'s group"):
            mode, outcome = flight.future.result()
        if self.privacy is not None:
            self.privacy.landed()  # every release the averager made counts, whatever the outcome
        if mode is RoundOutcome.STOPPED:
            return
        before = self.outer.snapshot()
        group_size = 1
        delivered: list[torch.Tensor] | None = flight.sent
        if mode is RoundOutcome.GROUP:
            assert isinstance(outcome, AggregationResult) and self.aggregator is not None
            group_size = outcome.group_size
            mode = self.gate.step(self.outer, flight.mean, flight.round, flight.sent, flight.inner[1])  # or REJECTED
            self.aggregator.verdict(outcome, mode is RoundOutcome.GROUP)  # suspects the next groups leave out
        if mode is RoundOutcome.GROUP:
            delivered = flight.delivered()  # with compression, the part the ring left out stays in the local model
        elif mode is RoundOutcome.RESYNC:
            assert isinstance(outcome, SharedState)
            self._apply_state(outcome)
            self._unsent_samples += flight.samples  # our delta was not merged: it is still ours to send
            group_size = 0
            delivered = None
        elif self.privacy is None or self.privacy.publishes(mode):  # solo or local: our own update alone
            self.outer.step(flight.sent)
        else:  # under DP, never served un-noised: it stays in the local model, sent with a later group
            delivered = None
            self._unsent_samples += flight.samples
        self.outer.follow(self.model, before, delivered)
        if isinstance(outcome, AggregationResult) and self.lineage is not None:  # several lineages: merged
            self.lineage.merge(outcome, self.outer, self.model, mode is RoundOutcome.GROUP)
        if mode is not RoundOutcome.RESYNC:
            self.round = max(self.round, flight.round)
        self._finish_round(mode, group_size, flight)

    def _finish_round(self, mode: RoundOutcome, group_size: int = 0, flight: InFlight | None = None) -> None:
        """Report the round (``flight``: the aggregation it landed), checkpoint it, and tell the swarm."""
        report = self._report(mode, group_size, flight)
        self._save_checkpoint()
        if self.config.save_round_params:
            save_round_params(self.workdir, self.round, self.global_params)
        append_report(self.workdir, report)
        self.ledger.credit(self._swarm(), report, flight)
        assert self.sharer is not None
        self.sharer.announce(self.round)
        if self.partition is not None:  # every ``cohorts.sketch_every`` rounds (the folder may have changed)
            self.sketch = refreshed_sketch(self.sketch, self.config.data, self.run.cohorts, self.round)
        self._swarm().note_round(report.eval_loss, report.bytes_sent, report.round)  # published soon
        self.on_round(report)

    def _report(self, mode: RoundOutcome, group_size: int, flight: InFlight | None) -> RoundReport:
        seconds, busy = self.phases.lap()  # since the last report; the share of it in inner steps
        samples = flight.samples if flight is not None else 0
        train_loss, steps = flight.inner if flight is not None and mode.trained else (math.nan, 0)
        utilization = busy if steps else 0.0
        self._digest = self.outer.digest()
        return RoundReport(
            round=self.round,
            mode=mode,
            eval_loss=self.gate.remember(self.gate.loss_at(self._digest)),  # the gate's evaluation, if still true
            train_loss=train_loss,
            group_size=group_size,
            samples=samples,
            samples_per_second=samples / max(seconds, 1e-9),
            seconds=seconds,
            state_digest=self._digest.hex(),
            epsilon=None if self.privacy is None else round(self.privacy.epsilon(), 4),
            utilization=round(utilization, 4),
            bytes_sent=self.meter.bytes_sent() if self.meter is not None else 0,
            inner_steps=steps,
            cohort=self.aggregator.cohort_id if self.aggregator is not None else None,
        )

    # ---- checkpoints ------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        with self.phases.phase("checkpoint", "writing the checkpoint"):
            Checkpoint(
                run_hash=self.run_hash,
                round=self.round,
                global_params=[p.detach().cpu() for p in self.global_params],
                outer_opt=self.outer.optimizer.state_dict(),
                inner_opt=self.inner_opt.state_dict(),
                data_rng=self.batches.state(),
                dp_rounds=0 if self.privacy is None else self.privacy.spent,
            ).save(self.workdir, run=self.run, peer_id=self.identity.peer_id)

    def _load_checkpoint(self) -> None:
        checkpoint = Checkpoint.load(self.workdir, self.run_hash)
        if checkpoint is None:
            return
        with torch.no_grad():
            for param, value in zip(self.global_params, checkpoint.global_params, strict=True):
                param.copy_(value)
        self.outer.copy_to(self.model)
        self.outer.optimizer.load_state_dict(checkpoint.outer_opt)
        self.inner_opt.load_state_dict(checkpoint.inner_opt)
        self.batches.restore(checkpoint.data_rng)
        self.round = checkpoint.round
        if self.privacy is not None:
            self.privacy.restore(checkpoint.dp_rounds)
        logger.info(f"resumed from {self.workdir / CHECKPOINT_FILE} at round {self.round}")

    # ---- lifecycle --------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Train until ``config.rounds`` rounds are done (0: forever) or the stop event is set."""
        if self.round == 0 and not (self.workdir / REPORT_FILE).exists():
            self._finish_round(RoundOutcome.INITIAL)
        self.phases.lap()
        while not self.stop_event.is_set():
            if self.config.rounds and self.round >= self.config.rounds and self._inflight is None:
                break
            self.train_round()

    def close(self) -> None:
        """Stop background work, then the runtime (heartbeat, aggregator, sharer, DHT); safe to call twice."""
        self.stop_event.set()  # a pending aggregation returns at once
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self.runtime is not None:
            self.runtime.close()
