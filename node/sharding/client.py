"""The trainer's side of sharding: call remote stages, pick servers, fail over, spot-check, ban.

Server choice. The servers of a stage are the live records that announce it (same run hash),
less those banned and those that failed in the last ``COOLDOWN_SECONDS``. Each is scored by its
measured latency (an exponential moving average of call times) times one plus the queue length
it last reported; the lowest score wins, and a server never measured scores as the best measured
one so it gets tried. Within one step a trainer keeps using the server a stage's forward went to,
so backward and commit usually land where the step's gradients already wait.

Failover. A call that times out, breaks or is refused (``busy``, a stage not hosted) moves on to
the next server; a stage with no server left waits for one (up to ``WAIT_FOR_SERVER_SECONDS``).
Exactly once: backward recomputes from the inputs, so any replica can take it; commit names
(trainer, step); a server that lacks some micro-batches' gradients says which, the trainer sends
them again and commits again; a server that already applied the step (itself or through
replication) answers ok without applying it twice. A commit is signed: the server answers the
digest of the step's summed gradients, the trainer signs it and commits again with the proof,
which the server's replicas check before they apply the step (node/sharding/proofs.py).

Spot-checks. A ``spot_check_fraction`` of forward calls, drawn from the OS's randomness so a
server cannot tell which, is recomputed here with the weights the server publishes for that
version; an output further than ``spot_check_tolerance`` (relative, max norm) from ours bans the
server: a signed ban record (dht/bans.py) naming the run, stage, version and the digests of the
inputs and of the claimed output (the tensors are kept in ``<workdir>/evidence/``); the call is
redone on another server. Other trainers' bans count only from trainers of this run with
``sharding.ban_min_rounds`` rounds, and exclude a server only once ``sharding.ban_quorum`` distinct
reporters agree (fewer: it is tried last); expired bans drop out (dht/bans.py ``honoured_bans``).

Weights that agree (node/sharding/agreement.py). A spot-check cannot catch a server that computes
consistently with wrong weights, so after a commit, with the same probability as a spot-check,
the trainer asks every usable server of the stage for its (version, history, weights digest). A
server whose digest is a minority among the replicas of the same version and history is treated
like a failed spot-check: banned with evidence (its report and the agreed digest); one outside the
compared class is only tried last until a later check confirms it. The agreed digests are kept
(``MAX_AGREED``), and a spot-check also checks the weights a server publishes against them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import threading
import time
from pathlib import Path

import hivemind
import msgpack
import torch
from hivemind.utils import get_dht_time

from dht import NodeIdentity, list_peers
from dht.bans import BanRecord, evidence_digest, honoured_bans, list_bans, publish_ban
from node.config import RunConfig
from node.sharding.agreement import WeightsReport, compare_weights, reported_weights, weights_digest
from node.sharding.messages import STATE_BLOCKS, StageReply, StageRequest
from node.sharding.proofs import gradients_digest, sign_step
from node.sharding.rpc import P2PLoop, call_stage, stage_handler_name
from node.sharding.stages import Stage, build_stage

logger = logging.getLogger(__name__)

COOLDOWN_SECONDS = 30.0  # a server that failed a call is skipped this long
REFRESH_SECONDS = 2.0  # how stale the view of servers and bans may be
WAIT_FOR_SERVER_SECONDS = 120.0  # how long a stage with no server is waited for before giving up
LATENCY_SMOOTHING = 0.3  # weight of the newest call in the latency average
MAX_SIGNATURES = 3  # step proofs one server may ask for in a row before the commit moves elsewhere
MAX_AGREED = 64  # (stage, version, history) -> agreed weights digest entries a trainer keeps


class StageUnavailableError(Exception):
    """No server of a stage answered; the message names the stage and what to do."""


class RemoteStages:
    """Calls the run's remote stages on behalf of one trainer.

    Args:
        dht: the trainer's running DHT.
        run: the run's configuration (sharding, model, seed).
        identity: the trainer's identity: it names the work and signs ban records.
        workdir: where evidence of bans is kept.
        stop_event: when set, waits for servers give up.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run: RunConfig,
        identity: NodeIdentity,
        workdir: Path,
        stop_event: threading.Event | None = None,
    ):
        self.dht, self.run, self.identity, self.workdir = dht, run, identity, workdir
        self.sharding = run.sharding
        self.stop_event = stop_event or threading.Event()
        self.rpc = P2PLoop(dht, "zen-remote-stages")
        self.handler_name = stage_handler_name(run.run_id)
        self.latency: dict[str, float] = {}
        self.load: dict[str, int] = {}
        self.failed_at: dict[str, float] = {}
        self.banned: set[str] = set()  # excluded: by our own spot-checks, or a quorum of counted reporters
        self.suspected: set[str] = set()  # banned by fewer than ``sharding.ban_quorum``: tried after the others
        self.unconfirmed: set[str] = set()  # outside the last weights check's compared class: tried after the others
        self.agreed: collections.OrderedDict[tuple[int, int, bytes], bytes] = collections.OrderedDict()
        self.bans_published: list[BanRecord] = []
        self.stats = {"calls": 0, "failovers": 0, "spot_checks": 0, "busy": 0, "weight_checks": 0}
        self._servers: dict[int, list[str]] = {}
        self._refreshed = 0.0
        self._chooser = random.SystemRandom()
        self._templates: dict[int, Stage] = {}
        self.versions: dict[int, int] = {}  # each stage's version after our last commit

    # ---- server choice ----------------------------------------------------------------------
    def servers(self, stage: int) -> list[str]:
        """Servers of ``stage`` that are not banned, best first; those that failed lately come last."""
        self._refresh()
        now = time.monotonic()
        usable = [p for p in self._servers.get(stage, []) if p not in self.banned]
        known = [self.latency[p] for p in usable if p in self.latency]
        default = min(known, default=0.0)

        def rank(peer: str) -> tuple[bool, bool, bool, float, str]:
            cooling = now - self.failed_at.get(peer, -COOLDOWN_SECONDS) < COOLDOWN_SECONDS
            score = self.latency.get(peer, default) * (1 + self.load.get(peer, 0))
            return cooling, peer in self.suspected, peer in self.unconfirmed, score, peer

        return sorted(usable, key=rank)

    def _refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._refreshed < REFRESH_SECONDS:
            return
        records = list_peers(self.dht, self.run.run_id)
        servers: dict[int, list[str]] = {}
        for record in records:
            if "server" in record.roles and record.run_hash == self.run.digest():
                for stage in record.stages:
                    servers.setdefault(stage, []).append(record.peer_id)
        # bans count only with evidence, from seasoned trainers of this run, and a quorum of them (dht/bans.py);
        # ours count alone (our own spot-check saw it); expired ones drop out, so the banned set shrinks
        quorum, ours = self.sharding.ban_quorum, {b.banned for b in self.bans_published if b.expires > get_dht_time()}
        bans = list_bans(self.dht, self.run.run_id)
        excluded, suspected = honoured_bans(bans, records, self.run.digest(), self.sharding.ban_min_rounds, quorum)
        self.banned, self.suspected = excluded | ours, suspected - ours
        self._servers, self._refreshed = servers, time.monotonic()

    def wait_for_stages(self, timeout: float = WAIT_FOR_SERVER_SECONDS) -> bool:
        """Wait until every stage has a usable server; return whether they all do."""
        deadline = time.monotonic() + timeout
        while not self.stop_event.is_set():
            missing = [s for s in range(self.sharding.stages) if not self.servers(s)]
            if not missing:
                return True
            if time.monotonic() > deadline:
                return False
            logger.info(f"waiting for servers of stage(s) {missing}")
            self.stop_event.wait(1.0)
        return False

    # ---- calls with failover ----------------------------------------------------------------
    def _call(self, request: StageRequest, prefer: str | None = None) -> tuple[StageReply, str]:
        """Send ``request`` to the preferred (else the best) server of its stage, moving on when one fails."""
        tried: set[str] = set()
        deadline = time.monotonic() + WAIT_FOR_SERVER_SECONDS
        while not self.stop_event.is_set():
            candidates = [p for p in self.servers(request.stage) if p not in tried]
            if not candidates:
                if time.monotonic() > deadline:
                    break
                tried.clear()
                self.stop_event.wait(1.0)
                self._refresh(force=True)
                continue
            peer = prefer if prefer in candidates else candidates[0]
            prefer = None
            started = time.monotonic()
            self.stats["calls"] += 1
            try:
                reply = self.rpc.run(
                    call_stage(self.rpc.p2p, peer, self.handler_name, request, self.sharding.request_timeout),
                    timeout=self.sharding.request_timeout + 5,
                )
            except Exception as e:
                logger.warning(f"stage {request.stage} {request.method} on {peer[:16]} failed ({e!r}); rerouting")
                self._mark_failed(peer, tried)
                continue
            elapsed = time.monotonic() - started
            previous = self.latency.get(peer, elapsed)
            self.latency[peer] = (1 - LATENCY_SMOOTHING) * previous + LATENCY_SMOOTHING * elapsed
            self.load[peer] = reply.load
            if reply.version < self.versions.get(request.stage, 0) and request.method != "state":
                # it lacks steps we committed (a replica that missed a replication): stale, skip it
                logger.warning(f"stage {request.stage}: {peer[:16]} is at version {reply.version}, behind ours")
                self._mark_failed(peer, tried)
                continue
            if reply.ok or reply.missing or reply.digest:
                return reply, peer
            if reply.reason == "busy":
                self.stats["busy"] += 1
            logger.info(f"stage {request.stage} {request.method} refused by {peer[:16]}: {reply.reason}; rerouting")
            self._mark_failed(peer, tried)
        raise StageUnavailableError(
            f"no server of stage {request.stage} answered a {request.method}; start `zen-node serve` for this run"
        )

    def _mark_failed(self, peer: str, tried: set[str]) -> None:
        tried.add(peer)
        self.failed_at[peer] = time.monotonic()
        self.stats["failovers"] += 1

    def forward(
        self, stage: int, step: int, hidden: torch.Tensor, prefer: str | None = None
    ) -> tuple[torch.Tensor, str]:
        """The stage's output for ``hidden`` and the server that computed it (spot-checked now and then)."""
        request = StageRequest("forward", stage, self.identity.peer_id, step, tensors=(hidden,))
        while True:
            reply, peer = self._call(request, prefer)
            (output,) = self._expect(reply, 1, hidden.shape)
            if self._chooser.random() >= self.sharding.spot_check_fraction or self._spot_check(
                stage, peer, reply.version, hidden, output
            ):
                return output, peer
            prefer = None  # the server was banned: redo the call elsewhere

    def backward(
        self,
        stage: int,
        step: int,
        micro_batch: int,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        prefer: str | None,
        micro_batches: int | None = None,
    ) -> tuple[torch.Tensor, str]:
        """The gradient of the stage's input; the server keeps the parameter gradients for the commit, which
        applies once all ``micro_batches`` of the step are in (default ``sharding.micro_batches``)."""
        count = self.sharding.micro_batches if micro_batches is None else micro_batches
        request = StageRequest("backward", stage, self.identity.peer_id, step, micro_batch, count, (hidden, grad))
        reply, peer = self._call(request, prefer)
        (grad_input,) = self._expect(reply, 1, hidden.shape)
        return grad_input, peer

    def backward_per_example(
        self,
        stage: int,
        step: int,
        micro_batch: int,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        prefer: str | None,
        micro_batches: int,
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """A DP step's backward (node/sharding/clipped.py): the gradient of the stage's input, each example's squared
        norm of the stage's parameter gradient, and the server (which keeps the per-example gradients)."""
        request = StageRequest(
            "backward_dp", stage, self.identity.peer_id, step, micro_batch, micro_batches, (hidden, grad)
        )
        reply, peer = self._call(request, prefer)
        shapes = [tuple(t.shape) for t in reply.tensors]
        if shapes != [tuple(hidden.shape), (hidden.shape[0],)]:
            raise StageUnavailableError(f"a stage server answered a DP backward with tensors {shapes}")
        grad_input, squared = reply.tensors
        if not (torch.isfinite(squared).all() and squared.min() >= 0):
            raise StageUnavailableError("a stage server answered a DP backward with a negative or non-finite norm")
        return grad_input, squared, peer

    def commit(
        self,
        stage: int,
        step: int,
        saved: list[tuple[torch.Tensor, torch.Tensor]],
        prefer: str | None,
        private: tuple[torch.Tensor, torch.Tensor] | None = None,
        share: float = 1.0,
    ) -> int:
        """Apply the step on the stage exactly once, at ``share`` of its learning rate (messages.py); return the
        stage's version after it. ``private``: a DP step's clip factors and [noise std, scale]
        (node/sharding/clipped.py; its micro-batches went by ``backward_dp``)."""
        commit = StageRequest("commit", stage, self.identity.peer_id, step, 0, len(saved), private or (), share=share)
        resend = "backward_dp" if private else "backward"
        peer: str | None = prefer
        signed = 0
        while True:
            reply, peer = self._call(commit, peer)
            if reply.ok:
                self.versions[stage] = max(self.versions.get(stage, 0), reply.version)
                if self._chooser.random() < self.sharding.spot_check_fraction:
                    self.check_weights(stage)
                return reply.version
            if reply.digest:  # sign the gradients it will apply and replicate (node/sharding/proofs.py)
                signed, proof = signed + 1, sign_step(self.identity, self.run.digest(), stage, step, reply.digest)
                commit = dataclasses.replace(commit, proof=proof)
                if signed > MAX_SIGNATURES:  # it refuses what we signed: try another server
                    self._mark_failed(peer, set())
                    peer, signed = None, 0
                continue
            for micro_batch in reply.missing:  # this server lacks them: send them again, then commit again
                hidden, grad = saved[micro_batch]
                request = StageRequest(
                    resend, stage, self.identity.peer_id, step, micro_batch, len(saved), (hidden, grad)
                )
                _, used = self._call(request, peer)
                if used != peer:
                    break  # that server failed meanwhile; start the commit over on another

    @staticmethod
    def _expect(reply: StageReply, count: int, shape: torch.Size) -> tuple[torch.Tensor, ...]:
        if len(reply.tensors) != count or any(t.shape != shape for t in reply.tensors):
            raise StageUnavailableError(f"a stage server answered with the wrong tensors (expected {list(shape)})")
        return reply.tensors

    # ---- spot-checks and bans ---------------------------------------------------------------
    def _spot_check(self, stage: int, peer: str, version: int, hidden: torch.Tensor, output: torch.Tensor) -> bool:
        """Recompute ``output`` with the server's published weights; ban it on a mismatch. True: it passed."""
        self.stats["spot_checks"] += 1
        try:
            state = self.rpc.run(
                call_stage(self.rpc.p2p, peer, self.handler_name, StageRequest("state", stage), 30.0), timeout=35.0
            )
        except Exception as e:
            logger.info(f"spot-check of {peer[:16]} skipped: no state ({e!r})")
            return True
        module = self._template(stage)
        params = list(module.parameters())
        if state.version != version or len(state.tensors) != STATE_BLOCKS * len(params):
            return True  # the stage moved on (another trainer's step) or the reply is odd: nothing to compare
        with torch.no_grad():
            for param, value in zip(params, state.tensors, strict=False):
                if param.shape != value.shape:
                    return True
                param.copy_(value)
            expected = module(hidden)
        error = float((output - expected).abs().max() / (expected.abs().max() + 1e-6))
        published = weights_digest(state.tensors[: len(params)])
        agreed = self.agreed.get((stage, version, state.history), published)
        tolerance = self.sharding.spot_check_tolerance
        if error > tolerance:
            reason = f"stage {stage} forward differs from recomputation by {error:.3g} (tolerance {tolerance:g})"
        elif published != agreed:  # consistent with its weights, but they are not the replicas' weights
            reason = f"stage {stage} weights at version {version} differ from the digest its replicas agree on"
        else:
            return True
        evidence = [hidden, output, expected, *state.tensors[: len(params)]]
        self._ban(
            stage,
            peer,
            version,
            reason,
            (gradients_digest([hidden]), gradients_digest([output])),
            [t.detach().cpu().contiguous().numpy().tobytes() for t in evidence],
        )
        return False

    # ---- weights that agree (node/sharding/agreement.py) --------------------------------------
    def stage_weights(self, stage: int) -> tuple[list[torch.Tensor], int, str]:
        """The stage's parameters from its best usable server, after a weights check where 3 or more replicas
        allow one (node/sharding/snapshot.py): (params, version, server).

        Raises:
            StageUnavailableError: no server of the stage served a well-formed state.
        """
        self.check_weights(stage)
        template = list(self._template(stage).parameters())
        for peer in self.servers(stage):
            try:
                state = self.rpc.run(
                    call_stage(self.rpc.p2p, peer, self.handler_name, StageRequest("state", stage), 30.0), timeout=35.0
                )
            except Exception as e:
                logger.info(f"stage {stage}: {peer[:16]} served no state ({e!r}); asking another")
                continue
            params = state.tensors[: len(template)]
            if len(state.tensors) == STATE_BLOCKS * len(template) and all(
                p.shape == t.shape and torch.isfinite(p).all() for p, t in zip(params, template, strict=True)
            ):
                return [p.clone() for p in params], state.version, peer
            logger.warning(f"stage {stage}: {peer[:16]} served a malformed state; asking another")
        raise StageUnavailableError(f"no server of stage {stage} served its weights")

    def check_weights(self, stage: int) -> set[str]:
        """Compare the weights digests of the stage's usable servers; ban the minority. Returns who was banned."""
        self.stats["weight_checks"] += 1
        peers = self.servers(stage)
        if len(peers) < 3:
            return set()  # no strict majority of at least two against one is possible
        request, timeout = StageRequest("weights", stage), self.sharding.request_timeout

        async def ask_all() -> list[StageReply | BaseException]:
            calls = (call_stage(self.rpc.p2p, peer, self.handler_name, request, timeout) for peer in peers)
            return await asyncio.gather(*calls, return_exceptions=True)

        try:
            replies = self.rpc.run(ask_all(), timeout=timeout + 5)
        except Exception as e:
            logger.info(f"stage {stage}: weights check skipped ({e!r})")
            return set()
        reports: dict[str, WeightsReport] = {}
        for peer, reply in zip(peers, replies, strict=True):
            if isinstance(reply, BaseException) or not reply.ok:
                continue
            report = reported_weights(reply)
            if report is None:
                logger.warning(f"stage {stage}: {peer[:16]} answered a malformed weights report; skipping it")
                continue
            reports[peer] = report
        verdict = compare_weights(reports)
        self.unconfirmed = (self.unconfirmed - set(reports)) | verdict.unconfirmed
        if verdict.version is None or not verdict.agreed:
            return set()
        self.agreed[(stage, verdict.version, verdict.history)] = verdict.agreed
        while len(self.agreed) > MAX_AGREED:
            self.agreed.popitem(last=False)
        members = sum(r.version == verdict.version and r.history == verdict.history for r in reports.values())
        for peer in sorted(verdict.minority):
            report = reports[peer]
            reason = (
                f"stage {stage} weights digest at version {report.version} is a minority: "
                f"{members - len(verdict.minority)} of {members} replicas agree on another"
            )
            blob = [report.history, report.digest, verdict.agreed]
            self._ban(stage, peer, report.version, reason, (report.history, report.digest), blob)
        return verdict.minority

    def _template(self, stage: int) -> Stage:
        if stage not in self._templates:
            self._templates[stage] = build_stage(self.run.model, self.sharding, self.run.train.seed, stage)
        return self._templates[stage]

    def _ban(
        self, stage: int, peer: str, version: int, reason: str, digests: tuple[bytes, bytes], evidence: list[bytes]
    ) -> None:
        """Publish a signed ban of ``peer``.

        Args:
            stage: the stage it served wrongly.
            peer: its PeerID.
            version: the version it reported.
            reason: what it did, for the ban record and the log.
            digests: the ban's (inputs, output) digests: for a forward, of the inputs and the claimed
                output; for weights, its history and its weights digest.
            evidence: kept in ``<workdir>/evidence/``: for a forward [inputs, its output, ours, the
                weights it published] as float32 bytes; for weights [its history, its digest, the agreed one].
        """
        blob = msgpack.packb([peer, stage, version, evidence], use_bin_type=True)
        inputs_digest, output_digest = digests
        run_hash = self.run.digest()
        digest = evidence_digest(run_hash, peer, stage, version, inputs_digest, output_digest)
        folder = self.workdir / "evidence"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{digest.hex()}.msgpack").write_bytes(blob)
        record = BanRecord(
            reporter=self.identity.peer_id,
            signing_key=self.identity.signing_public_key,
            binding=self.identity.binding,
            banned=peer,
            stage=stage,
            reason=reason,
            evidence=digest,
            timestamp=get_dht_time(),
            run_hash=run_hash,
            version=version,
            inputs_digest=inputs_digest,
            output_digest=output_digest,
            ttl=self.sharding.ban_ttl,
        )
        self.banned.add(peer)
        self.bans_published.append(record)
        logger.warning(f"banned stage server {peer}: {reason}; evidence {digest.hex()[:16]}")
        try:
            publish_ban(self.dht, self.run.run_id, record.sign(self.identity))
        except Exception as e:
            logger.warning(f"could not publish the ban of {peer[:16]}: {e!r}")

    def shutdown(self) -> None:
        self.rpc.shutdown()
