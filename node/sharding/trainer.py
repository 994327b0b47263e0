"""A trainer of a sharded run: local embedding, first blocks and head; the middle blocks on stage servers.

One step (see node/sharding/client.py for failover and exactly-once):

1. the batch is cut into ``sharding.micro_batches`` pieces; for each, the local front
   (embeddings, first blocks) runs here, each remote stage's forward runs on a server, the head
   and loss run here, then backward goes the other way: each stage's backward on a server
   returns the gradient of its input, and the local front's gradients accumulate here;
2. every stage commits the step (one AdamW step on its servers, exactly once);
3. the local AdamW step.

With ``[run.privacy]`` (record level) a step is DP-SGD over the whole model instead: Poisson-sampled
records, each example clipped by its norm across our parts and every stage, noise here and on each
stage's server (node/sharding/private.py); epsilon goes in the report, the record and the checkpoint,
and a trainer whose budget is spent stops.

Raw bytes and labels never leave the trainer: servers see hidden states after the first
``local_blocks`` blocks and gradients with respect to them. Step ids are
``(session << 24) | step`` with a random session, so a restarted trainer never reuses an id a
server remembers as applied.

Each step appends a line to ``<workdir>/steps.jsonl`` (loss, the stages' versions, the servers
used) and calls ``on_step`` (the CLI's progress line and metrics); each round appends a ``RoundReport``
to ``<workdir>/report.jsonl``, the fields ``zen-node join`` writes (node/training/report.py); a step's time
counts as the ``inner`` phase of ``phases`` (node/runtime.py), the wait for stage servers as ``peer_wait``. Its life in
the swarm (identity, DHT, record, heartbeat, shutdown) is a ``NodeRuntime`` (node/runtime.py).
Several trainers may train against the same servers at once (each step is applied once, in
arrival order). Every round (``train.inner_steps`` steps) the trainers average their own parts
(embeddings, first blocks, head) through the run's aggregator, once at least
``aggregation.min_group_size`` of them are listed (node/sharding/fronts.py); the report's ``group``
field is that round's group size (0: none, or not a round's last step), as is the round line's ``group_size``.

Checkpoint. After each round (after its parts are averaged) the trainer writes its own parts, their
averager's anchors and compression carry, AdamW's state and the batch order to
``<workdir>/checkpoint.safetensors`` (node/training/checkpoint.py's format); ``--resume`` continues
from the round it holds (steps of an unfinished round are trained again). Then it evaluates: the
mean loss on 4 held-out batches (the corpus's last tenth, as ``zen-node join``'s trainer), through
its parts and the stages' forward (which steps no stage), reported as ``eval_loss``.

Contribution ledger. A sharded trainer's steps reach the stages one by one (the stages' own
averaging is among their servers); the group its parts average in (above) is not named in its
receipts yet. What it gives is its samples and its time: every
``train.inner_steps`` steps (a round, as ``--rounds`` counts them) it signs a receipt of outcome
``sharded`` (node/ledger/receipts.py) with U = itself, the round's samples (sequences) and the
wall seconds of its steps (remote stage calls included), through the same ``ContributionLedger`` as
the data-parallel trainer (node/training/ledger.py), which publishes its summary in the DHT. Steps
of an unfinished round are credited when ``run_forever`` ends.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from dht import Capacity, NodeIdentity, PeerRecord, encode_sketch
from node.aggregation.base import AggregationResult
from node.capacity import device_memory_bytes, device_name, pick_device
from node.config import NodeConfig, RunConfig
from node.data import ByteBatches, batch_seed, byte_histogram, load_corpus, split_corpus
from node.model import build_model
from node.runtime import NodeRuntime, PhaseClock
from node.sharding.catchup import SLOT, catch_up, join_cohort
from node.sharding.client import RemoteStages, StageUnavailableError
from node.sharding.fronts import FrontAverager
from node.sharding.pipeline import StepPipeline
from node.sharding.private import ShardedDPSGD, load_dp_steps, save_dp_steps
from node.sharding.snapshot import save_stage_weights
from node.sharding.stages import LocalParts
from node.training.checkpoint import CHECKPOINT_FILE, Checkpoint
from node.training.ledger import ContributionLedger
from node.training.lineage import LineageServer
from node.training.outer import state_digest
from node.training.privacy import TrainerPrivacy
from node.training.report import STEPS_FILE, RoundOutcome, RoundReport, append_report
from node.wire_meter import WireMeter

logger = logging.getLogger(__name__)

EVAL_BATCHES = 4  # held-out batches per evaluation, as zen-node join's trainer
EVAL_SEED = 1234  # their order: the same every evaluation


@dataclass
class StepReport:
    """One line of a sharded trainer's ``steps.jsonl`` (its rounds go to ``report.jsonl``: ``RoundReport``)."""

    step: int  # steps done, this one included
    loss: float  # the batch's training loss before the update
    versions: list[int]  # each stage's version after this step's commit
    servers: list[str]  # the server each stage's commit went to (PeerID prefix)
    seconds: float
    tokens_per_second: float
    failovers: int  # calls moved to another server so far
    bans: int  # servers this trainer banned so far
    group: int = 0  # trainers that averaged their own parts at the end of this step's round (0: none)
    eval_loss: float | None = None  # at a round's last step: the held-out loss after the round (``evaluate``)
    cohort: str | None = None  # with [run.cohorts]: the cohort this trainer averaged in (node/sharding/fronts.py)
    epsilon: float | None = None  # with [run.privacy]: epsilon spent so far (node/sharding/private.py)
    bytes_sent: int = 0  # bytes our libp2p daemon sent so far (node/wire_meter.py; read at round ends; -1: unknown)


