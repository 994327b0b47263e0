"""The training node: enroll, join, catch up, then DiLoCo outer rounds until told to stop.

One outer round (see docs/architecture.md):

1. ``inner_steps`` AdamW steps (or fewer, if ``round_seconds`` runs out) on the local model.
2. pseudo-gradient = global params - local params - what is already in flight: everything this
   node has trained and not yet sent, so a missed round's progress is carried, not lost.
3. the Aggregator replaces it with the weighted (by samples) mean over a group at this round,
   in a background thread: with ``train.overlap`` the next round's inner steps run meanwhile.
4. when the mean lands (at the end of the next round's inner steps: one round late), an outer
   Nesterov step on the global params; the local model moves by the same change and drops its
   own in-flight delta, which the mean now stands for (the staleness rule):
   ``local += (global_new - global_old) + delivered`` (with compression, ``delivered`` is only the
   part of our delta the ring carried; the rest stays in the local model: error feedback).
5. checkpoint, report, heartbeat with the new round and state digest.

If no group forms while other trainers are alive, the node waits for one of them to finish the
round and downloads its state (``resync``), keeping its own unsent progress on top of it. A node
alone applies its own delta (``solo``).

With ``[run.cohorts]`` enabled, the Aggregator is a ``HierarchicalAggregator`` (node/aggregation/hierarchy.py):
local parameters are never handed to it (their entries of the update are left as this node's own
delta), cohort parameters are averaged within the node's cohort, global ones also across cohorts.
A missed round is then applied solo, never resynced from a peer (whose cohort parameters may be
another cohort's), and the state this node shares with late joiners holds zeros in place of its
local parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch
from hivemind.utils import get_dht_time

from dht import (
    Heartbeat,
    NodeIdentity,
    PeerRecord,
    connect_to_peers,
    encode_sketch,
    list_peers,
    start_dht,
)
from dht.records import Capacity
from node._version import __version__
from node.aggregation.base import AggregationError, AggregationResult
from node.aggregation.factory import make_aggregator
from node.aggregation.hierarchy import HierarchicalAggregator, ParameterPartition, partition_parameters
from node.aggregation.secure import MAX_SECURE_GROUP, ring_bound
from node.capacity import fit_batch_size, pick_device, probe_capacity
from node.config import ConfigError, NodeConfig, describe_difference
from node.data import ByteBatches, DataError, load_corpus
from node.model import build_model
from node.secagg.fixed_point import FixedPointCodec
from node.secagg.privacy import (
    NoiseShare,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    clip_update,
    effective_multiplier,
)
from node.sketch import data_sketch
from node.training.state_sharing import SharedState, StateSharer
from node.wire_meter import WireMeter

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
REPORT_FILE = "report.jsonl"
EVAL_BATCHES = 4
DOWNLOAD_ATTEMPTS = 4


class ConfigMismatchError(Exception):
    """A peer of the same run uses a different run configuration."""


@dataclass
class RoundReport:
    """One line of ``report.jsonl``, and what the progress bar shows."""

    round: int
    mode: str  # "group", "solo", "resync", "loaded", or "local" (privacy budget spent: not sending)
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


@dataclass
class _InFlight:
    """One round's aggregation running in the background."""

    round: int
    sent: list[torch.Tensor]  # our own delta as sent (it stands in for the group's mean until it lands)
    mean: list[torch.Tensor]  # overwritten with the group's mean on success
    samples: int  # the samples behind ``sent`` (its weight)
    undelivered: list[torch.Tensor]  # filled on success with compression: what of ``sent`` the group's sum left out
    future: Future[tuple[str, AggregationResult | SharedState | None]] = field(repr=False)


