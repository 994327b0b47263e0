"""One stage as a server holds it: module, optimizer, exactly-once bookkeeping and the averaging anchor.

Everything here runs on the server's single compute thread, so a step, a replicated step, an
averaging result and a state download never interleave. The one exception is the averaging gate,
used from the server's event loop: while a round runs trainer calls are refused, the round waits
for commits in flight to finish replicating, and replicated steps wait between the round's
snapshot and its result (node/sharding/averaging.py). Only the methods below change the gate.

Version. ``version`` counts the updates this replica has made to the stage: one per applied
step (its own commit or a replicated one) and one per averaging round it took part in. Every
member of an averaging group held the same version before the round (the round's key includes
it) and adds one, so the group agrees on it afterwards; it never goes down, so a trainer that
skips servers behind its last committed version never sees it go backwards. ``synced_version``
is the version at which this replica last held the same bits as its peers (start-up, a download,
an averaging round, or a resync round whose donor it was): a donor's state may differ from ours
by no more than the updates both made since (node/sharding/averaging.py, "Mending").

Anchor. ``anchor`` is the stage's parameters as they were right after the last averaging round
(bit-identical on every member of that round's group) or, for a lone server, at its last
averaging period. A round averages ``anchor - params`` (small: one period's drift, so a
fixed-point code keeps its precision), and every member then sets ``params = anchor - mean``,
the same float32 operations on the same bits. A joining replica downloads the anchor with the
state, so it can take part in the next round.

History and weights digest (node/sharding/agreement.py). ``history`` chains every update in the
order it was made (a step's (trainer, step), an averaging round's new anchor); a joining replica
copies it with the state. ``weights_report()`` answers (version, history, digest of the params),
the digest computed once per (version, history), so trainers can compare replicas.

Applied steps. ``applied`` remembers each recent step's (trainer, step), so a retried commit or a
replicated copy is not applied twice, and ``evidence`` the trainer's proof of it (node/sharding/proofs.py),
so a replica that copies this state can check each pair: it marks done only the steps their trainers
signed (``vouched_pairs``), and a donor cannot pre-empt a trainer's future steps there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
from collections.abc import Iterator

import torch

from node.sharding.agreement import INITIAL_HISTORY, WeightsReport, chain_history, weights_digest
from node.sharding.clipped import NOISE_SLOT, StageNoise, clipped_sum, is_per_example, per_example_backward
from node.sharding.messages import MAX_APPLIED, STATE_BLOCKS, StageMessageError
from node.sharding.proofs import AppliedPair, vouched_pairs
from node.sharding.stages import Stage

MAX_PENDING_STEPS = 64  # (trainer, step) pairs whose gradients may wait for a commit
MAX_PENDING_FLOATS = 1 << 28  # gradient values they may hold (1 GiB): DP steps keep one gradient per example
MAX_APPLIED_REMEMBERED = 4096  # applied pairs remembered, so a retried commit is recognized
Evidence = tuple[bytes, bytes]  # an applied step's gradients digest and its trainer's proof (proofs.py)
NO_EVIDENCE: Evidence = (b"", b"")  # an applied step without its digest and proof (a test's direct apply)


def tensors_digest(tensors: list[torch.Tensor]) -> bytes:
    """BLAKE2b of the tensors' float32 bytes and shapes (which anchor a replica averages against)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        data = tensor.detach().float().cpu().contiguous()
        digest.update(repr(tuple(data.shape)).encode())
        digest.update(data.numpy().tobytes())
    return digest.digest()


