"""A trainer of a sharded run: local embedding, first blocks and head; the middle blocks on stage servers.

One step (see node/sharding/client.py for failover and exactly-once):

1. the batch is cut into ``sharding.micro_batches`` pieces; for each, the local front
   (embeddings, first blocks) runs here, each remote stage's forward runs on a server, the head
   and loss run here, then backward goes the other way: each stage's backward on a server
   returns the gradient of its input, and the local front's gradients accumulate here;
2. every stage commits the step (one AdamW step on its servers, exactly once);
3. the local AdamW step.

Raw bytes and labels never leave the trainer: servers see hidden states after the first
``local_blocks`` blocks and gradients with respect to them. Step ids are
``(session << 24) | step`` with a random session, so a restarted trainer never reuses an id a
server remembers as applied.

Each step appends a line to ``<workdir>/report.jsonl`` (loss, the stages' versions, the servers
used) and calls ``on_step`` (the CLI prints a progress line). Several trainers may train against
the same servers at once (each step is applied once, in arrival order); their local parts are
not averaged with each other: each trainer's embedding and head are its own.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from dht import Capacity, Heartbeat, NodeIdentity, encode_sketch, list_peers, start_dht
from node.capacity import device_memory_bytes, device_name, pick_device
from node.config import NodeConfig, RunConfig
from node.data import ByteBatches, byte_histogram, load_corpus
from node.model import build_model
from node.runtime import signed_record
from node.sharding.client import RemoteStages, StageUnavailableError
from node.sharding.stages import LocalParts

logger = logging.getLogger(__name__)

REPORT_FILE = "report.jsonl"


@dataclass
class StepReport:
    """One line of a sharded trainer's ``report.jsonl``."""

    step: int  # steps done, this one included
    loss: float  # the batch's training loss before the update
    versions: list[int]  # each stage's version after this step's commit
    servers: list[str]  # the server each stage's commit went to (PeerID prefix)
    seconds: float
    tokens_per_second: float
    failovers: int  # calls moved to another server so far
    bans: int  # servers this trainer banned so far


def training_batches(run: RunConfig, corpus: bytes) -> ByteBatches:
    """The batch order a trainer uses on ``corpus`` (the same as an unsharded TrainingNode's)."""
    from node.training.trainer import _batch_seed

    split = max(run.model.context + 2, int(len(corpus) * 0.9))
    train_bytes = corpus[:split]
    seed = _batch_seed(run.train.seed, train_bytes)
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
        self.config, self.run = config, config.run
        self.stop_event = stop_event or threading.Event()
        self.on_step = on_step or (lambda report: None)
        self.step = 0
        self.session = secrets.randbits(30)
        self.workdir = config.workdir_path

    @property
    def round(self) -> int:
        """Rounds of ``train.inner_steps`` steps done (what ``--rounds`` counts)."""
        return self.step // self.run.train.inner_steps

    def prepare(self) -> None:
        """Identity, data, device and the local parts (everything that needs no network)."""
        self.identity = NodeIdentity.load_or_create(self.config.identity_path)
        if self.config.data is None:
            raise ValueError("no data: pass --data with a text file or a folder of .txt/.jsonl files")
        corpus = load_corpus(self.config.data)
        self.sketch = byte_histogram(corpus)
        self.batches = training_batches(self.run, corpus)
        self.device = pick_device(self.config.device)
        self.local = LocalParts(build_model(self.run.model, self.run.train.seed), self.run.sharding.local_blocks)
        self.local.to(self.device)
        train = self.run.train
        self.optimizer = torch.optim.AdamW(self.local.parameters(), lr=train.inner_lr, weight_decay=train.weight_decay)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _record(self) -> bytes:
        kind = self.device.type if self.device.type in ("cpu", "cuda", "mps", "xpu") else "cpu"
        return signed_record(
            self.identity,
            self.run,
            self.config.record_ttl,
            capacity=Capacity(kind, device_name(self.device)[:128], device_memory_bytes(self.device)),
            sketch=encode_sketch(self.sketch),
            roles=("trainer",),
            round=self.step,
            state_digest=b"",
            maddrs=self.maddrs,
        )

    def join(self) -> None:
        """Start the DHT peer, announce ourselves, and wait until every stage has a server."""
        self.dht = start_dht(self.config.swarm, self.identity, [self.run.run_id])
        self.maddrs = tuple(str(m) for m in self.dht.get_visible_maddrs())[:16]
        self.heartbeat = Heartbeat(
            self.dht, self.run.run_id, self._record, period=self.config.heartbeat_period, ttl=self.config.record_ttl
        ).start()
        self.remote = RemoteStages(self.dht, self.run, self.identity, self.workdir, self.stop_event)
        if not self.remote.wait_for_stages():
            raise StageUnavailableError(
                f"no server hosts some of the run's {self.run.sharding.stages} stages; start `zen-node serve` "
                f"with this run's config (peers listed: {len(list_peers(self.dht, self.run.run_id))})"
            )

    def train_step(self) -> StepReport:
        started = time.perf_counter()
        step_id = (self.session << 24) | self.step
        stages = self.run.sharding.stages
        tokens, targets = self.batches.next()
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        count = self.run.sharding.micro_batches
        pieces = list(zip(tokens.chunk(count), targets.chunk(count), strict=True))
        saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(stages)]
        servers: list[str | None] = [None] * stages
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro_batch, (piece, piece_targets) in enumerate(pieces):
            front = self.local.front(piece)
            hidden, inputs = front.detach().cpu(), []
            for stage in range(stages):
                inputs.append(hidden)
                hidden, servers[stage] = self.remote.forward(stage, step_id, hidden, servers[stage])
            out = hidden.to(self.device).requires_grad_(True)
            loss = self.local.head(out, piece_targets) * (piece.shape[0] / tokens.shape[0])
            loss.backward()
            assert out.grad is not None
            grad = out.grad.detach().cpu()
            for stage in reversed(range(stages)):
                saved[stage].append((inputs[stage], grad))
                grad, servers[stage] = self.remote.backward(
                    stage, step_id, micro_batch, inputs[stage], grad, servers[stage]
                )
            front.backward(grad.to(self.device))
            total += loss.item()
        versions = [self.remote.commit(stage, step_id, saved[stage], servers[stage]) for stage in range(stages)]
        self.optimizer.step()
        self.step += 1
        seconds = time.perf_counter() - started
        report = StepReport(
            step=self.step,
            loss=total,
            versions=versions,
            servers=[(s or "")[:16] for s in servers],
            seconds=seconds,
            tokens_per_second=tokens.numel() / max(seconds, 1e-9),
            failovers=self.remote.stats["failovers"],
            bans=len(self.remote.bans_published),
        )
        with open(self.workdir / REPORT_FILE, "a") as f:
            f.write(json.dumps(asdict(report)) + "\n")
        self.on_step(report)
        return report

    def run_forever(self) -> None:
        """Train ``node.rounds * train.inner_steps`` steps (0 rounds: until stopped)."""
        total = self.config.rounds * self.run.train.inner_steps
        while not self.stop_event.is_set() and not (total and self.step >= total):
            try:
                self.train_step()
            except StageUnavailableError:
                if self.stop_event.is_set():
                    break  # stopped while waiting for a server: the step was not applied here
                raise
        self.heartbeat.beat()

    def close(self) -> None:
        """Stop background work; safe after a partial start."""
        for name in ("heartbeat", "remote"):
            component = self.__dict__.pop(name, None)
            if component is not None:
                component.stop() if name == "heartbeat" else component.shutdown()
        dht = self.__dict__.pop("dht", None)
        if dht is not None:
            dht.shutdown()