def training_batches(run: RunConfig, corpus: bytes) -> ByteBatches:
    """The batch order a trainer uses on ``corpus`` (the same as an unsharded TrainingNode's)."""
    train_bytes, _ = split_corpus(corpus, run.model.context)
    seed = batch_seed(run.train.seed, train_bytes)
    return ByteBatches(train_bytes, run.model.context, run.train.batch_size, seed=seed)


def unsharded_losses(run: RunConfig, corpus: bytes, steps: int) -> list[float]:
    """The same steps on one machine with the whole model: the reference a sharded run must match."""
    model = build_model(run.model, run.train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.train.inner_lr, weight_decay=run.train.weight_decay)
    batches, losses = training_batches(run, corpus), []
    for _ in range(steps):
        tokens, targets = batches.next()
        loss = model(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


class ShardedTrainer:
    """A data-holding trainer whose middle blocks live on stage servers.

    Args:
        config: the node's configuration; ``run.sharding.stages`` must be >= 1.
        stop_event: set it to stop after the current step.
        on_step: called with each StepReport.
    """

    def __init__(
        self,
        config: NodeConfig,
        stop_event: threading.Event | None = None,
        on_step: Callable[[StepReport], None] | None = None,
    ):
        if config.run.sharding.stages < 1:
            raise ValueError("ShardedTrainer needs [run.sharding] stages >= 1")
        # configuration and control
        self.config, self.run = config, config.run
        self.workdir = config.workdir_path
        self.stop_event = stop_event or threading.Event()
        self.on_step = on_step or (lambda report: None)
        # local data, device and model: built by prepare()
        self.identity: NodeIdentity
        self.sketch: list[float]  # the data sketch in our record
        self.batches: ByteBatches
        self.device: torch.device
        self.local: LocalParts  # embedding, first blocks, head
        self.optimizer: torch.optim.Optimizer
        self.privacy: TrainerPrivacy | None = None  # record-level DP-SGD over the whole model (private.py)
        # the swarm: the runtime is born in prepare() (identity), the stages' client in join()
        self.runtime: NodeRuntime | None = None  # identity, DHT, heartbeat; owns shutdown
        self.remote: RemoteStages | None = None
        self.fronts: FrontAverager | None = None  # averages our own parts with the other trainers (fronts.py)
        self.parts_server: LineageServer | None = None  # serves them to late joiners (catchup.py)
        self.meter: WireMeter | None = None  # bytes our daemon sends (stage calls, averaging, DHT)
        self._bytes_sent = 0  # its last reading
        self._resumed_fronts: dict[str, Any] | None = None  # the averager's state from --resume's checkpoint
        self._landed: AggregationResult | None = None  # overlapped: the round that landed during this one
        # progress
        self.step = 0
        self.share = 1.0  # our share of a stage's step: 1 / the run's trainers, counted each round (messages.py)
        self.session = secrets.randbits(30)  # the high bits of our step ids
        self.phases = PhaseClock()  # seconds per phase and what we wait for (metrics, progress line)
        # the contribution ledger: a receipt per round of steps (module docstring)
        self.ledger = ContributionLedger(config)
        self._uncredited = (0, 0.0)  # samples and seconds of the steps since the last receipt
        self._round_losses: list[float] = []  # this round's steps' training losses, for its report line
        self._round_compute = 0.0  # seconds its steps took, without averaging and evaluation (utilization)
        self._round_started = time.monotonic()

    @property
    def round(self) -> int:
        """Rounds of ``train.inner_steps`` steps done (what ``--rounds`` counts)."""
        return self.step // self.run.train.inner_steps

    def prepare(self) -> None:
        """Identity, data, device and the local parts (everything that needs no network)."""
        self.runtime = NodeRuntime.create(self.config, self.phases)
        self.identity = self.runtime.identity
        corpus = load_corpus(self.config.data)
        self.sketch = byte_histogram(corpus)
        self.batches = training_batches(self.run, corpus)
        _, held_out = split_corpus(corpus, self.run.model.context)
        eval_batches = ByteBatches(held_out, self.run.model.context, self.run.train.batch_size, seed=EVAL_SEED)
        self.eval_set = eval_batches.take(EVAL_BATCHES)
        self.device = pick_device(self.config.device)
        self.local = LocalParts(build_model(self.run.model, self.run.train.seed), self.run.sharding.local_blocks)
        self.local.to(self.device)
        train = self.run.train
        self.optimizer = torch.optim.AdamW(self.local.parameters(), lr=train.inner_lr, weight_decay=train.weight_decay)
        if self.run.privacy.enabled:  # DP-SGD on the training split's records (node/sharding/private.py)
            dpsgd = partial(ShardedDPSGD, micro_batches=self.run.sharding.micro_batches)
            train_bytes = split_corpus(corpus, self.run.model.context)[0]
            self.privacy = TrainerPrivacy.create(
                self.config, self.local, self.optimizer, train_bytes, train.batch_size, dpsgd
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.config.resume:
            self._load_checkpoint()

    def _record_fields(self) -> dict[str, Any]:
        """Our own PeerRecord fields, read at each heartbeat (the runtime signs them)."""
        kind = self.device.type if self.device.type in ("cpu", "cuda", "mps", "xpu") else "cpu"
        return dict(
            capacity=Capacity(kind, device_name(self.device)[:128], device_memory_bytes(self.device)),
            sketch=encode_sketch(self.sketch),
            roles=("trainer",),
            round=self.step,
            state_digest=b"",
            epsilon=-1.0 if self.privacy is None else self.privacy.epsilon(),
        )

    def join(self) -> None:
        """Start the DHT peer, announce ourselves, and wait until every stage has a server."""
        if self.runtime is None:
            raise RuntimeError("ShardedTrainer.prepare() was not called")
        dht = self.runtime.start()
        self.meter = WireMeter.for_dht(dht)
        if self.meter is not None:
            self.runtime.adopt("wire meter", self.meter.stop)
        self.runtime.announce(self._record_fields)
        self._round_started = time.monotonic()
        self.remote = remote = RemoteStages(dht, self.run, self.identity, self.workdir, self.stop_event)
        self.runtime.adopt("remote stages", remote.shutdown)
        parts = list(self.local.named_parameters())
        self.fronts = FrontAverager(dht, self.run, self.identity, parts, self.stop_event, self.evaluate)  # gated
        if self._resumed_fronts is not None:
            self.fronts.restore(self._resumed_fronts)
        self.runtime.adopt("trainers' averaging", self.fronts.shutdown)
        with self.phases.phase("peer_wait", f"waiting for servers of the run's {self.run.sharding.stages} stages"):
            found = remote.wait_for_stages()
        if not found:
            raise StageUnavailableError(
                f"no server hosts some of the run's {self.run.sharding.stages} stages; start `zen-node serve` "
                f"with this run's config (peers listed: {len(self.runtime.peers())})"
            )
        if self.config.min_peers > 1:  # trainers that start together average from the same parts (fronts.py)
            self.runtime.wait_for_trainers(self.config.min_peers, self.stop_event)
        self.parts_server = LineageServer(dht, self.run.run_id, kind="parts")
        self.runtime.adopt("parts server", self.parts_server.shutdown)
        peers = self.runtime.peers()
        self.count_trainers(peers)
        if self.step == 0 and self._resumed_fronts is None:  # late: take the parts of the trainers ahead
            with self.phases.phase("download", "taking the parts of the trainers ahead"):
                timeout = self.run.aggregation.timeout + 10.0  # a donor serves its parts once its round averaged
                run_hash = self.run.digest()
                me, steps = self.identity.peer_id, self.run.train.inner_steps
                self.step = catch_up(self.parts_server, self.fronts, me, peers, run_hash, steps, timeout)

    def train_step(self) -> StepReport:
        """One step (module docstring): micro-batches through the local and remote parts, commit, local step."""
        remote = self._remote()
        started = time.perf_counter()
        step_id = (self.session << 24) | self.step
        if self.fronts is not None:  # overlapped averaging: the last round's mean, as soon as it is there
            self._landed = self.fronts.land(wait=False) or self._landed
        if self.privacy is not None:
            batch, total, versions, servers = self._private_step(remote, step_id)
        else:
            batch, total, versions, servers = self._plain_step(remote, step_id)
        self.step += 1
        compute = time.perf_counter() - started  # the step alone, without a round's averaging and evaluation
        group, eval_loss = 0, None
        if self.step % self.run.train.inner_steps == 0:  # a round's last step
            peers = self.runtime.peers() if self.runtime is not None else []  # one read a round: averaging, share
            group = self._average_fronts(peers)
            if self.parts_server is not None and self.fronts is not None:
                self.parts_server.keep(SLOT, self.fronts.served())  # what a late joiner takes (catchup.py)
            self._save_checkpoint()
            self.count_trainers(peers)
            eval_loss = self.evaluate()
            self._bytes_sent = self.meter.bytes_sent() if self.meter is not None else 0
        seconds = time.perf_counter() - started
        report = StepReport(
            step=self.step,
            loss=total,
            versions=versions,
            servers=[(s or "")[:16] for s in servers],
            seconds=seconds,
            tokens_per_second=batch * self.run.model.context / max(seconds, 1e-9),
            failovers=remote.stats["failovers"],
            bans=len(remote.bans_published),
            group=group,
            eval_loss=eval_loss,
            cohort=self.fronts.cohort_id if self.fronts is not None else None,
            epsilon=None if self.privacy is None else round(self.privacy.epsilon(), 4),
            bytes_sent=self._bytes_sent,
        )
        append_report(self.workdir, report, STEPS_FILE)
        samples, spent = self._uncredited
        self._uncredited = (samples + batch, spent + seconds)
        self._round_losses.append(total)
        self._round_compute += compute
        if eval_loss is not None:
            append_report(self.workdir, self._round_report(group, eval_loss))
            self._credit()
        self.on_step(report)
        return report

    def _plain_step(self, remote: RemoteStages, step_id: int) -> tuple[int, float, list[int], list[str | None]]:
        """A step's gradients (module docstring, 1-2) and the local AdamW step; (batch, loss, versions, servers)."""
        tokens, targets = self.batches.next()
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        count = self.run.sharding.micro_batches
        pipeline = StepPipeline(remote, step_id, self.run.sharding.stages, count)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for piece, piece_targets in zip(tokens.chunk(count), targets.chunk(count), strict=True):
            front = self.local.front(piece)
            out = pipeline.forward(front).to(self.device).requires_grad_(True)
            loss = self.local.head(out, piece_targets) * (piece.shape[0] / tokens.shape[0])
            loss.backward()
            assert out.grad is not None
            front.backward(pipeline.backward(out.grad).to(self.device))
            total += loss.item()
        versions = pipeline.commit(share=self.share)
        self.optimizer.step()
        return tokens.shape[0], total, versions, pipeline.servers

    def _private_step(self, remote: RemoteStages, step_id: int) -> tuple[int, float, list[int], list[str | None]]:
        """A DP-SGD step over the whole model (node/sharding/private.py): our parts here, the stages' clipped and
        noised sum on their servers at the commit; (batch, loss, versions, servers)."""
        assert self.privacy is not None and isinstance(self.privacy.dpsgd, ShardedDPSGD)
        dpsgd, stages = self.privacy.dpsgd, self.run.sharding.stages
        dpsgd.pipeline_for = lambda count: StepPipeline(remote, step_id, stages, count)
        loss = self.privacy.inner_step()  # type: ignore[misc]  # counted by the accountant
        save_dp_steps(self.workdir, self.run.digest(), self.privacy.spent)  # before the commit releases the step
        assert dpsgd.pipeline is not None
        versions = dpsgd.pipeline.commit(dpsgd.commit_noise, self.share)
        return dpsgd.last_batch, loss, versions, dpsgd.pipeline.servers

    def count_trainers(self, peers: Sequence[PeerRecord] | None = None) -> float:
        """Set and return our share of each stage's step: 1 / the trainers the run's records (``peers``, else read
        now) list, ours included, so the stages move as far for N trainers' steps as for one's."""
        assert self.runtime is not None
        run_hash, records = self.run.digest(), self.runtime.peers() if peers is None else peers
        trainers = {r.peer_id for r in records if "trainer" in r.roles and r.run_hash == run_hash}
        self.share = 1.0 / min(len(trainers | {self.identity.peer_id}), 1024)
        return self.share

    def evaluate(self) -> float:
        """The mean loss on the held-out batches: our parts here, the stages' forward on their servers (no step)."""
        remote = self._remote()
        step_id = (self.session << 24) | self.step
        losses = []
        with self.phases.phase("evaluation", "held-out loss"), torch.no_grad():
            for tokens, targets in self.eval_set:
                hidden = self.local.front(tokens.to(self.device)).cpu()
                for stage in range(self.run.sharding.stages):
                    hidden, _ = remote.forward(stage, step_id, hidden)
                losses.append(float(self.local.head(hidden.to(self.device), targets.to(self.device))))
        return sum(losses) / len(losses)

    def _average_fronts(self, peers: list[PeerRecord]) -> int:
        """Average our own parts with the other trainers at the end of a round; the group's size (0: none). With
        ``sharding.overlap_averaging`` the round only starts here, and this is the previous round's group."""
        if self.fronts is None:
            return 0
        batch = self.run.train.batch_size  # DP-SGD's Poisson batch: its expected size
        samples = self.run.train.inner_steps * (batch if self.privacy is None else self.privacy.step_samples(batch))
        if self.run.sharding.overlap_averaging:
            with self.phases.phase("aggregation_wait", f"waiting for round {self.round - 1}'s average"):
                result = self.fronts.land(wait=True) or self._landed
            self._landed = None
            self._prepare_fronts(peers)
            self.fronts.send(self.round, samples, peers)
        else:
            self._prepare_fronts(peers)
            with self.phases.phase("aggregation", f"averaging the trainers' parts, round {self.round}"):
                result = self.fronts.average(self.round, samples, peers)
        return result.group_size if result is not None else 0

    def _round_report(self, group: int, eval_loss: float) -> RoundReport:
        """The round's line of ``report.jsonl``: the fields a ``zen-node join`` trainer writes (module docstring)."""
        samples, losses, busy = self._uncredited[0], self._round_losses, self._round_compute
        wall = time.monotonic() - self._round_started
        self._round_losses, self._round_compute, self._round_started = [], 0.0, time.monotonic()
        return RoundReport(
            round=self.round,
            mode=self.fronts.outcome if group and self.fronts is not None else RoundOutcome.SOLO,
            eval_loss=eval_loss,
            train_loss=sum(losses) / max(len(losses), 1),
            group_size=group,
            samples=samples,
            samples_per_second=samples / max(wall, 1e-9),
            seconds=wall,
            state_digest=state_digest(list(self.local.parameters())).hex(),
            epsilon=None if self.privacy is None else round(self.privacy.epsilon(), 4),
            utilization=round(min(busy / max(wall, 1e-9), 1.0), 4),
            bytes_sent=self._bytes_sent,
            inner_steps=len(losses),
            cohort=self.fronts.cohort_id if self.fronts is not None else None,
        )

    def _prepare_fronts(self, peers: list[PeerRecord]) -> None:
        """Place us for this round's averaging, on the training thread (the main one: hivemind starts averagers
        there); after a cohort move, take the new cohort's cohort parts first (node/sharding/catchup.py)."""
        assert self.fronts is not None and self.parts_server is not None
        self.fronts.prepare(self.round)
        if self.fronts.moved():
            with self.phases.phase("download", f"taking cohort {self.fronts.cohort_id}'s parts"):
                me, run_hash = self.identity.peer_id, self.run.digest()
                join_cohort(self.parts_server, self.fronts, me, peers, run_hash, self.run.aggregation.timeout)

    def _save_checkpoint(self) -> None:
        """Our parts, their averager's anchors, AdamW and the batch order, after each round (module docstring)."""
        with self.phases.phase("checkpoint", "writing the checkpoint"):
            Checkpoint(
                run_hash=self.run.digest(),
                round=self.round,
                global_params=[p.detach().cpu() for p in self.local.parameters()],
                outer_opt=self.fronts.state() if self.fronts is not None else {},
                inner_opt=self.optimizer.state_dict(),
                data_rng=self.batches.state(),
                dp_rounds=0 if self.privacy is None else self.privacy.spent,
            ).save(self.workdir, run=self.run, peer_id=self.identity.peer_id)

    def _load_checkpoint(self) -> None:
        """Continue from ``<workdir>/checkpoint.safetensors`` (``--resume``), if there is one."""
        checkpoint = Checkpoint.load(self.workdir, self.run.digest())
        if self.privacy is not None:  # every step counted, those after the checkpoint's round too
            counted = max(checkpoint.dp_rounds if checkpoint else 0, load_dp_steps(self.workdir, self.run.digest()))
            self.privacy.restore(counted)
        if checkpoint is None:
            return
        what = f"checkpoint {self.workdir / CHECKPOINT_FILE} does not hold this sharded trainer's parts"
        checkpoint.copy_params_into(list(self.local.parameters()), what, "use another --workdir")
        self.optimizer.load_state_dict(checkpoint.inner_opt)
        self.batches.restore(checkpoint.data_rng)
        self.step = checkpoint.round * self.run.train.inner_steps
        self._resumed_fronts = checkpoint.outer_opt or None
        logger.info(f"resumed from {self.workdir / CHECKPOINT_FILE} at round {self.round} (step {self.step})")

    def _credit(self) -> None:
        """Sign the receipt of the steps since the last one (module docstring), if there were any."""
        samples, seconds = self._uncredited
        if self.runtime is None or not samples:
            return
        self._uncredited = (0, 0.0)
        final = bool(self.config.rounds) and self.round >= self.config.rounds
        fronts = self.fronts
        group = (fronts.last_round, fronts.outcome) if fronts is not None and fronts.last_round is not None else None
        self.ledger.credit_steps(self.runtime, samples, seconds, final=final, group=group)

    def run_forever(self) -> None:
        """Train ``node.rounds * train.inner_steps`` steps (0 rounds: until stopped)."""
        total = self.config.rounds * self.run.train.inner_steps
        try:
            while not self.stop_event.is_set() and not (total and self.step >= total) and not self._budget_spent():
                try:
                    with self.phases.phase("inner", f"step {self.step + 1}"):  # remote stages included
                        self.train_step()
                except StageUnavailableError:
                    if self.stop_event.is_set():
                        break  # stopped while waiting for a server: the step was not applied here
                    raise
        finally:
            self._credit()  # an unfinished round's steps were committed: they count
        if self.fronts is not None and not self.stop_event.is_set() and self.fronts.land(wait=True) is not None:
            self._save_checkpoint()  # overlapped averaging: the last round's mean landed after its checkpoint
        try:  # the stages' blocks, so that `zen-node export` can put the model together (snapshot.py)
            save_stage_weights(self.workdir, self.run, self._remote())
        except StageUnavailableError as e:
            logger.warning(f"the stages' blocks were not saved ({e}): `zen-node export` needs them")
        if self.runtime is not None:
            self.runtime.beat()

    def _budget_spent(self) -> bool:
        """Whether DP-SGD's budget allows no more step: the trainer then stops (it cannot train without the
        stages, and what it sends them is not covered by DP: node/sharding/private.py)."""
        if self.privacy is None or self.privacy.steps is None or self.privacy.steps.steps_left() != 0:
            return False
        logger.warning(
            f"privacy budget spent (epsilon {self.privacy.epsilon():.3f} of {self.privacy.target_epsilon}) "
            f"after {self.step} steps: stopping"
        )
        return True

    def _remote(self) -> RemoteStages:
        if self.remote is None:
            raise RuntimeError("ShardedTrainer.join() was not called")
        return self.remote

    def close(self) -> None:
        """Stop the runtime (heartbeat, the stages' client, DHT); safe to call more than once and after a
        partial start."""
        if self.runtime is not None:
            self.runtime.close()
