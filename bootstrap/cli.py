"""``zen-bootstrap``: run a bootstrap peer that nodes join the swarm through.

Run it on a host that nodes can reach, with a fixed port and an identity folder that survives
restarts (the folder holds the libp2p key, so the PeerID, and the addresses it prints, stay the
same)::

    zen-bootstrap --host-maddrs /ip4/0.0.0.0/tcp/31337 --identity bootstrap.id \\
        --announce-maddrs /ip4/203.0.113.5/tcp/31337 --http-host 0.0.0.0 --http-port 8080

Once it serves, it prints one block on stdout, flushed, and nothing else there (logs go to
stderr)::

    peer_id: 12D3KooW...
    /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...       (one line per multiaddr, each starting with /)
    health: http://0.0.0.0:8080/healthz
    dashboard: http://0.0.0.0:8080/       (also /api/swarm as JSON and /metrics for Prometheus)
    join: zen-node join --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...
    ready

A parent process reads lines up to ``ready``. SIGINT or SIGTERM stops it cleanly (exit 0, no
p2pd left behind). Bad input (a malformed address, a taken port, a corrupt identity file) ends it
at once with one line, ``zen-bootstrap: error: ...``, on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from bootstrap.server import REACHABILITY_CHOICES, BootstrapConfig, BootstrapError, BootstrapPeer

logger = logging.getLogger(__name__)

PROG = "zen-bootstrap"
EXIT_USAGE = 2  # bad input, as argparse itself exits on a bad flag
EXIT_FAILURE = 1  # the peer started but its DHT process died
_FIELD_FLAGS = (
    "--host-maddrs",
    "--announce-maddrs",
    "--initial-peers",
    "--http-host",
    "--http-port",
    "--run-id",
    "--poll-period",
    "--force-reachability",
    "--startup-timeout",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``zen-bootstrap`` argument parser (every flag's help shows an example value)."""
    defaults = BootstrapConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a bootstrap peer: a DHT peer with a stable PeerID that zen-node peers join through. "
        "It relays for peers behind NAT, logs joins and leaves, and answers GET /healthz.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_network_flags(parser, defaults)
    _add_health_flags(parser, defaults)
    _add_monitor_flags(parser, defaults)
    _add_startup_flags(parser, defaults)
    return parser


def _add_network_flags(parser: argparse.ArgumentParser, defaults: BootstrapConfig) -> None:
    """Where the peer listens, what it announces, whom it joins, and the identity that names it."""
    parser.add_argument(
        "--host-maddrs",
        nargs="+",
        default=defaults.host_maddrs,
        metavar="MADDR",
        help="multiaddrs to listen on, e.g. /ip4/0.0.0.0/tcp/31337 (tcp/0 picks a free port)",
    )
    parser.add_argument(
        "--announce-maddrs",
        nargs="+",
        default=[],
        metavar="MADDR",
        help="public multiaddrs to advertise instead of the listen ones, e.g. /ip4/203.0.113.5/tcp/31337",
    )
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        default=[],
        metavar="MADDR",
        help="other bootstrap peers to join (full multiaddrs), e.g. /ip4/203.0.113.6/tcp/31337/p2p/12D3KooW...",
    )
    parser.add_argument(
        "--identity",
        default=str(defaults.identity_dir),
        metavar="FOLDER",
        help="identity FOLDER (created on first run; holds p2p.key, so the same folder keeps the PeerID "
        "across restarts), e.g. /identity/bootstrap.id",
    )


def _add_health_flags(parser: argparse.ArgumentParser, defaults: BootstrapConfig) -> None:
    """The HTTP health endpoint, GET /healthz."""
    parser.add_argument(
        "--http-host",
        default=defaults.http_host,
        metavar="HOST",
        help="address of the health endpoint, e.g. 127.0.0.1 (local only) or 0.0.0.0 (all interfaces)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=defaults.http_port,
        metavar="PORT",
        help="port of the HTTP endpoints (GET /healthz, the dashboard at /, /api/swarm, /metrics), "
        "e.g. 8080 (0 picks a free port)",
    )


