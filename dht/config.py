"""How a peer joins the swarm: options that load without importing hivemind."""

from __future__ import annotations

from dataclasses import dataclass, field


class SwarmError(Exception):
    """Joining or talking to the swarm failed; the message names the problem and the fix."""


@dataclass
class SwarmConfig:
    """How a peer joins the swarm (maps onto hivemind.DHT / P2P options)."""

    initial_peers: list[str] = field(default_factory=list)  # full multiaddrs with /p2p/<PeerID>
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])  # where to listen
    announce_maddrs: list[str] = field(default_factory=list)  # public addresses to advertise
    client_mode: bool = False  # True: dial out only (behind NAT, no incoming connections)
    use_relay: bool = True  # allow reaching / being reached through libp2p circuit relays
    use_auto_relay: bool = False  # look for relays to become reachable from behind a NAT
    startup_timeout: float = 30.0  # seconds p2pd may take to start and reach an initial peer

    def __post_init__(self) -> None:
        for name in ("initial_peers", "host_maddrs", "announce_maddrs"):
            for maddr in getattr(self, name):
                check_multiaddr(maddr, name, need_peer_id=name == "initial_peers")
        if self.startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0 seconds, got {self.startup_timeout}")


def check_multiaddr(maddr: str, what: str = "multiaddr", need_peer_id: bool = False) -> None:
    """Raise ValueError with a one-line fix if ``maddr`` is not a usable multiaddr."""
    from hivemind.utils.multiaddr import Multiaddr  # here: importing hivemind costs a second; configs load without it

    example = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..."
    try:
        parsed = Multiaddr(maddr)
        protocols = {proto.name for proto in parsed.protocols()}
    except Exception as e:
        raise ValueError(f"{what}: {maddr!r} is not a valid multiaddr ({e}); expected e.g. {example}") from None
    if need_peer_id and "p2p" not in protocols:
        raise ValueError(f"{what}: {maddr!r} lacks the /p2p/<PeerID> part; copy the full address, e.g. {example}")
