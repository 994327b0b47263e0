"""``zen-node serve``: host pipeline stages of the run's model for trainers (forward and backward RPCs).

A server holds no data. It picks the stage(s) that raise the swarm's weakest stage throughput
(node/sharding/stages.py), downloads their current state from a live replica if there is one, announces
them in its signed record (role ``server``), and answers stage calls (node/sharding/messages.py):

- forward: requests of one stage that arrive together are batched into one pass (the model is
  hivemind.moe's TaskPool); the output goes back, nothing is kept.
- backward: recomputes the forward from the inputs it is sent (as hivemind.moe's backward does, so
  any server of the stage can take it), returns the input's gradient and keeps the parameter
  gradients pending under (trainer, step, micro-batch). A repeated call overwrites, never adds.
- commit: once all micro-batches of (trainer, step) are pending, applies one AdamW step, records
  the pair as applied, and before answering sends the summed gradients to the other servers of
  the stage (``replicate``), which apply them once too. A repeated commit answers ``ok`` without
  applying again; so a trainer may retry a step on any replica and it is applied exactly once.
- state: parameters, Adam moments, averaging anchor, version and recently applied pairs, for a
  joining replica, a resync and trainers' spot-checks.

Every ``sharding.average_period`` seconds the servers of a stage average it and leave with the
same bits and version (node/sharding/averaging.py); trainer calls meanwhile are refused with
``averaging``.

Only the trainer named in a call may make it (the stream's PeerID is checked), only a listed
server of the same stage may replicate into it, and every tensor's shape is checked against the
stage. While another process uses this server's GPU (NVML, where present), forward and backward
are refused with ``busy`` and trainers go elsewhere; a CPU-only machine serves on CPU.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from dht import SKETCH_DIM, Capacity, Heartbeat, NodeIdentity, PeerRecord, encode_sketch, list_peers, start_dht
from node.capacity import CapacityError, device_memory_bytes, device_name, pick_device
from node.config import NodeConfig
from node.runtime import signed_record
from node.sharding.averaging import StageAverager
from node.sharding.hosted import HostedStage
from node.sharding.messages import TRAINER_CALLS, StageMessageError, StageReply, StageRequest
from node.sharding.rpc import P2PLoop, call_stage, stage_handler_name
from node.sharding.stages import DEFAULT_HYSTERESIS, build_stage, choose_stages, rebalance_target, stage_ranges

logger = logging.getLogger(__name__)

PEER_REFRESH_SECONDS = 2.0  # how stale this server's view of the stage's replicas may be
REPLICA_COOLDOWN_SECONDS = 60.0  # a replica that missed a step gets no more until this passes (it is stale)
GpuProbe = Callable[[], bool]  # True while another process uses this server's GPU


def parse_memory(text: str) -> int:
    """``20GB``, ``512MiB``, ``1.5G`` -> bytes.

    Raises:
        ValueError: a one-line explanation with an example.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--max-memory {text!r} is not a memory size; use e.g. 20GB or 512MB")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


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


@dataclass
class ServeConfig:
    """A stage server's own settings (``zen-node serve``)."""

    max_memory: int = 0  # bytes of device memory the stages may use; 0 = all of it
    stages: tuple[int, ...] = ()  # host exactly these stages; () = choose by block selection
    max_stages: int = 1  # at most this many stages when choosing (memory may allow fewer)
    max_batch: int = 256  # sequences one batched forward may hold
    batch_wait: float = 0.002  # seconds a forward waits for others to batch with
    busy_poll: float = 1.0  # seconds between GPU-busy readings
    rebalance_period: float = 30.0  # seconds between rebalancing checks; 0 = never move
    hysteresis: float = DEFAULT_HYSTERESIS  # relative gain in the weakest stage a move must bring

    def __post_init__(self) -> None:
        if self.max_memory < 0:
            raise ValueError(f"serve.max_memory must be >= 0 bytes, got {self.max_memory}")
        if not 1 <= self.max_stages <= 64:
            raise ValueError(f"serve.max_stages must be in [1, 64], got {self.max_stages}")
        if not 1 <= self.max_batch <= 4096:
            raise ValueError(f"serve.max_batch must be in [1, 4096], got {self.max_batch}")
        if not 0 <= self.batch_wait <= 1 or self.busy_poll <= 0 or self.rebalance_period < 0 or self.hysteresis < 0:
            raise ValueError("serve.batch_wait must be in [0, 1] s; busy_poll > 0; rebalance_period, hysteresis >= 0")


