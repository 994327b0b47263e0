"""Shared fixtures: child-process reaping, node identities, signed records, real DHT swarms on 127.0.0.1
and a real bootstrap peer. Plain helpers (the node subprocess, the run config, waiting) are in helpers.py.

Swarms follow hivemind's ``tests/test_utils/dht_swarms.py``: the first peer binds port 0 on
127.0.0.1 and its visible multiaddrs bootstrap the rest, so no test guesses a free port.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
import psutil
import pytest
import torch
from helpers import LOCALHOST_MADDR
from hivemind.utils import get_dht_time

from dht import SKETCH_DIM, Capacity, NodeIdentity, PeerRecord, SwarmConfig, encode_sketch, start_dht
from node.demo import start_bootstrap, stop_process

# hivemind shares tensors between processes through torch's "file_system" strategy (set when it is
# imported); with several DHT peers in one pytest process, torch 2.13's libshm manager then aborted the
# interpreter at exit (SIGPIPE in THManagedMapAllocator::close, exit code 134). This process only:
# node subprocesses keep hivemind's default.
torch.multiprocessing.set_sharing_strategy("file_descriptor")

REAP_GRACE_SECONDS = 5.0  # how long leftover children get to exit after SIGTERM before SIGKILL


@pytest.fixture(autouse=True, scope="session")
def reap_child_processes() -> Iterator[None]:
    """At session end, terminate (then kill) every child the tests left behind, p2pd daemons included."""
    yield
    children = psutil.Process(os.getpid()).children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=REAP_GRACE_SECONDS)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=REAP_GRACE_SECONDS)


@pytest.fixture
def identity_factory(tmp_path: Path) -> Callable[[str | None], NodeIdentity]:
    """Return ``make(name=None)``: a NodeIdentity in its own folder under ``tmp_path``.

    The same name gives the same folder (so a second call reloads the identity); no name gives a fresh one.
    """
    counter = itertools.count()

    def make(name: str | None = None) -> NodeIdentity:
        return NodeIdentity.load_or_create(tmp_path / "identities" / (name or f"node{next(counter)}"))

    return make


@pytest.fixture
def record_factory() -> Callable[..., PeerRecord]:
    """Return ``make(identity, **overrides)``: a valid PeerRecord naming ``identity``, signed now."""

    def make(identity: NodeIdentity, **overrides: object) -> PeerRecord:
        values: dict[str, object] = dict(
            peer_id=identity.peer_id,
            signing_key=identity.signing_public_key,
            binding=identity.binding,
            x25519_key=identity.x25519_public_key,
            version="0.1.0",
            run_hash="ab" * 16,
            capacity=Capacity(device_kind="cpu", device_name="test cpu", memory_bytes=2**34),
            sketch=encode_sketch([i / SKETCH_DIM for i in range(SKETCH_DIM)]),
            roles=("trainer",),
            round=0,
            state_digest=b"",
            timestamp=get_dht_time(),
        )
        values.update(overrides)
        return PeerRecord(**values)

    return make


@pytest.fixture
def run_id() -> str:
    """The run whose peers key the swarm fixtures check strictly."""
    return "test-run"


@dataclass
class SwarmPeer:
    """One running DHT peer of a test swarm and the identity it runs under."""

    dht: hivemind.DHT
    identity: NodeIdentity
    maddrs: list[str] = field(default_factory=list)  # visible multiaddrs, /p2p/ included


@pytest.fixture
def swarm_factory(
    identity_factory: Callable[[str | None], NodeIdentity],
) -> Iterator[Callable[..., list[SwarmPeer]]]:
    """Return ``start(num_peers, run_ids=(), **dht_kwargs)``: real DHT peers on 127.0.0.1, shut down on teardown.

    The first peer starts alone; the others join through its visible multiaddrs.
    """
    started: list[hivemind.DHT] = []

    def start(num_peers: int, run_ids: tuple[str, ...] | list[str] = (), **dht_kwargs: object) -> list[SwarmPeer]:
        peers: list[SwarmPeer] = []
        initial_peers: list[str] = []
        for _ in range(num_peers):
            identity = identity_factory(None)
            config = SwarmConfig(host_maddrs=[LOCALHOST_MADDR], initial_peers=initial_peers)
            dht = start_dht(config, identity, run_ids=run_ids, **dht_kwargs)
            started.append(dht)
            peer = SwarmPeer(dht=dht, identity=identity, maddrs=[str(m) for m in dht.get_visible_maddrs()])
            peers.append(peer)
            initial_peers = initial_peers or peer.maddrs
        return peers

    try:
        yield start
    finally:
        for dht in reversed(started):
            dht.shutdown()


@pytest.fixture
def dht_swarm(swarm_factory: Callable[..., list[SwarmPeer]], run_id: str) -> list[SwarmPeer]:
    """Three DHT peers on 127.0.0.1 that strictly check ``run_id``'s peer records."""
    return swarm_factory(3, run_ids=[run_id])


@pytest.fixture
def bootstrap_maddr(tmp_path: Path) -> Iterator[str]:
    """A real `zen-bootstrap` process on 127.0.0.1; yields the multiaddr it printed."""
    with open(tmp_path / "bootstrap.log", "w") as log:
        process, maddr = start_bootstrap(tmp_path, log)
        try:
            yield maddr
        finally:
            stop_process(process, timeout=20)