def _add_monitor_flags(parser: argparse.ArgumentParser, defaults: BootstrapConfig) -> None:
    """Which runs the peer watches, and how often it looks."""
    parser.add_argument(
        "--run-id",
        dest="run_ids",
        action="extend",
        nargs="+",
        default=[],
        metavar="ID",
        help="runs whose signed peer records are tracked, logged and shown on the dashboard (repeatable; the "
        "first is shown by default; none: every run found in this peer's DHT storage), e.g. zen-shakespeare",
    )
    parser.add_argument(
        "--poll-period",
        type=float,
        default=defaults.poll_period,
        metavar="SECONDS",
        help="seconds between two looks at the swarm, e.g. 2.0",
    )


def _add_startup_flags(parser: argparse.ArgumentParser, defaults: BootstrapConfig) -> None:
    """How the peer starts (reachability, timeout) and how much it logs."""
    parser.add_argument(
        "--force-reachability",
        choices=REACHABILITY_CHOICES,
        default=None,
        help="skip AutoNAT and declare this host public (starts the relay service at once) or private, e.g. public",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=defaults.startup_timeout,
        metavar="SECONDS",
        help="seconds p2pd may take to start and reach --initial-peers, e.g. 30",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of the messages on stderr, e.g. INFO",
    )


def config_from_args(args: argparse.Namespace) -> BootstrapConfig:
    """Map parsed flags onto :class:`BootstrapConfig` (raises ValueError on a bad value)."""
    return BootstrapConfig(
        identity_dir=args.identity,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        initial_peers=args.initial_peers,
        http_host=args.http_host,
        http_port=args.http_port,
        run_ids=args.run_ids,
        poll_period=args.poll_period,
        force_reachability=args.force_reachability,
        startup_timeout=args.startup_timeout,
    )


def ready_lines(peer: BootstrapPeer) -> list[str]:
    """The block printed on stdout once the peer serves (see the module docstring)."""
    return [
        f"peer_id: {peer.peer_id}",
        *peer.maddrs,
        f"health: {peer.health_url}",
        f"dashboard: {peer.dashboard_url}",
        f"join: zen-node join --initial-peers {peer.join_maddr}",
        "ready",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zen-bootstrap`` until SIGINT or SIGTERM; return the process exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    try:
        config = config_from_args(args)
    except ValueError as e:
        return _fail(_with_flag_names(str(e)))

    stop = threading.Event()
    _install_signal_handlers(stop)
    try:
        peer = BootstrapPeer.create(config, stop)
    except BootstrapError as e:
        return _fail(str(e))
    try:
        _print_ready(peer)
        # Until a signal sets `stop` or the DHT process dies; in slices, so that the main thread runs
        # a pending signal handler even when another thread took the signal.
        while not peer.wait(timeout=0.5):
            pass
    finally:
        peer.stop()
    return EXIT_FAILURE if peer.failed else 0


def _print_ready(peer: BootstrapPeer) -> None:
    try:
        print("\n".join(ready_lines(peer)), flush=True)
    except BrokenPipeError:
        # Whoever read our stdout is gone (e.g. `zen-bootstrap | head -1`); keep serving, and point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        logger.warning("stdout is closed; the addresses are in the log above")


def _with_flag_names(message: str) -> str:
    # Config errors name dataclass fields; on the command line, name the flag the user typed.
    for flag in _FIELD_FLAGS:
        field = "run_ids" if flag == "--run-id" else flag[2:].replace("-", "_")
        message = message.replace(f"{field} ", f"{flag} ").replace(f"{field}:", f"{flag}:")
    return message


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _configure_logging(level: str) -> None:
    from hivemind.utils.logging import use_hivemind_log_handler

    # One format for hivemind's messages and ours, all on stderr: stdout is for the ready block.
    use_hivemind_log_handler("in_root_logger")
    logging.getLogger().setLevel(level)


def _install_signal_handlers(stop: threading.Event) -> None:
    # The handlers are installed before the DHT process is forked, so that a signal during startup
    # still ends in a clean stop. The forked process inherits them: there, restore the default
    # action and re-deliver the signal, so hivemind can still terminate its own process.
    main_pid = os.getpid()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not stop.is_set():
            logger.info(f"received {signal.Signals(signum).name}, stopping")
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


if __name__ == "__main__":
    sys.exit(main())