class StageServer:
    """A compute-only node hosting stages of the run's model.

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
        self.config, self.serve, self.run = config, serve, config.run
        self.num_stages = config.run.sharding.stages
        self.stop_event = stop_event or threading.Event()
        self._gpu_probe = gpu_probe
        self.busy = False
        self.load = 0
        self.hosted: dict[int, HostedStage] = {}
        self.capacity = Capacity()
        self.refused = 0  # malformed or unauthorized requests, for monitoring
        self._replicas: dict[int, list[str]] = {}
        self._replicas_at = 0.0
        self._replica_failed: dict[str, float] = {}
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zen-stage-compute")
        self._batches: dict[int, asyncio.Queue[tuple[torch.Tensor, asyncio.Future[torch.Tensor]]]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self.averager = StageAverager(self)

    # ---- start-up ---------------------------------------------------------------------------
    def start(self) -> StageServer:
        """Join the swarm, pick and load stages, serve, announce; returns once serving."""
        self.identity = NodeIdentity.load_or_create(self.config.identity_path)
        self.device = pick_device(self.config.device)
        if self._gpu_probe is None:
            self._gpu_probe = nvml_probe(self.device)
        fit = self._stages_that_fit()  # before the network: a bad --max-memory fails fast
        if len(self.serve.stages) > fit:
            raise CapacityError(
                f"--stages names {len(self.serve.stages)} stages but --max-memory fits {fit}; name fewer stages"
            )
        self.dht = start_dht(self.config.swarm, self.identity, [self.run.run_id])
        self.maddrs = tuple(str(m) for m in self.dht.get_visible_maddrs())[:16]
        self.handler_name = stage_handler_name(self.run.run_id)
        self.rpc = P2PLoop(self.dht, "zen-stage-server")
        records = list_peers(self.dht, self.run.run_id)
        stages = list(self.serve.stages) or choose_stages(records, self.num_stages, fit, me=self.identity.peer_id)
        for stage in stages:
            self._host(stage, records)
        self.capacity = self._measure()
        self.rpc.run(self._start_serving())
        self.heartbeat = Heartbeat(
            self.dht, self.run.run_id, self._record, period=self.config.heartbeat_period, ttl=self.config.record_ttl
        ).start()
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
        hosted = HostedStage(module, self.run.train.inner_lr, self.run.train.weight_decay)
        donors = [r.peer_id for r in records if stage in r.stages and r.peer_id != self.identity.peer_id]
        for donor in donors:
            try:
                reply = self.rpc.run(self._call(donor, StageRequest("state", stage)))
                if reply.ok:
                    hosted.load_state(reply.tensors, reply.version, reply.applied)
                    logger.info(f"stage {stage}: loaded version {reply.version} from {donor[:16]}")
                    break
            except Exception as e:
                logger.warning(f"stage {stage}: could not load its state from {donor[:16]}: {e!r}")
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

    def _record(self) -> bytes:
        return signed_record(
            self.identity,
            self.run,
            self.config.record_ttl,
            capacity=self.capacity,
            sketch=encode_sketch([0.0] * SKETCH_DIM),  # a server holds no data
            roles=("server",),
            round=max((h.version for h in self.hosted.values()), default=0),
            state_digest=b"",
            maddrs=self.maddrs,
            stages=tuple(sorted(self.hosted)),
        )

    async def _start_serving(self) -> None:
        await self.rpc.p2p.add_protobuf_handler(self.handler_name, self._handle, runtime_pb2.ExpertRequest)
        self._tasks.append(asyncio.create_task(self._watch_gpu()))
        if self.run.sharding.average_period:
            self._tasks.append(asyncio.create_task(self.averager.run_periodically()))

    # ---- request handling -------------------------------------------------------------------
    async def _handle(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        self.load += 1
        remote = context.remote_id.to_base58()
        try:
            reply = await self._dispatch(StageRequest.decode(request.metadata), remote)
        except StageMessageError as e:
            self.refused += 1
            logger.warning(f"refused a stage request from {remote[:16]}: {e}")
            reply = StageReply(ok=False, reason=str(e))
        except Exception as e:  # never let one request take the server down
            logger.exception(f"stage request from {remote[:16]} failed")
            reply = StageReply(ok=False, reason=f"server error: {type(e).__name__}")
        finally:
            self.load -= 1
        return runtime_pb2.ExpertResponse(metadata=reply.encode())

    async def _dispatch(self, request: StageRequest, remote: str) -> StageReply:
        hosted = self.hosted.get(request.stage)
        if hosted is None:
            return StageReply(ok=False, reason=f"stage {request.stage} is not hosted here")
        if request.method in TRAINER_CALLS and request.trainer != remote:
            raise StageMessageError(f"{request.method} for trainer {request.trainer[:16]} sent by {remote[:16]}")
        if request.method in ("forward", "backward") and self.busy:
            return StageReply(ok=False, reason="busy", version=hosted.version, load=self.load)
        if request.method in TRAINER_CALLS and hosted.averaging:
            # params are about to change without a step: trainers go elsewhere or wait a second
            return StageReply(ok=False, reason="averaging", version=hosted.version, load=self.load)
        key = (request.trainer, request.step)
        if request.method == "forward":
            (hidden,) = self._check_hidden(request, 1)
            output = await self._batched_forward(request.stage, hidden)
            return StageReply(ok=True, version=hosted.version, load=self.load, tensors=(output,))
        if request.method == "backward":
            hidden, grad = self._check_hidden(request, 2)
            if key in hosted.applied:
                return StageReply(ok=False, reason="step already applied", version=hosted.version)
            grad_input = await self._in_compute(hosted.backward, key, request.micro_batch, hidden, grad)
            return StageReply(ok=True, version=hosted.version, load=self.load, tensors=(grad_input.cpu(),))
        if request.method == "commit":
            return await self._commit(request, hosted)
        if request.method == "replicate":
            if remote not in await self._stage_replicas(request.stage):
                raise StageMessageError(f"replicate from {remote[:16]}, not a listed server of stage {request.stage}")
            self._check_shapes(request.tensors, hosted)
            await hosted.thawed.wait()  # a step that lands between a round's snapshot and result would be lost
            if key not in hosted.applied:
                await self._in_compute(hosted.apply, key, list(request.tensors))
            return StageReply(ok=True, version=hosted.version)
        state = await self._in_compute(lambda: [t.detach().cpu().clone() for t in hosted.state()])
        return StageReply(ok=True, version=hosted.version, applied=tuple(hosted.applied), tensors=tuple(state))

    async def _commit(self, request: StageRequest, hosted: HostedStage) -> StageReply:
        key = (request.trainer, request.step)
        if key in hosted.applied:
            return StageReply(ok=True, version=hosted.applied[key])
        hosted.committing += 1  # an averaging round waits for this commit's replication to finish
        try:
            return await self._apply_and_replicate(request, hosted, key)
        finally:
            hosted.committing -= 1

    async def _apply_and_replicate(
        self, request: StageRequest, hosted: HostedStage, key: tuple[str, int]
    ) -> StageReply:
        grads = await self._in_compute(hosted.take_pending, key, request.micro_batches)
        if grads and isinstance(grads[0], int):
            return StageReply(ok=False, reason="missing micro-batches", version=hosted.version, missing=tuple(grads))
        await self._in_compute(hosted.apply, key, grads)
        version = hosted.version
        # Replicas apply the same step before the trainer hears ok: if this server dies next, the
        # trainer's next step finds the update on any replica (a dead replica simply fails here).
        replicate = StageRequest("replicate", request.stage, request.trainer, request.step, tensors=tuple(grads))
        # A replica that missed a step is stale: trainers skip it (its version lags theirs), and it
        # gets no more steps for a while, so one hung replica does not slow every step down.
        now = time.monotonic()
        peers = [
            p
            for p in await self._stage_replicas(request.stage)
            if p != self.identity.peer_id
            and now - self._replica_failed.get(p, -REPLICA_COOLDOWN_SECONDS) > REPLICA_COOLDOWN_SECONDS
        ]
        # a third of the trainer's timeout, so a hung replica cannot make the trainer give up on us
        timeout = self.run.sharding.request_timeout / 3
        results = await asyncio.gather(
            *(self._call(peer, replicate, timeout) for peer in peers), return_exceptions=True
        )
        for peer, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException) or not result.ok:
                self._replica_failed[peer] = time.monotonic()
                logger.warning(f"stage {request.stage}: replica {peer[:16]} missed step {key}: {result!r}")
        return StageReply(ok=True, version=version, load=self.load)

    def _check_hidden(self, request: StageRequest, count: int) -> tuple[torch.Tensor, ...]:
        model = self.run.model
        if len(request.tensors) != count:
            raise StageMessageError(f"{request.method} takes {count} tensor(s), got {len(request.tensors)}")
        shape = request.tensors[0].shape
        if not (
            len(shape) == 3
            and 1 <= shape[0] <= self.serve.max_batch
            and 1 <= shape[1] <= model.context
            and shape[2] == model.d_model
        ):
            raise StageMessageError(
                f"hidden states must be [1..{self.serve.max_batch}, 1..{model.context}, {model.d_model}], "
                f"got {list(shape)}"
            )
        if any(t.shape != shape or not torch.isfinite(t).all() for t in request.tensors):
            raise StageMessageError("tensors must share one shape and be finite")
        return tuple(t.to(self.device) for t in request.tensors)

    @staticmethod
    def _check_shapes(tensors: tuple[torch.Tensor, ...], hosted: HostedStage) -> None:
        if len(tensors) != len(hosted.params) or any(
            t.shape != p.shape or not torch.isfinite(t).all() for t, p in zip(tensors, hosted.params, strict=True)
        ):
            raise StageMessageError("replicated gradients must match the stage's parameters and be finite")

    async def _in_compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    async def _batched_forward(self, stage: int, hidden: torch.Tensor) -> torch.Tensor:
        queue = self._batches.get(stage)
        if queue is None:
            queue = self._batches[stage] = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._forward_batches(stage, queue)))
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        await queue.put((hidden, future))
        return await future

    async def _forward_batches(self, stage: int, queue: asyncio.Queue[Any]) -> None:
        """Run the forwards that arrive together (same sequence length) as one batch."""
        while True:
            items = [await queue.get()]
            deadline = time.monotonic() + self.serve.batch_wait
            rows = items[0][0].shape[0]
            while rows < self.serve.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    item = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                items.append(item)
                rows += item[0].shape[0]
            for length in {hidden.shape[1] for hidden, _ in items}:
                group = [(h, f) for h, f in items if h.shape[1] == length]
                try:
                    output = await self._in_compute(self.hosted[stage].forward, torch.cat([h for h, _ in group]))
                except Exception as e:
                    for _, future in group:
                        future.set_exception(e) if not future.done() else None
                    continue
                pieces = output.cpu().split([h.shape[0] for h, _ in group])
                for (_, future), piece in zip(group, pieces, strict=True):
                    if not future.done():
                        future.set_result(piece)

    async def _stage_replicas(self, stage: int) -> list[str]:
        """PeerIDs of listed servers of ``stage`` (refreshed every PEER_REFRESH_SECONDS)."""
        if time.monotonic() - self._replicas_at > PEER_REFRESH_SECONDS:
            records = await asyncio.get_running_loop().run_in_executor(None, list_peers, self.dht, self.run.run_id)
            replicas: dict[int, list[str]] = collections.defaultdict(list)
            for record in records:
                if "server" in record.roles and record.run_hash == self.run.digest():
                    for hosted in record.stages:
                        replicas[hosted].append(record.peer_id)
            self._replicas, self._replicas_at = replicas, time.monotonic()
        return self._replicas.get(stage, [])

    async def _call(self, peer: str, request: StageRequest, timeout: float | None = None) -> StageReply:
        timeout = timeout or self.run.sharding.request_timeout
        return await call_stage(self.rpc.p2p, peer, self.handler_name, request, timeout)

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

    # ---- lifecycle --------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Serve until the stop event is set, checking every ``rebalance_period`` whether to move."""
        period = self.serve.rebalance_period or 3600.0
        while not self.stop_event.wait(period):
            if self.serve.rebalance_period and not self.serve.stages and len(self.hosted) == 1:
                self._maybe_rebalance()

    def _maybe_rebalance(self) -> None:
        (current,) = self.hosted
        records = list_peers(self.dht, self.run.run_id)
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
        self.heartbeat.beat()

    def shutdown(self) -> None:
        """Stop serving; safe after a partial start."""
        self.stop_event.set()  # a pending averaging round gives up
        heartbeat = self.__dict__.pop("heartbeat", None)
        if heartbeat is not None:
            heartbeat.stop()
        rpc = self.__dict__.pop("rpc", None)
        if rpc is not None:
            rpc.shutdown()
        self.averager.shutdown()
        self._compute.shutdown(wait=True, cancel_futures=True)
        dht = self.__dict__.pop("dht", None)
        if dht is not None:
            dht.shutdown()
