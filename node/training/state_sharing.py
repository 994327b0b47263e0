"""Late joiners download the run's current state from peers instead of starting from scratch.

A ``StateSharer`` is a hivemind ``DecentralizedAverager`` used only for its state-download RPC
(``load_state_from_peers``): it never averages. Peers declare themselves as donors with their
round as priority, so a joiner downloads from the most advanced peer. What arrives is checked
before use: the metadata is a small msgpack map (hivemind's MSGPackSerializer; no pickle), and
the tensors must match the local model's count, shapes and dtypes and be finite. Anything else
is rejected and logged, and the node starts from its own state. ``wait_for_peer_ahead`` waits
for a live peer that has finished a later round (a node that missed its group resyncs from it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager

from dht import connect_to_peers
from node.runtime import NodeRuntime

logger = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 4
ANNOUNCE_GAP = 5.0  # seconds between two declarations of a new round (see ``StateSharer.announce``)


@dataclass(frozen=True)
class SharedState:
    """A downloaded, checked state."""

    round: int  # the outer round the donor had completed
    run_hash: str  # the donor's run config hash
    tensors: list[torch.Tensor]  # global parameters, then outer optimizer buffers


StateProvider = Callable[[], tuple[dict[str, Any], Sequence[torch.Tensor]]]


class _StateAverager(DecentralizedAverager):
    def __init__(self, provider: StateProvider, **kwargs: Any):
        self._provider = provider
        super().__init__([torch.zeros(1)], **kwargs)

    def get_current_state(self):
        metadata, tensors = self._provider()
        return metadata, [t.detach().cpu() for t in tensors], None


class StateSharer:
    """Serve this node's state to joiners, and download the swarm's state when joining.

    Args:
        dht: the node's running DHT.
        run_id: the run.
        provider: returns ``({"round": int, "run_hash": str}, tensors)`` for a joiner; called in this process.
        client_mode: a client-mode node downloads but does not serve.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, provider: StateProvider, client_mode: bool = False):
        self._averager = _StateAverager(
            provider,
            dht=dht,
            start=True,
            prefix=f"zen_{run_id}_state",
            client_mode=client_mode,
            allow_state_sharing=False,
            declare_state_period=10,
            next_chunk_timeout=30,
            shutdown_timeout=2,
        )
        self.client_mode = client_mode
        self._announced = -math.inf  # monotonic time of the last declaration we triggered

    def announce(self, round_no: int) -> None:
        """Offer our state to joiners, preferred in proportion to how far along we are.

        Each change of priority makes hivemind store a declaration in the DHT; rounds may come several
        a second, so a new round is declared at most every ``ANNOUNCE_GAP`` seconds (a joiner may see
        a donor's round that much behind)."""
        if self.client_mode or time.monotonic() - self._announced < ANNOUNCE_GAP:
            return
        self._announced = time.monotonic()
        self._averager.state_sharing_priority = float(round_no)
        self._averager.allow_state_sharing = True

    def download(self, templates: Sequence[torch.Tensor], run_hash: str, timeout: float = 60.0) -> SharedState | None:
        """Download and check the most advanced peer's state; None if no peer offers a usable one."""
        result = self._averager.load_state_from_peers(timeout=timeout)
        if result is None:
            return None
        metadata, tensors = result
        try:
            return check_state(metadata, tensors, templates, run_hash)
        except ValueError as e:
            logger.warning(f"rejected a downloaded state: {e}")
            return None

    def download_retrying(
        self, templates: Sequence[torch.Tensor], run_hash: str, stop_event: threading.Event
    ) -> SharedState | None:
        """``download``, tried up to ``DOWNLOAD_ATTEMPTS`` times (waiting 2, 4, 8 s between) until ``stop_event``."""
        state = None
        for attempt in range(DOWNLOAD_ATTEMPTS):
            # A fresh peer's first dials can fail (libp2p then backs off for a few seconds): retry.
            state = self.download(templates, run_hash)
            if state is not None or stop_event.wait(2.0 * 2**attempt):
                break
        return state

    def shutdown(self) -> None:
        self._averager.shutdown()


def wait_for_peer_ahead(runtime: NodeRuntime, round_no: int, timeout: float, stop_event: threading.Event) -> bool:
    """Wait up to ``timeout`` s until a live peer has finished a later round than ``round_no``; connect to it."""
    deadline = time.monotonic() + timeout
    while not stop_event.is_set() and time.monotonic() < deadline:
        ahead = [p for p in runtime.peers() if p.round > round_no]
        if ahead:
            connect_to_peers(runtime.dht, ahead)
            return True
        stop_event.wait(1.0)
    return False


def check_state(
    metadata: Any, tensors: Sequence[torch.Tensor], templates: Sequence[torch.Tensor], run_hash: str
) -> SharedState:
    """Validate a downloaded state against the local model; raise ValueError naming the problem."""
    if not isinstance(metadata, dict) or set(metadata) != {"round", "run_hash"}:
        raise ValueError("metadata must be a map with exactly 'round' and 'run_hash'")
    round_no, their_hash = metadata["round"], metadata["run_hash"]
    if not isinstance(round_no, int) or isinstance(round_no, bool) or not 0 <= round_no < 2**40:
        raise ValueError(f"round {round_no!r} is not a valid round number")
    if their_hash != run_hash:
        raise ValueError(f"donor's run hash {their_hash!r} differs from ours {run_hash!r}")
    if len(tensors) != len(templates):
        raise ValueError(f"expected {len(templates)} tensors, got {len(tensors)}")
    for i, (tensor, template) in enumerate(zip(tensors, templates, strict=True)):
        if tensor.shape != template.shape or tensor.dtype != template.dtype:
            raise ValueError(f"tensor {i} is {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(template.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {i} holds non-finite values")
    return SharedState(round=round_no, run_hash=their_hash, tensors=list(tensors))