def state_digest(tensors: Sequence[torch.Tensor]) -> bytes:
    """BLAKE2b-16 over the raw bytes of the global parameters."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


class TrainingNode:
    """A data-holding trainer in the swarm.

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
        self.config = config
        self.run = config.run
        self.stop_event = stop_event or threading.Event()
        self.on_round = on_round or (lambda report: None)
        self.run_hash = self.run.digest()
        self.workdir = config.workdir_path
        self.round = 0
        self.capacity = Capacity()
        self._digest = b""
        self.noise: NoiseShare | None = None  # this node's DP noise share (privacy.enabled)
        self.accountant: PrivacyAccountant | None = None
        self._budget_spent = False
        self._inflight: _InFlight | None = None
        self._unsent_samples = 0  # samples behind the progress not yet sent (carried when a round is missed)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aggregate")
        self._inner_seconds = 0.0  # inner-step time since the last report
        self._last_report = time.perf_counter()
        self._last_inner: tuple[float, int] = (float("nan"), 0)  # mean train loss and steps of the last inner phase
        self.meter: WireMeter | None = None
        self.partition: ParameterPartition | None = None  # parameter tags, with [run.cohorts]

    # ---- enrollment -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can fail without the network: identity, data, device, model, checkpoint."""
        if self.config.swarm.client_mode and self.run.aggregation.mode == "secure":
            raise ConfigError(
                "swarm.client_mode cannot aggregate securely (every peer reduces a part, so it must be "
                "reachable); drop --client-mode or set aggregation.mode = 'plain'"
            )
        self.identity = NodeIdentity.load_or_create(self.config.identity_path)
        if self.config.data is None:
            raise ValueError("no data: pass --data with a text file or a folder of .txt/.jsonl files")
        corpus = load_corpus(self.config.data)
        split = max(self.run.model.context + 2, int(len(corpus) * 0.9))
        train_bytes, eval_bytes = corpus[:split], corpus[split:]
        if len(eval_bytes) <= self.run.model.context + 1:
            eval_bytes = train_bytes
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
        seed = _batch_seed(train.seed, train_bytes)
        self.batches = ByteBatches(train_bytes, self.run.model.context, self.batch_size, seed=seed)
        evaluation = ByteBatches(eval_bytes, self.run.model.context, train.batch_size, seed=1234)
        self.eval_set = [evaluation.next() for _ in range(EVAL_BATCHES)]
        self.model = build_model(self.run.model, train.seed).to(self.device)
        self.global_params = [
            torch.nn.Parameter(p.detach().clone(), requires_grad=True) for p in self.model.parameters()
        ]
        if self.run.cohorts.enabled:
            self.partition = partition_parameters([name for name, _ in self.model.named_parameters()], self.run.cohorts)
        nesterov = train.outer_momentum > 0  # torch refuses Nesterov without momentum
        self.outer_opt = torch.optim.SGD(
            self.global_params, lr=train.outer_lr, momentum=train.outer_momentum, nesterov=nesterov
        )
        self.inner_opt = torch.optim.AdamW(self.model.parameters(), lr=train.inner_lr, weight_decay=train.weight_decay)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.run.privacy.enabled:
            self._setup_privacy()
        if self.config.resume:
            self._load_checkpoint()
        self._digest = state_digest(self.global_params)

    def _setup_privacy(self) -> None:
        """The noise share each round adds and the accountant of this node's budget."""
        privacy = self.run.privacy
        sigma = privacy.noise_multiplier or calibrate_noise_multiplier(
            privacy.target_epsilon, privacy.delta, privacy.planned_rounds
        )
        self.noise = NoiseShare(noise_multiplier=sigma, clip_norm=privacy.clip_norm, max_dropouts=privacy.max_dropouts)
        bound = ring_bound(self.run.aggregation, self.noise, self._compression_bound())
        scale = FixedPointCodec(MAX_SECURE_GROUP, bound, bits=self.run.compression.bits).scale
        dimension = sum(p.numel() for p in self.global_params)
        budgets = [b for b in (privacy.target_epsilon, self.config.epsilon_budget) if b > 0]
        budget = min(budgets, default=math.inf)
        self.accountant = PrivacyAccountant(
            effective_multiplier(sigma, privacy.clip_norm, scale, dimension), privacy.delta, budget
        )
        logger.info(
            f"differential privacy: clip {privacy.clip_norm}, noise multiplier {sigma:.4f}, "
            f"delta {privacy.delta}, budget epsilon {budget}"
        )

    def _compression_bound(self) -> float:
        """The low-bit code's clip bound (a cap: each group agrees on a tighter one from its members'
        update sizes, node/secagg/protocol.py); 0 when values keep the full ring."""
        compression = self.run.compression
        if compression.bits == 32:
            return 0.0
        return compression.bound or self.run.aggregation.clip_bound

    def _record(self) -> bytes:
        return PeerRecord(
            peer_id=self.identity.peer_id,
            signing_key=self.identity.signing_public_key,
            binding=self.identity.binding,
            x25519_key=self.identity.x25519_public_key,
            version=__version__,
            run_hash=self.run_hash,
            capacity=self.capacity,
            sketch=encode_sketch(self.sketch),
            roles=("trainer",),
            round=self.round,
            state_digest=self._digest,
            timestamp=get_dht_time(),
            run_config=self.run.to_bytes(),
            ttl=self.config.record_ttl,
            maddrs=getattr(self, "maddrs", ()),
            epsilon=-1.0 if self.accountant is None else self.accountant.epsilon(),
        ).sign(self.identity)

    def join(self) -> None:
        """Start the DHT peer, refuse a mismatched run, publish our record, and catch up with the swarm."""
        self.dht = start_dht(self.config.swarm, self.identity, [self.run.run_id])
        self.maddrs = tuple(str(m) for m in self.dht.get_visible_maddrs())[:16]
        self.meter = WireMeter.for_dht(self.dht)
        peers = [p for p in list_peers(self.dht, self.run.run_id) if p.peer_id != self.identity.peer_id]
        connect_to_peers(self.dht, peers)
        for peer in peers:
            if peer.run_hash != self.run_hash:
                theirs = _decode_run_config(peer.run_config)
                raise ConfigMismatchError(
                    f"peer {peer.peer_id[:16]} runs {self.run.run_id!r} with a different config "
                    f"({describe_difference(self.run, theirs)}); use the run's config file (--config)"
                )
        self.heartbeat = Heartbeat(
            self.dht,
            self.run.run_id,
            self._record,
            period=self.config.heartbeat_period,
            ttl=self.config.record_ttl,
        ).start()
        client_mode = self.config.swarm.client_mode
        self.sharer = StateSharer(self.dht, self.run.run_id, self._shared_state, client_mode=client_mode)
        options: dict[str, Any] = dict(
            config=self.run.aggregation,
            identity=self.identity,
            weight_bound=float(self.run.train.inner_steps * self.run.train.batch_size),
            client_mode=client_mode,
            stop_event=self.stop_event,
            bandwidth=self.capacity.upload_bytes_per_second or None,
            noise=self.noise,
            compression=self.run.compression,
            compression_bound=self._compression_bound(),
        )
        self.aggregator = (
            make_aggregator(self.dht, self.run.run_id, self.global_params, **options)
            if self.partition is None
            else HierarchicalAggregator(
                self.dht,
                self.run.run_id,
                self.run_hash,
                self.identity.peer_id,
                self.global_params,
                self.partition,
                self.run.cohorts,
                self.run.aggregation.min_group_size,
                **options,
            )
        )
        if any(p.round > self.round for p in peers):
            self._catch_up("loaded")
        self.sharer.announce(self.round)
        self._wait_for_peers()

    def _shared_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        return {"round": self.round, "run_hash": self.run_hash}, self._state_tensors()

    def _state_tensors(self) -> list[torch.Tensor]:
        """Global params and outer momentum, as shared with late joiners (local params as zeros: never sent)."""
        local = set(self.partition.local) if self.partition is not None else set()
        momentum = [self.outer_opt.state.get(p, {}).get("momentum_buffer") for p in self.global_params]
        params = [torch.zeros_like(p) if i in local else p.detach() for i, p in enumerate(self.global_params)]
        return params + [
            m.detach() if m is not None and i not in local else torch.zeros_like(p)
            for i, (m, p) in enumerate(zip(momentum, self.global_params, strict=True))
        ]

    def _catch_up(self, mode: str) -> bool:
        """Download the most advanced peer's state and start from it; return whether it was applied."""
        logger.info(f"downloading the swarm's state (we are at round {self.round})")
        state = self._download(self.round)
        if state is None:
            logger.warning("no usable state from peers; continuing from our own")
            return False
        self._apply_state(state)
        with torch.no_grad():
            for local, param in zip(self.model.parameters(), self.global_params, strict=True):
                local.copy_(param)
        self._finish_round(mode, samples=0)
        logger.info(f"loaded the swarm's state at round {self.round}")
        return True

    def _download(self, at_least: int) -> SharedState | None:
        """The most advanced peer's state if it has finished round ``at_least`` or later (retried)."""
        state = None
        for attempt in range(DOWNLOAD_ATTEMPTS):
            # A fresh peer's first dials can fail (libp2p then backs off for a few seconds): retry.
            state = self.sharer.download(self._state_tensors(), self.run_hash)
            if state is not None or self.stop_event.wait(2.0 * 2**attempt):
                break
        return state if state is not None and state.round >= at_least else None

    def _apply_state(self, state: SharedState) -> None:
        """Global parameters, outer momentum and round from a downloaded state (the local model is left, and so
        are our own local parameters with [run.cohorts])."""
        count = len(self.global_params)
        local = set(self.partition.local) if self.partition is not None else set()
        with torch.no_grad():
            for i, (param, value, momentum) in enumerate(
                zip(self.global_params, state.tensors[:count], state.tensors[count:], strict=True)
            ):
                if i in local:
                    continue
                param.copy_(value.to(param.device))
                self.outer_opt.state[param]["momentum_buffer"] = momentum.to(param.device).clone()
        self.round = state.round

    def _wait_for_peers(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.stop_event.is_set():
            trainers = [p for p in list_peers(self.dht, self.run.run_id) if "trainer" in p.roles]
            if len(trainers) >= self.config.min_peers or time.monotonic() > deadline:
                return
            logger.info(f"waiting for peers: {len(trainers)}/{self.config.min_peers} trainers listed")
            self.stop_event.wait(1.0)

    # ---- training ---------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Mean loss of the global parameters on the held-out batches."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.model.parameters()]
            for local, param in zip(self.model.parameters(), self.global_params, strict=True):
                local.copy_(param)
            losses = [float(self.model(x.to(self.device), y.to(self.device))) for x, y in self.eval_set]
            for local, value in zip(self.model.parameters(), saved, strict=True):
                local.copy_(value)
        return sum(losses) / len(losses)

    def train_round(self) -> None:
        """Inner steps; then land the previous round's aggregation and launch this one's (module docstring)."""
        self._inner_phase()
        if self.stop_event.is_set():
            return
        if self._inflight is not None:
            self._land()
            if self.stop_event.is_set() or (self.config.rounds and self.round >= self.config.rounds):
                return
        self._launch()
        last = bool(self.config.rounds) and self.round + 1 >= self.config.rounds
        if not self.run.train.overlap or last:
            self._land()

    def _inner_phase(self) -> None:
        """Up to ``inner_steps`` AdamW steps, cut short after ``round_seconds`` (a slow peer sends fewer samples)."""
        train = self.run.train
        started = time.perf_counter()
        deadline = started + train.round_seconds if train.round_seconds else math.inf
        losses: list[float] = []
        self.model.train()
        for _ in range(train.inner_steps):
            if self.stop_event.is_set() or (losses and time.perf_counter() >= deadline):
                break
            tokens, targets = self.batches.next()
            loss = self.model(tokens.to(self.device), targets.to(self.device))
            self.inner_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.inner_opt.step()
            losses.append(loss.item())
        self._inner_seconds += time.perf_counter() - started
        self._unsent_samples += len(losses) * self.batch_size
        self._last_inner = (sum(losses) / len(losses) if losses else float("nan"), len(losses))

    def _launch(self) -> None:
        """Hand everything trained and not yet sent (global - local) to the aggregation, in the background."""
        samples, self._unsent_samples = self._unsent_samples, 0
        with torch.no_grad():
            sent = [g.detach() - p.detach() for g, p in zip(self.global_params, self.model.parameters(), strict=True)]
        round_no = self.round + 1
        future: Future[tuple[str, Any]] = Future()
        if self.accountant is not None:
            clip_update(sent, self.run.privacy.clip_norm)  # the clipped-off excess stays unsent, for later
            if not self.accountant.can_contribute():
                if not self._budget_spent:
                    logger.warning(
                        f"privacy budget spent (epsilon {self.accountant.epsilon():.3f} of "
                        f"{self.run.privacy.target_epsilon}): no longer sending updates; training locally"
                    )
                    self._budget_spent = True
                future.set_result(("local", None))
        mean = [t.clone() for t in sent]
        undelivered: list[torch.Tensor] = []
        if isinstance(self.aggregator, HierarchicalAggregator):
            self.aggregator.place()  # here, not in the worker: hivemind starts averagers from the main thread only
        if not future.done():
            future = self._worker.submit(self._aggregate, round_no, mean, max(samples, 1), undelivered)
        self._inflight = _InFlight(round_no, sent, mean, samples, undelivered, future)

    def _aggregate(
        self, round_no: int, mean: list[torch.Tensor], samples: int, undelivered: list[torch.Tensor]
    ) -> tuple[str, Any]:
        """Runs in the background: a group's mean, else a peer's newer state, else our own delta alone."""
        try:
            result = self.aggregator.aggregate(round_no, mean, weight=samples)
        except AggregationError as e:
            logger.warning(str(e))
            result = None
        if result is not None:
            residual = self.aggregator.residual
            if residual is not None:  # compression: what the sum left out stays ours
                pieces = residual.split([t.numel() for t in mean])
                undelivered += [
                    piece.view_as(t).to(t.device, t.dtype, copy=True) for piece, t in zip(pieces, mean, strict=True)
                ]
            return "group", result
        if self.stop_event.is_set():
            return "stopped", None
        if self.partition is None and self._others_alive() and self._wait_for_peer_ahead():
            state = self._download(round_no)
            if state is not None:
                return "resync", state
        logger.warning(f"round {round_no}: no group formed; applying our own update alone")
        return "solo", None  # ``mean`` still holds our own update

    def _land(self) -> None:
        """Wait for the in-flight aggregation and apply it (the staleness rule in the module docstring)."""
        flight, self._inflight = self._inflight, None
        assert flight is not None
        mode, outcome = flight.future.result()
        if mode == "stopped":
            return
        before = [g.detach().clone() for g in self.global_params]
        group_size = 1
        delivered = flight.sent
        if mode == "group":
            assert isinstance(outcome, AggregationResult)
            if flight.undelivered:  # compression left part of our delta out: the local model keeps it
                delivered = [s - u for s, u in zip(flight.sent, flight.undelivered, strict=True)]
            self._outer_step(flight.mean)
            group_size = outcome.group_size
            if self.accountant is not None and self.identity.peer_id in outcome.peers:
                self.accountant.record()
        elif mode == "resync":
            assert isinstance(outcome, SharedState)
            self._apply_state(outcome)
            self._unsent_samples += flight.samples  # our delta was not merged: it is still ours to send
            group_size = 0
        else:  # "solo" or "local": our own update alone
            self._outer_step(flight.sent)
        with torch.no_grad():
            moved = zip(self.model.parameters(), self.global_params, before, delivered, strict=True)
            for local, new, old, sent in moved:
                local.add_(new.detach() - old)
                if mode != "resync":
                    local.add_(sent)  # the global step now carries it (or the group's mean in its place)
        self.round = max(self.round, flight.round) if mode != "resync" else self.round
        self._finish_round(mode, group_size=group_size, samples=flight.samples)

    def _others_alive(self) -> bool:
        return any(
            p.peer_id != self.identity.peer_id and "trainer" in p.roles for p in list_peers(self.dht, self.run.run_id)
        )

    def _wait_for_peer_ahead(self) -> bool:
        """Wait (up to the aggregation timeout) until a live peer has finished a later round than ours."""
        deadline = time.monotonic() + self.run.aggregation.timeout
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            ahead = [p for p in list_peers(self.dht, self.run.run_id) if p.round > self.round]
            if ahead:
                connect_to_peers(self.dht, ahead)
                return True
            self.stop_event.wait(1.0)
        return False

    def _outer_step(self, mean_delta: list[torch.Tensor]) -> None:
        for param, grad in zip(self.global_params, mean_delta, strict=True):
            param.grad = grad.to(param.device, param.dtype)
        self.outer_opt.step()
        self.outer_opt.zero_grad(set_to_none=True)

    def _finish_round(self, mode: str, group_size: int = 0, samples: int = 0) -> None:
        now = time.perf_counter()
        seconds = now - self._last_report
        train_loss, steps = self._last_inner if mode not in ("initial", "loaded") else (float("nan"), 0)
        utilization = min(1.0, self._inner_seconds / max(seconds, 1e-9)) if steps else 0.0
        self._inner_seconds, self._last_report = 0.0, now
        self._digest = state_digest(self.global_params)
        report = RoundReport(
            round=self.round,
            mode=mode,
            eval_loss=self.evaluate(),
            train_loss=train_loss,
            group_size=group_size,
            samples=samples,
            samples_per_second=samples / max(seconds, 1e-9),
            seconds=seconds,
            state_digest=self._digest.hex(),
            epsilon=None if self.accountant is None else round(self.accountant.epsilon(), 4),
            utilization=round(utilization, 4),
            bytes_sent=self.meter.bytes_sent() if self.meter is not None else 0,
            inner_steps=steps,
            cohort=self._cohort_id(),
        )
        self._save_checkpoint()
        if self.config.save_round_params:
            rounds_dir = self.workdir / "rounds"
            rounds_dir.mkdir(exist_ok=True)
            _atomic_save([p.detach().cpu() for p in self.global_params], rounds_dir / f"round-{self.round:05d}.pt")
        with open(self.workdir / REPORT_FILE, "a") as f:
            f.write(json.dumps(asdict(report)) + "\n")
        self.sharer.announce(self.round)
        self._refresh_sketch()
        self.heartbeat.beat()
        self.on_round(report)

    def _cohort_id(self) -> str | None:
        cohort = getattr(self.__dict__.get("aggregator"), "cohort", None)
        return cohort.cohort_id if cohort is not None else None

    def _refresh_sketch(self) -> None:
        """Every ``cohorts.sketch_every`` rounds, sketch the data again (the folder may have changed)."""
        every = self.run.cohorts.sketch_every
        if not (self.partition is not None and every and self.round % every == 0 and self.round and self.config.data):
            return
        try:
            self.sketch = data_sketch(load_corpus(self.config.data), noise=self.run.cohorts.sketch_noise)
        except (DataError, ValueError) as e:  # keep the old sketch: the data may be mid-update
            logger.warning(f"could not refresh the data sketch: {e}")

    # ---- checkpoints ------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        _atomic_save(
            {
                "run_hash": self.run_hash,
                "round": self.round,
                "global": [p.detach().cpu() for p in self.global_params],
                "outer_opt": self.outer_opt.state_dict(),
                "inner_opt": self.inner_opt.state_dict(),
                "data_rng": self.batches.state(),
                "dp_rounds": 0 if self.accountant is None else self.accountant.rounds,
            },
            self.workdir / CHECKPOINT_FILE,
        )

    def _load_checkpoint(self) -> None:
        path = self.workdir / CHECKPOINT_FILE
        if not path.exists():
            logger.info(f"--resume: no checkpoint at {path}; starting fresh")
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {path} is unreadable ({e}); move it away to start fresh") from None
        if state.get("run_hash") != self.run_hash:
            raise ValueError(f"checkpoint {path} belongs to another run config; use that config or another --workdir")
        with torch.no_grad():
            for param, value in zip(self.global_params, state["global"], strict=True):
                param.copy_(value)
            for local, param in zip(self.model.parameters(), self.global_params, strict=True):
                local.copy_(param)
        self.outer_opt.load_state_dict(state["outer_opt"])
        self.inner_opt.load_state_dict(state["inner_opt"])
        self.batches.restore(state["data_rng"])
        self.round = int(state["round"])
        if self.accountant is not None:
            self.accountant.rounds = int(state.get("dp_rounds", 0))
        logger.info(f"resumed from {path} at round {self.round}")

    # ---- lifecycle --------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Train until ``config.rounds`` rounds are done (0: forever) or the stop event is set."""
        if self.round == 0 and not (self.workdir / REPORT_FILE).exists():
            self._finish_round("initial")
        self._last_report = time.perf_counter()
        while not self.stop_event.is_set():
            if self.config.rounds and self.round >= self.config.rounds and self._inflight is None:
                break
            self.train_round()

    def close(self) -> None:
        """Stop background work; safe to call more than once and after a partial start."""
        self.stop_event.set()  # a pending aggregation returns at once
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self.meter is not None:
            self.meter.stop()
        for name in ("heartbeat", "aggregator", "sharer"):
            component = self.__dict__.pop(name, None)
            if component is not None:
                try:
                    component.stop() if name == "heartbeat" else component.shutdown()
                except Exception as e:
                    logger.debug(f"error while stopping {name}: {e}")
        dht = self.__dict__.pop("dht", None)
        if dht is not None:
            dht.shutdown()


def _batch_seed(run_seed: int, data: bytes) -> int:
    """The batch order: fixed by the run's seed and the local data, so a rerun on the same data repeats it."""
    digest = hashlib.blake2b(data, digest_size=4, key=run_seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little")


def _decode_run_config(raw: bytes) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(raw, raw=False, max_str_len=1024, max_array_len=64, max_map_len=64)
        return value if isinstance(value, dict) else {}
    except Exception:
        return {}


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, fsync, rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
