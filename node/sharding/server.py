"""``zen-node serve``: host pipeline stages of the run's model for trainers (forward and backward RPCs).

A server holds no data. It picks the stage(s) that raise the swarm's weakest stage throughput
(node/sharding/stages.py), downloads their current state from a live replica whose state passes the
join checks (node/sharding/joining.py), announces them in its signed record (role ``server``), and
answers stage calls (node/sharding/messages.py):

- forward: requests of one stage that arrive together are batched into one pass
  (node/sharding/batching.py, after hivemind.moe's TaskPool); the output goes back, nothing is kept.
- backward: recomputes the forward from the inputs it is sent (as hivemind.moe's backward does, so
  any server of the stage can take it), returns the input's gradient and keeps the parameter
  gradients pending under (trainer, step, micro-batch). A repeated call overwrites, never adds.
- commit: once all micro-batches of (trainer, step) are pending, answers the digest of their sum
  for the trainer to sign; given that signature (node/sharding/proofs.py), applies one AdamW step
  at the trainer's share of the stage's lr, records the pair as applied, and before answering sends
  the summed gradients with the proof to the other servers of the stage (``replicate``), which
  check it and apply them once too. A repeated commit answers ``ok`` without applying again; so a
  trainer may retry a step on any replica and it is applied exactly once.
- state: parameters, Adam moments, averaging anchor, version, recently applied pairs and the
  updates' history, for a joining replica, a resync and trainers' spot-checks.
- weights: the stage's version, history and weights digest, which trainers compare across the
  stage's replicas (node/sharding/agreement.py).

Every ``sharding.average_period`` seconds the servers of a stage average it and leave with the
same bits and version (node/sharding/averaging.py); trainer calls meanwhile are refused with
``averaging``.

Only the trainer named in a call may make it (the stream's PeerID is checked); only a listed
server of the same stage (same run hash) may replicate into it, at a version within
``REPLICATION_VERSION_GAP`` of ours, and only gradients the trainer signed for that stage and step;
every tensor's shape is checked against the stage. While another process uses this server's GPU
(NVML, where present), forward and backward are refused with ``busy`` and trainers go elsewhere;
a CPU-only machine serves on CPU.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from dht import SKETCH_DIM, Capacity, NodeIdentity, PeerRecord, encode_sketch
from node.capacity import CapacityError, device_memory_bytes, device_name, pick_device
from node.config import NodeConfig, ServeConfig
from node.metrics import StageCallCounter, call_outcome
from node.runtime import NodeRuntime
from node.sharding.averaging import StageAverager
from node.sharding.batching import ForwardBatcher
from node.sharding.hosted import HostedStage
from node.sharding.joining import StageJoin, join_stage, listed_servers
from node.sharding.messages import (
    TRAINER_CALLS,
    StageMessageError,
    StageReply,
    StageRequest,
    check_gradients,
    check_hidden_states,
)
from node.sharding.proofs import check_step_proof, step_digest
from node.sharding.rpc import P2PLoop, call_stage, stage_handler_name
from node.sharding.stages import build_stage, choose_stages, rebalance_target, stage_ranges

if TYPE_CHECKING:
    import hivemind

logger = logging.getLogger(__name__)

PEER_REFRESH_SECONDS = 2.0  # how stale this server's view of the stage's replicas may be
REPLICA_COOLDOWN_SECONDS = 60.0  # a replica that missed a step gets no more until this passes (it is stale)
REPLICATION_VERSION_GAP = 256  # a replicated step's version may differ from ours + 1 by at most this much
GpuProbe = Callable[[], bool]  # True while another process uses this server's GPU


def nvml_probe(device: torch.device) -> GpuProbe | None:
    """A probe that says whether another process computes on ``device`` (None without CUDA or pynvml)."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception as e:
        logger.warning(f"NVML is not available ({e}); cannot tell when the GPU is busy, serving always")
        return None
    me = os.getpid()

    def busy() -> bool:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return any(p.pid != me for p in processes)

    return busy