class HostedStage:
    """One stage's module, optimizer, exactly-once bookkeeping and averaging anchor (compute thread only)."""

    def __init__(self, module: Stage, lr: float, weight_decay: float, scope: tuple[str, int] = ("", -1)):
        self.module = module
        self.scope = scope  # (run hash, stage): what the trainers' step proofs of this stage sign
        self.params = list(module.parameters())
        self.lr = lr  # a step's learning rate is this x the trainer's share of it (messages.py)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.version = 0
        self.synced_version = 0  # the version at which we last held our peers' bits (see the module docstring)
        self.pending: collections.OrderedDict[tuple[str, int], dict[int, list[torch.Tensor]]] = (
            collections.OrderedDict()
        )
        self.applied: collections.OrderedDict[tuple[str, int], int] = collections.OrderedDict()
        self.evidence: dict[tuple[str, int], Evidence] = {}  # applied pair -> (digest, proof)
        self.noise = StageNoise()  # DP steps' noise (node/sharding/clipped.py)
        self.anchor: list[torch.Tensor] = []
        self.anchor_digest = b""
        self.reanchor()
        # what trainers compare across replicas (agreement.py): the updates' hash chain, the last report
        self.history = INITIAL_HISTORY
        self._report = WeightsReport(-1, b"", b"")
        # the averaging gate (event loop only; changed through the methods of its section below)
        self._averaging = False  # trainer calls are refused ("averaging")
        self._commits_in_flight = 0  # commits being applied or replicated right now
        self._thawed = asyncio.Event()  # cleared between the snapshot and the result: replicated steps wait
        self._thawed.set()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(hidden)

    def forward_at_version(self, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``forward`` and the version it ran at (call on the compute thread, where every commit runs)."""
        return self.forward(hidden), self.version

    def backward(
        self, key: tuple[str, int], micro_batch: int, hidden: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        hidden = hidden.detach().requires_grad_(True)
        grads = torch.autograd.grad(self.module(hidden), [hidden, *self.params], grad)
        self._keep_pending(key, micro_batch, [g.detach() for g in grads[1:]])
        return grads[0]

    def backward_per_example(
        self, key: tuple[str, int], micro_batch: int, hidden: torch.Tensor, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A DP step's backward (node/sharding/clipped.py): the input's gradient and each example's squared norm
        of the stage's parameter gradient; the per-example gradients wait for the commit's clip factors."""
        grads, grad_input, squared = per_example_backward(self.module, hidden, grad)
        self._keep_pending(key, micro_batch, grads)
        return grad_input, squared

    def _keep_pending(self, key: tuple[str, int], micro_batch: int, grads: list[torch.Tensor]) -> None:
        """Keep a micro-batch's gradients for its commit; the oldest steps' are dropped past ``MAX_PENDING_STEPS``
        steps or ``MAX_PENDING_FLOATS`` values (their commits then ask for them again: ``missing``)."""
        self.pending.setdefault(key, {})[micro_batch] = grads
        self.pending.move_to_end(key)

        def held() -> int:
            return sum(g.numel() for parts in self.pending.values() for kept in parts.values() for g in kept)

        while len(self.pending) > MAX_PENDING_STEPS or (len(self.pending) > 1 and held() > MAX_PENDING_FLOATS):
            self.pending.popitem(last=False)

    def summed_pending(
        self, key: tuple[str, int], micro_batches: int, private: tuple[torch.Tensor, ...] = ()
    ) -> list[torch.Tensor] | list[int]:
        """The summed gradients of all micro-batches of ``key`` (kept until applied), or the ones still missing.
        A DP step's (per-example gradients) are clipped by the commit's factors and noised (``private``:
        node/sharding/clipped.py); its noise is drawn once and kept with them.

        The sum is deterministic, so the digest a trainer signed between two commits still matches.

        Raises:
            StageMessageError: ``private`` is missing for a DP step, given for another, or malformed.
        """
        parts = self.pending.get(key, {})
        missing = [m for m in range(micro_batches) if m not in parts]
        if missing:
            return missing
        if is_per_example(parts, self.params):
            noise = parts.setdefault(NOISE_SLOT, self.noise.draw(self.params))
            return clipped_sum(parts, micro_batches, private, noise)
        if private:
            raise StageMessageError("a commit carries DP clip factors for a step sent without backward_dp")
        return [torch.stack(grads).sum(0) for grads in zip(*(parts[m] for m in range(micro_batches)), strict=True)]

    def apply(
        self, key: tuple[str, int], grads: list[torch.Tensor], evidence: Evidence = NO_EVIDENCE, share: float = 1.0
    ) -> None:
        """One AdamW step with ``grads`` as step ``key``, at ``share`` of the stage's learning rate; a pair already
        applied is not applied again. ``evidence``: the step's digest and the trainer's proof (served with state)."""
        if key in self.applied:
            return
        for param, grad in zip(self.params, grads, strict=True):
            param.grad = grad.to(param.device, param.dtype)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * share
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        self.history = chain_history(self.history, "step", *key)
        self.applied[key] = self.version
        if evidence[1]:
            self.evidence[key] = evidence
        self.pending.pop(key, None)
        self._forget()

    def _forget(self) -> None:
        """Forget the oldest applied pairs beyond ``MAX_APPLIED_REMEMBERED`` (and their evidence)."""
        while len(self.applied) > MAX_APPLIED_REMEMBERED:
            old, _ = self.applied.popitem(last=False)
            self.evidence.pop(old, None)

    def applied_pairs(self) -> tuple[AppliedPair, ...]:
        """The latest ``MAX_APPLIED`` applied steps with their evidence, for a state reply."""
        recent = list(self.applied)[-MAX_APPLIED:]
        return tuple((trainer, step, *self.evidence.get((trainer, step), NO_EVIDENCE)) for trainer, step in recent)

    # ---- the averaging gate (the server's event loop) ------------------------------------------
    @property
    def averaging(self) -> bool:
        """True while a round runs: trainer calls are refused with ``averaging``."""
        return self._averaging

    @contextlib.contextmanager
    def averaging_round(self) -> Iterator[None]:
        """Refuse trainer calls for the round (through a resync too); on exit calls and replicated steps flow again."""
        self._averaging = True
        try:
            yield
        finally:
            self._averaging = False
            self._thawed.set()

    @contextlib.contextmanager
    def commit_in_flight(self) -> Iterator[None]:
        """Mark a commit being applied and replicated; a round's snapshot waits until none is."""
        self._commits_in_flight += 1
        try:
            yield
        finally:
            self._commits_in_flight -= 1

    async def commits_settled(self) -> None:
        """Return once no commit of this stage is being applied or replicated."""
        while self._commits_in_flight:
            await asyncio.sleep(0.05)

    def freeze(self) -> None:
        """The round's snapshot is next: replicated steps wait until the round ends (they would be lost)."""
        self._thawed.clear()

    async def until_thawed(self) -> None:
        """Return once no round holds replicated steps back."""
        await self._thawed.wait()

    # ---- averaging (node/sharding/averaging.py) ---------------------------------------------------
    def reanchor(self) -> None:
        """Take the current parameters as the anchor the next round's drift is measured from."""
        self.anchor = [p.detach().clone() for p in self.params]
        self.anchor_digest = tensors_digest(self.anchor)

    def drift(self) -> tuple[list[torch.Tensor], int]:
        """``anchor - params`` (float32, CPU: what a round averages) and the version it was taken at."""
        with torch.no_grad():
            delta = [(a - p).float().cpu() for a, p in zip(self.anchor, self.params, strict=True)]
        return delta, self.version

    def apply_mean_drift(self, mean: list[torch.Tensor]) -> None:
        """``params = anchor - mean`` (the same bits on every member of the group); it becomes the new anchor."""
        with torch.no_grad():
            for param, anchor, drift in zip(self.params, self.anchor, mean, strict=True):
                param.copy_(anchor - drift.to(param.device, param.dtype))
        self.version += 1
        self.synced_version = self.version
        self.reanchor()
        self.history = chain_history(self.history, "average", self.anchor_digest)

    def mark_synced(self) -> None:
        """Our state is the one the stage's other replicas copy this round (we were the resync's donor)."""
        self.synced_version = self.version

    def weights_report(self) -> WeightsReport:
        """This replica's version, history and weights digest (hashed once per version and history)."""
        if (self._report.version, self._report.history) != (self.version, self.history):
            self._report = WeightsReport(self.version, self.history, weights_digest(self.params))
        return self._report

    # ---- state for joining replicas, spot-checks and resyncs ----------------------------------
    def state(self) -> list[torch.Tensor]:
        moments = [self.optimizer.state.get(p, {}) for p in self.params]
        return [
            *(p.detach() for p in self.params),
            *(m.get("exp_avg", torch.zeros_like(p)) for m, p in zip(moments, self.params, strict=True)),
            *(m.get("exp_avg_sq", torch.zeros_like(p)) for m, p in zip(moments, self.params, strict=True)),
            *self.anchor,
        ]

    def load_state(
        self,
        tensors: tuple[torch.Tensor, ...],
        version: int,
        applied: tuple[AppliedPair, ...],
        history: bytes = INITIAL_HISTORY,
    ) -> int:
        """Take a donor's state: params, Adam moments, anchor, version, applied pairs and history.

        Only the applied pairs whose trainer's proof checks are marked done (``vouched_pairs``); returns how
        many were not."""
        count = len(self.params)
        if len(tensors) != STATE_BLOCKS * count or any(
            t.shape != p.shape or not torch.isfinite(t).all()
            for t, p in zip(tensors, self.params * STATE_BLOCKS, strict=True)
        ):
            raise StageMessageError(
                "a stage state must hold finite params, two Adam moments and an anchor of the stage's shapes"
            )
        with torch.no_grad():
            for i, param in enumerate(self.params):
                param.copy_(tensors[i])
                if version > 0:
                    self.optimizer.state[param] = {
                        "step": torch.tensor(float(version)),
                        "exp_avg": tensors[count + i].clone().to(param.device),
                        "exp_avg_sq": tensors[2 * count + i].clone().to(param.device),
                    }
        self.anchor = [t.clone().to(p.device) for t, p in zip(tensors[3 * count :], self.params, strict=True)]
        self.anchor_digest = tensors_digest(self.anchor)
        self.version = self.synced_version = version
        self.history = history if len(history) == len(INITIAL_HISTORY) else INITIAL_HISTORY
        vouched, refused = vouched_pairs(applied, *self.scope)
        for trainer, step, digest, proof in vouched:
            self.applied[(trainer, step)] = version
            self.evidence[(trainer, step)] = (digest, proof)
        self._forget()
        return refused