class StageServer:
    """A compute-only node hosting stages of the run's model.

    It is the :class:`~node.sharding.averaging.StageHost` of its averager: ``identity``, ``dht``,
    ``hosted_stage``, ``hosted_stages``, ``stage_replicas``, ``in_compute`` and ``call``.

    Args:
        config: the node's configuration (run, swarm, identity, device).
        serve: the server's own settings.
        gpu_probe: says whether another process uses the GPU; None: read NVML where present.
        stop_event: set it to stop serving.
    """

    def __init__(
        self,
        config: NodeConfig,
        serve: ServeConfig,
        gpu_probe: GpuProbe | None = None,
        stop_event: threading.Event | None = None,
    ):
        if config.run.sharding.stages < 1:
            raise ValueError("the run is not sharded: set [run.sharding] stages >= 1 in the run's config")
        # what to serve and how
        self.config, self.serve, self.run = config, serve, config.run
        self.num_stages = config.run.sharding.stages
        self.stop_event = stop_event or threading.Event()
        self.handler_name = stage_handler_name(self.run.run_id)  # the protocol trainers and replicas call
        # presence in the swarm, set by start(): identity, DHT peer, record and heartbeat (node/runtime.py)
        self.runtime: NodeRuntime | None = None  # owns the shutdown of the DHT and what needs it
        self.device: torch.device
        self.rpc: P2PLoop  # the event loop every request, batch and averaging round runs on
        # the hosted stages and the throughput the record announces for them
        self.hosted: dict[int, HostedStage] = {}
        self.joins: dict[int, StageJoin] = {}  # each stage's download as it was hosted: donor, refusals
        self.capacity = Capacity()
        # request handling: load, the GPU's state, refusals, the one compute thread, forward batches
        self._gpu_probe = gpu_probe
        self.busy = False  # another process uses the GPU: forward and backward are refused
        self.load = 0  # requests being handled now
        self.refused = 0  # malformed or unauthorized requests, for monitoring
        self.calls = StageCallCounter()  # calls by method and outcome, sequences computed (metrics, record)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zen-stage-compute")
        self._batchers: dict[int, ForwardBatcher] = {}
        self._tasks: list[asyncio.Task[Any]] = []  # the GPU watch, forward batches, averaging rounds
        # the other servers of the hosted stages, as the swarm's records list them
        self._replicas: dict[int, list[str]] = {}
        self._replicas_at = 0.0
        self._replica_failed: dict[str, float] = {}  # when each replica last missed a step
        # the periodic rounds that keep the replicas of a stage bit-identical
        self.averager = StageAverager(self, self.run, self.stop_event)

    # ---- start-up ---------------------------------------------------------------------------
    def start(self) -> StageServer:
        """Join the swarm, pick and load stages, serve, announce; returns once serving."""
        self.runtime = runtime = NodeRuntime.create(self.config)
        self.device = pick_device(self.config.device)
        if self._gpu_probe is None:
            self._gpu_probe = nvml_probe(self.device)
        fit = self._stages_that_fit()  # before the network: a bad --max-memory fails fast
        if len(self.serve.stages) > fit:
            raise CapacityError(
                f"--stages names {len(self.serve.stages)} stages but --max-memory fits {fit}; name fewer stages"
            )
        dht = runtime.start()
        # runtime.close() stops them last adopted first: the RPC loop, the averager, the compute thread
        runtime.adopt("stage compute thread", lambda: self._compute.shutdown(wait=True, cancel_futures=True))
        runtime.adopt("stage averager", self.averager.shutdown)
        self.rpc = P2PLoop(dht, "zen-stage-server")
        runtime.adopt("stage RPC loop", self.rpc.shutdown)
        records = runtime.peers()
        stages = list(self.serve.stages) or choose_stages(records, self.num_stages, fit, me=self.identity.peer_id)
        for stage in stages:
            self._host(stage, records)
        self.capacity = self._measure()
        self.rpc.run(self._start_serving())
        runtime.announce(self._record_fields)
        logger.info(f"serving stage(s) {sorted(self.hosted)} of {self.num_stages} on {self.device}")
        return self

    def _stage_bytes(self) -> int:
        """Memory one stage needs: params, grads and two Adam moments (fp32), plus as much for activations."""
        ranges = stage_ranges(self.run.model.n_layer, self.run.sharding)
        d = self.run.model.d_model
        return 2 * 4 * 4 * max(len(r) for r in ranges) * 12 * d * d

    def _stages_that_fit(self) -> int:
        budget = self.serve.max_memory or device_memory_bytes(self.device)
        fit = min(budget // self._stage_bytes(), self.serve.max_stages, self.num_stages)
        if fit < 1:
            raise CapacityError(
                f"one stage needs about {self._stage_bytes() / 1024**3:.2f} GB but --max-memory allows "
                f"{budget / 1024**3:.2f} GB; raise --max-memory or use a run with more stages"
            )
        return int(fit)

    def _host(self, stage: int, records: list[PeerRecord]) -> None:
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} does not exist: the run has stages 0..{self.num_stages - 1}")
        module = build_stage(self.run.model, self.run.sharding, self.run.train.seed, stage).to(self.device)
        lr, scope = self.run.train.inner_lr * self.run.sharding.stage_lr_scale, (self.run.digest(), stage)
        hosted = HostedStage(module, lr, self.run.train.weight_decay, scope)
        servers = listed_servers(records, stage, self.run.digest(), self.identity.peer_id)
        self.joins[stage] = self.rpc.run(join_stage(self, self.run.train, stage, hosted, servers))
        if self.run.sharding.average_period:
            self.averager.prepare(stage, hosted.params)
        self.hosted[stage] = hosted

    def _measure(self) -> Capacity:
        """Samples/s of forward+backward through the hosted stages (the throughput block selection reads)."""
        batch = torch.randn(self.run.train.batch_size, self.run.model.context, self.run.model.d_model)
        batch = batch.to(self.device)
        elapsed = 0.0
        for step in range(3):
            started = time.perf_counter()
            for hosted in self.hosted.values():
                hosted.module(batch.requires_grad_(True)).sum().backward()
                hosted.module.zero_grad(set_to_none=True)
            elapsed += time.perf_counter() - started if step else 0.0
        return Capacity(
            device_kind=self.device.type if self.device.type in ("cpu", "cuda", "mps", "xpu") else "cpu",
            device_name=device_name(self.device)[:128],
            memory_bytes=self.serve.max_memory or device_memory_bytes(self.device),
            samples_per_second=2 * batch.shape[0] / max(elapsed, 1e-9),
        )

    def _record_fields(self) -> dict[str, Any]:
        """Our own PeerRecord fields, read at each heartbeat (the runtime adds the multiaddrs and signs)."""
        return {
            "capacity": self.capacity,
            "sketch": encode_sketch([0.0] * SKETCH_DIM),  # a server holds no data
            "roles": ("server",),
            "round": max((h.version for h in self.hosted.values()), default=0),
            "state_digest": b"",
            "stages": tuple(sorted(self.hosted)),
            "served_per_second": self.calls.served_per_second(),
        }

    async def _start_serving(self) -> None:
        await self.rpc.p2p.add_protobuf_handler(self.handler_name, self._handle, runtime_pb2.ExpertRequest)
        self._tasks.append(asyncio.create_task(self._watch_gpu()))
        if self.run.sharding.average_period:
            self._tasks.append(asyncio.create_task(self.averager.run_periodically()))

    # ---- request handling -------------------------------------------------------------------
    async def _handle(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        self.load += 1
        remote, method = context.remote_id.to_base58(), "malformed"
        try:
            decoded = StageRequest.decode(request.metadata)
            method, reply = decoded.method, await self._dispatch(decoded, remote)
            outcome = call_outcome(reply)
        except StageMessageError as e:
            self.refused += 1
            logger.warning(f"refused a stage request from {remote[:16]}: {e}")
            reply, outcome = StageReply(ok=False, reason=str(e)), "refused"
        except Exception as e:  # never let one request take the server down
            logger.exception(f"stage request from {remote[:16]} failed")
            reply, outcome = StageReply(ok=False, reason=f"server error: {type(e).__name__}"), "error"
        finally:
            self.load -= 1
        self.calls.call(method, outcome)
        return runtime_pb2.ExpertResponse(metadata=reply.encode())

    async def _dispatch(self, request: StageRequest, remote: str) -> StageReply:
        """Check who may make the call and whether the stage takes it now, then run its method."""
        hosted = self.hosted.get(request.stage)
        if hosted is None:
            return StageReply(ok=False, reason=f"stage {request.stage} is not hosted here")
        if request.method in TRAINER_CALLS and request.trainer != remote:
            raise StageMessageError(f"{request.method} for trainer {request.trainer[:16]} sent by {remote[:16]}")
        if request.method == "replicate" and remote not in await self.stage_replicas(request.stage):
            raise StageMessageError(f"replicate from {remote[:16]}, not a listed server of stage {request.stage}")
        if request.method in ("forward", "backward", "backward_dp") and self.busy:
            return StageReply(ok=False, reason="busy", version=hosted.version, load=self.load)
        if request.method in TRAINER_CALLS and hosted.averaging:  # params change without a step: go elsewhere
            return StageReply(ok=False, reason="averaging", version=hosted.version, load=self.load)
        methods = {
            "forward": self._forward,
            "backward": self._backward,
            "backward_dp": self._backward,
            "commit": self._commit,
            "replicate": self._replicate,
            "state": self._state,
            "weights": self._weights,
        }
        return await methods[request.method](request, hosted)

    async def _forward(self, request: StageRequest, hosted: HostedStage) -> StageReply:
        (hidden,) = self._hidden_states(request, 1)
        output, version = await self._batcher(request.stage).forward(hidden)  # the version the pass ran at
        self.calls.computed(hidden.shape[0])
        return StageReply(ok=True, version=version, load=self.load, tensors=(output,))

    async def _backward(self, request: StageRequest, hosted: HostedStage) -> StageReply:
        hidden, grad = self._hidden_states(request, 2)
        key = (request.trainer, request.step)
        if key in hosted.applied:
            return StageReply(ok=False, reason="step already applied", version=hosted.version)
        if request.method == "backward_dp":  # a DP step: per-example gradients (node/sharding/clipped.py)
            out = await self.in_compute(hosted.backward_per_example, key, request.micro_batch, hidden, grad)
        else:
            out = (await self.in_compute(hosted.backward, key, request.micro_batch, hidden, grad),)
        self.calls.computed(hidden.shape[0])
        return StageReply(ok=True, version=hosted.version, load=self.load, tensors=tuple(t.cpu() for t in out))

    async def _commit(self, request: StageRequest, hosted: HostedStage) -> StageReply:
        key = (request.trainer, request.step)
        if key in hosted.applied:
            return StageReply(ok=True, version=hosted.applied[key])
        with hosted.commit_in_flight():  # an averaging round waits for this commit's replication to finish
            grads = await self.in_compute(hosted.summed_pending, key, request.micro_batches, request.tensors)
            if grads and isinstance(grads[0], int):
                return StageReply(
                    ok=False, reason="missing micro-batches", version=hosted.version, missing=tuple(grads)
                )
            digest = await self.in_compute(step_digest, grads, request.share)
            try:  # no signed proof yet (or over other gradients): the trainer signs this digest, commits again
                check_step_proof(request.proof, request.trainer, self.run.digest(), request.stage, request.step, digest)
            except StageMessageError as e:
                return StageReply(ok=False, reason=f"sign the step: {e}", version=hosted.version, digest=digest)
            await self.in_compute(hosted.apply, key, grads, (digest, request.proof), request.share)
            version = hosted.applied.get(key, hosted.version)
            # Replicas apply the same step before the trainer hears ok: if this server dies next, the
            # trainer's next step finds the update on any replica (a dead replica simply fails here).
            replicate = dataclasses.replace(
                request, method="replicate", micro_batch=0, micro_batches=1, tensors=tuple(grads), version=version
            )
            await self._send_to_replicas(replicate)
            return StageReply(ok=True, version=version, load=self.load)

    async def _send_to_replicas(self, replicate: StageRequest) -> None:
        """Send a committed step to the stage's other servers, except those cooling down after a miss.

        A replica that missed a step is stale: trainers skip it (its version lags theirs), and it
        gets no more steps for a while, so one hung replica does not slow every step down.
        """
        now = time.monotonic()
        peers = [
            p
            for p in await self.stage_replicas(replicate.stage)
            if p != self.identity.peer_id
            and now - self._replica_failed.get(p, -REPLICA_COOLDOWN_SECONDS) > REPLICA_COOLDOWN_SECONDS
        ]
        # a third of the trainer's timeout, so a hung replica cannot make the trainer give up on us
        timeout = self.run.sharding.request_timeout / 3
        results = await asyncio.gather(*(self.call(peer, replicate, timeout) for peer in peers), return_exceptions=True)
        key = (replicate.trainer, replicate.step)
        for peer, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException) or not result.ok:
                self._replica_failed[peer] = time.monotonic()
                self.calls.replica_missed()
                logger.warning(f"stage {replicate.stage}: replica {peer[:16]} missed step {key}: {result!r}")

    async def _replicate(self, request: StageRequest, hosted: HostedStage) -> StageReply:
        """Apply a step another replica committed, once its trainer's proof checks (nothing is marked before)."""
        check_gradients(request.tensors, hosted.params)
        if abs(request.version - (hosted.version + 1)) > REPLICATION_VERSION_GAP:
            raise StageMessageError(f"replicated step at version {request.version}, ours is {hosted.version}")
        digest = await asyncio.get_running_loop().run_in_executor(None, step_digest, request.tensors, request.share)
        check_step_proof(request.proof, request.trainer, self.run.digest(), request.stage, request.step, digest)
        await hosted.until_thawed()  # a step that lands between a round's snapshot and result would be lost
        key = (request.trainer, request.step)
        if key not in hosted.applied:
            await self.in_compute(hosted.apply, key, list(request.tensors), (digest, request.proof), request.share)
        return StageReply(ok=True, version=hosted.version)

    async def _state(self, request: StageRequest, hosted: HostedStage) -> StageReply:
        def snapshot() -> StageReply:  # on the compute thread: the tensors, version and history of one moment
            state = tuple(t.detach().cpu().clone() for t in hosted.state())
            applied = hosted.applied_pairs()
            return StageReply(ok=True, version=hosted.version, applied=applied, tensors=state, history=hosted.history)

        reply: StageReply = await self.in_compute(snapshot)
        return reply

    async def _weights(self, request: StageRequest, hosted: HostedStage) -> StageReply:
        """The stage's version, history and weights digest, taken together on the compute thread."""
        report = await self.in_compute(hosted.weights_report)
        return StageReply(ok=True, version=report.version, load=self.load, digest=report.digest, history=report.history)

    def _hidden_states(self, request: StageRequest, count: int) -> tuple[torch.Tensor, ...]:
        """The request's ``count`` hidden-state tensors, checked against the model, on this server's device."""
        checked = check_hidden_states(request, count, self.serve.max_batch, self.run.model)
        return tuple(t.to(self.device) for t in checked)

    def _batcher(self, stage: int) -> ForwardBatcher:
        """The forward queue of ``stage``, started at its first forward."""
        batcher = self._batchers.get(stage)
        if batcher is None:
            batcher = ForwardBatcher(
                lambda hidden: self.in_compute(self.hosted[stage].forward_at_version, hidden),
                self.serve.max_batch,
                self.serve.batch_wait,
            )
            self._batchers[stage] = batcher
            self._tasks.append(asyncio.create_task(batcher.run()))
        return batcher

    async def _watch_gpu(self) -> None:
        while True:
            try:
                busy = bool(self._gpu_probe()) if self._gpu_probe is not None else False
            except Exception as e:
                logger.warning(f"GPU probe failed ({e}); treating the GPU as idle")
                busy = False
            if busy != self.busy:
                logger.info("another process uses the GPU: refusing new work" if busy else "GPU idle: serving again")
            self.busy = busy
            await asyncio.sleep(self.serve.busy_poll)

    # ---- what the averager uses (StageHost) -------------------------------------------------
    @property
    def identity(self) -> NodeIdentity:
        """This server's keys (loaded by start())."""
        return self._swarm().identity

    @property
    def dht(self) -> hivemind.DHT:
        """This server's DHT peer (started by start())."""
        return self._swarm().dht

    @property
    def maddrs(self) -> tuple[str, ...]:
        """The multiaddrs others may dial, as the record publishes them."""
        return self._swarm().maddrs

    def hosted_stage(self, stage: int) -> HostedStage | None:
        """The stage as this server holds it, None if it is not hosted here (any more)."""
        return self.hosted.get(stage)

    def hosted_stages(self) -> list[int]:
        """The stages hosted here now."""
        return list(self.hosted)

    async def stage_replicas(self, stage: int) -> list[str]:
        """PeerIDs of listed servers of ``stage`` (refreshed every PEER_REFRESH_SECONDS)."""
        if time.monotonic() - self._replicas_at > PEER_REFRESH_SECONDS:
            records = await asyncio.get_running_loop().run_in_executor(None, self._swarm().peers)
            replicas: dict[int, list[str]] = collections.defaultdict(list)
            for record in records:
                if "server" in record.roles and record.run_hash == self.run.digest():
                    for hosted in record.stages:
                        replicas[hosted].append(record.peer_id)
            self._replicas, self._replicas_at = replicas, time.monotonic()
        return self._replicas.get(stage, [])

    async def in_compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the compute thread, where every change to a hosted stage runs."""
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    async def call(self, peer: str, request: StageRequest, timeout: float | None = None) -> StageReply:
        """One stage call to another server (``sharding.request_timeout`` unless ``timeout`` is given)."""
        timeout = timeout or self.run.sharding.request_timeout
        return await call_stage(self.rpc.p2p, peer, self.handler_name, request, timeout)

    # ---- lifecycle --------------------------------------------------------------------------
    def _swarm(self) -> NodeRuntime:
        if self.runtime is None:
            raise RuntimeError("StageServer.start() was not called")
        return self.runtime

    def run_forever(self) -> None:
        """Serve until the stop event is set, checking every ``rebalance_period`` whether to move."""
        period = self.serve.rebalance_period or 3600.0
        while not self.stop_event.wait(period):
            if self.serve.rebalance_period and not self.serve.stages and len(self.hosted) == 1:
                self._maybe_rebalance()

    def _maybe_rebalance(self) -> None:
        (current,) = self.hosted
        records = self._swarm().peers()
        target = rebalance_target(
            records,
            self.num_stages,
            self.identity.peer_id,
            current,
            self.capacity.samples_per_second,
            self.serve.hysteresis,
        )
        if target is None:
            return
        logger.info(f"rebalancing: moving from stage {current} to the weaker stage {target}")
        self._host(target, records)
        self.hosted.pop(current, None)
        self.averager.forget(current)
        self._swarm().beat()

    def shutdown(self) -> None:
        """Stop serving; safe after a partial start."""
        self.stop_event.set()  # a pending averaging round gives up
        if self.runtime is not None:
            self.runtime.close()  # the heartbeat, what start() adopted, then the DHT peer
        # no-ops if start() got as far as adopting them; otherwise nothing else stops them
        self.averager.shutdown()
        self._compute.shutdown(wait=True, cancel_futures=True)
