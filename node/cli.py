"""The ``zen-node`` command.

    zen-node join --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... --data ./corpus
    zen-node status --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...
    zen-node demo --peers 3 --rounds 3 --summary-json out.json
    zen-node serve --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... --config run.toml --max-memory 20GB
    zen-node export --workdir ~/.zen/work --out ./zen-model --display-name Ada
    zen-node generate --model ./zen-model --prompt "Once upon a time" --max-new-tokens 48
    zen-node ledger --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... --config run.toml --csv

Errors a user can fix (``user_errors()``: a bad flag or config value, missing data, a machine too
small, an unreachable swarm) print one line, ``zen-node: error: ...``, and exit with status 2.
Anything else is a bug: it prints its traceback and exits with status 1. Each command validates
its config and arguments before it creates any folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from node.config import ConfigError, NodeConfig, check_join, check_serve, load_node_config, parse_memory

logger = logging.getLogger(__name__)


def user_errors() -> tuple[type[Exception], ...]:
    """What a user can fix; config ValueErrors become ConfigError where the config is built (node.config).

    Imported here, not at the top: ``--help`` and a bad flag or config value answer before torch and
    hivemind load (seconds on a small machine); a command that raised the others has loaded them already.
    """
    from dht import IdentityError, SwarmError
    from node.capacity import CapacityError
    from node.data import DataError
    from node.sharding.client import StageUnavailableError
    from node.training.trainer import ConfigMismatchError

    return ConfigError, IdentityError, DataError, CapacityError, SwarmError, ConfigMismatchError, StageUnavailableError


EXIT_USER_ERROR = 2  # as argparse exits on a bad flag
EXIT_INTERNAL_ERROR = 1  # a bug: the traceback is printed
EXAMPLE_PEER = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooWExample"


def _add_swarm_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--initial-peers", nargs="+", default=None, metavar="MADDR", help=f"bootstrap peer(s), e.g. {EXAMPLE_PEER}"
    )
    parser.add_argument("--config", default=None, help="run/node config file (TOML), e.g. node.toml")
    parser.add_argument("--run-id", default=None, help="the run to join, e.g. zen-demo (overrides the config file)")
    parser.add_argument(
        "--host-maddrs", nargs="+", default=None, metavar="MADDR", help="where to listen, e.g. /ip4/0.0.0.0/tcp/0"
    )
    parser.add_argument(
        "--announce-maddrs",
        nargs="+",
        default=None,
        metavar="MADDR",
        help="public address, e.g. /ip4/203.0.113.7/tcp/4000",
    )
    parser.add_argument(
        "--client-mode", action="store_true", default=None, help="dial out only (behind NAT), e.g. --client-mode"
    )
    parser.add_argument("--no-relay", action="store_true", help="disable libp2p circuit relays, e.g. --no-relay")
    parser.add_argument(
        "--auto-relay", action="store_true", help="find a relay to be reachable behind NAT, e.g. --auto-relay"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level, e.g. DEBUG")


def _add_metrics_flag(parser: argparse.ArgumentParser, whose: str) -> None:
    parser.add_argument(
        "--metrics-port",
        default=None,
        metavar="[HOST:]PORT",
        help=f"serve {whose} Prometheus metrics at http://HOST:PORT/metrics (host 127.0.0.1 unless given; "
        "overrides [node] metrics_port), e.g. 9100",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zen-node", description="Zen Federation training node.")
    commands = parser.add_subparsers(dest="command", required=True)

    join = commands.add_parser("join", help="join a swarm and train on local data")
    _add_swarm_flags(join)
    join.add_argument("--data", default=None, help="text file or folder of .txt/.jsonl, e.g. ./corpus")
    join.add_argument("--identity", default=None, help="folder holding this node's keys, e.g. ~/.zen/identity")
    join.add_argument("--workdir", default=None, help="checkpoints and report, e.g. ~/.zen/work")
    join.add_argument("--rounds", type=int, default=None, help="stop after this outer round (0: never), e.g. 10")
    join.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N, e.g. cuda:0")
    join.add_argument(
        "--allow-low-memory", action="store_true", default=None, help="join below the run's minimum memory"
    )
    join.add_argument("--resume", action="store_true", default=None, help="continue from the checkpoint in --workdir")
    join.add_argument("--min-peers", type=int, default=None, help="wait for this many trainers before training, e.g. 3")
    join.add_argument("--save-round-params", action="store_true", default=None, help="keep each round's global params")
    _add_metrics_flag(join, "this trainer's")
    join.add_argument(
        "--display-name", default=None, help="this node's name in the run's ledger and model cards, e.g. 'Ada'"
    )
    join.add_argument(
        "--epsilon-budget",
        type=float,
        default=None,
        help="stop sending updates before this node's privacy loss exceeds it (with [run.privacy]), e.g. 4.0",
    )

    serve = commands.add_parser("serve", help="lend this machine's GPU (or CPU): host stages of a sharded run")
    _add_swarm_flags(serve)
    serve.add_argument("--identity", default=None, help="folder holding this node's keys, e.g. ~/.zen/serve-identity")
    serve.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N, e.g. cuda:0")
    serve.add_argument("--max-memory", default=None, help="device memory the stages may use, e.g. 20GB")
    serve.add_argument(
        "--stages", type=int, nargs="+", default=None, help="host these stages instead of choosing, e.g. 0 1"
    )
    _add_metrics_flag(serve, "this stage server's")

    status = commands.add_parser("status", help="list the swarm's peers as the DHT shows them")
    _add_swarm_flags(status)
    status.add_argument("--json", action="store_true", help="print one JSON object per peer, e.g. --json")

    demo = commands.add_parser("demo", help="run a local swarm: a bootstrap peer and N nodes on 127.0.0.1")
    demo.add_argument("--peers", type=int, default=4, help="number of nodes, e.g. 4")
    demo.add_argument("--rounds", type=int, default=3, help="outer rounds, e.g. 3")
    demo.add_argument("--summary-json", default=None, help="write a JSON summary here, e.g. out.json")
    demo.add_argument("--workdir", default="zen-demo", help="scratch folder for the demo, e.g. zen-demo")
    demo.add_argument("--inner-steps", type=int, default=30, help="inner steps per round, e.g. 30")
    demo.add_argument("--log-level", default="WARNING", help="nodes' logging level, e.g. INFO")
    demo.add_argument(
        "--aggregation",
        choices=("secure", "plain"),
        default="secure",
        help="secure (masked all-reduce, needs >= 3 peers) or plain (hivemind's averager), e.g. plain",
    )
    demo.add_argument(
        "--privacy-epsilon",
        type=float,
        default=0.0,
        help="train with differential privacy at this epsilon over the demo's rounds (0: off), e.g. 8",
    )
    _add_export_commands(commands)
    _add_ledger_command(commands)
    return parser


def _add_ledger_command(commands: Any) -> None:
    ledger = commands.add_parser("ledger", help="list a run's contributors from the signed contribution ledger")
    _add_swarm_flags(ledger)
    output = ledger.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per contributor, e.g. --json")
    output.add_argument("--csv", action="store_true", help="CSV with a header line, e.g. --csv")
    ledger.add_argument(
        "--receipts", nargs="*", default=[], help="ledger.jsonl files or workdirs to audit, e.g. ~/.zen/work"
    )


def _add_export_commands(commands: Any) -> None:
    export = commands.add_parser("export", help="write a workdir's model as a Hugging Face folder with a model card")
    export.add_argument("--workdir", required=True, help="the trainer's workdir, e.g. ~/.zen/work")
    export.add_argument("--out", required=True, help="the folder to create, e.g. ./zen-model")
    export.add_argument(
        "--config", default=None, help="the run's config, if the checkpoint does not carry it, e.g. run.toml"
    )
    export.add_argument("--display-name", default=None, help="this node's name in the model card, e.g. 'Ada'")
    export.add_argument("--log-level", default="WARNING", help="logging level, e.g. INFO")

    generate = commands.add_parser("generate", help="sample text from an exported model")
    generate.add_argument("--model", required=True, help="a folder `zen-node export` wrote, e.g. ./zen-model")
    generate.add_argument("--prompt", required=True, help='text to continue, e.g. "Once upon a time"')
    generate.add_argument(
        "--max-new-tokens", type=int, default=None, help="tokens (bytes) to sample (default: half the context), e.g. 48"
    )
    generate.add_argument("--seed", type=int, default=0, help="sampling seed, e.g. 1")
    generate.add_argument("--log-level", default="WARNING", help="logging level, e.g. INFO")


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    """The ``--config`` file (if any) with the flags laid over it.

    Raises:
        ConfigError: a bad file, flag or value (the message names the field and the fix).
    """
    overrides = _overrides(args)
    if args.command in ("status", "ledger"):
        # status always dials out only (cmd_status), whatever the flag or file says; the config's check of
        # client mode against secure aggregation is for trainers.
        overrides["swarm.client_mode"] = False
    return load_node_config(args.config, overrides)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    mapping = {
        "initial_peers": "swarm.initial_peers",
        "host_maddrs": "swarm.host_maddrs",
        "announce_maddrs": "swarm.announce_maddrs",
        "client_mode": "swarm.client_mode",
        "run_id": "run.run_id",
        "data": "node.data",
        "identity": "node.identity",
        "workdir": "node.workdir",
        "rounds": "node.rounds",
        "device": "node.device",
        "allow_low_memory": "node.allow_low_memory",
        "resume": "node.resume",
        "min_peers": "node.min_peers",
        "save_round_params": "node.save_round_params",
        "epsilon_budget": "node.epsilon_budget",
        "display_name": "node.display_name",
        "metrics_port": "node.metrics_port",
        "stages": "serve.stages",
    }
    values = {key: getattr(args, name) for name, key in mapping.items() if getattr(args, name, None) is not None}
    if getattr(args, "max_memory", None) is not None:
        values["serve.max_memory"] = parse_memory(args.max_memory)
    if getattr(args, "no_relay", False):
        values["swarm.use_relay"] = False
    if getattr(args, "auto_relay", False):
        values["swarm.use_auto_relay"] = True
    return values


SHUTDOWN_GRACE_SECONDS = 30.0  # after a stop signal, exit even if a component hangs in shutdown


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        logger.info(f"received {signal.Signals(signum).name}; stopping after the current step")
        if stop.is_set():
            return
        stop.set()
        # A hung network call must not keep a stopped node alive: exit hard after a grace period.
        watchdog = threading.Timer(SHUTDOWN_GRACE_SECONDS, _exit_hard)
        watchdog.daemon = True
        watchdog.start()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _exit_hard() -> None:
    import psutil

    logger.error(f"shutdown took over {SHUTDOWN_GRACE_SECONDS:.0f}s; exiting now")
    for child in psutil.Process().children(recursive=True):
        child.kill()
    os._exit(1)


def cmd_join(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_join(config)
    from node.progress import JoinDisplay
    from node.sharding.trainer import ShardedTrainer  # here, after the config's checks (user_errors)
    from node.training.privacy import check_privacy
    from node.training.trainer import TrainingNode

    check_privacy(config.run)  # the user-level population floor: refused before any folder exists
    stop = threading.Event()
    _install_signal_handlers(stop)
    node: TrainingNode | ShardedTrainer
    cleanup = contextlib.ExitStack()  # the progress bar and metrics endpoint, ended after the node
    display = JoinDisplay(config, cleanup)
    if config.run.sharding.stages:
        node = ShardedTrainer(config, stop_event=stop, on_step=display.on_step)
    else:
        node = TrainingNode(config, stop_event=stop, on_round=display.on_round)
    try:
        display.start(node)
        node.prepare()
        node.join()
        display.line(f"joined run {config.run.run_id!r} as {node.identity.peer_id} at round {node.round}")
        node.run_forever()
        display.line(f"time by phase: {node.phases.summary()}")
    finally:
        node.close()
        cleanup.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_serve(config)
    from node.metrics import start_node_metrics
    from node.sharding.server import StageServer  # here, after the config's checks (user_errors)

    stop = threading.Event()
    _install_signal_handlers(stop)
    server = StageServer(config, config.serve, stop_event=stop)
    metrics = start_node_metrics(config.metrics_port, "server")
    try:
        if metrics is not None:
            metrics.watch_stage_server(server.calls, lambda: len(server.hosted))
            print(f"metrics: {metrics.url}", flush=True)
        server.start()
        print(
            f"serving stage(s) {sorted(server.hosted)} of run {config.run.run_id!r} as {server.identity.peer_id} "
            f"on {server.device}; multiaddrs {' '.join(server.maddrs)}",
            flush=True,
        )
        server.run_forever()
    finally:
        server.shutdown()
        if metrics is not None:
            metrics.stop()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from hivemind.utils import get_dht_time  # here, after the config's checks (user_errors)

    from dht import list_peers, start_dht
    from dht.swarm import SwarmConfig
    from node.aggregation.hierarchy import cohort_matcher

    swarm = SwarmConfig(**{**vars(config.swarm), "client_mode": True})
    dht = start_dht(swarm, None, [config.run.run_id])
    try:
        peers = list_peers(dht, config.run.run_id)
    finally:
        dht.shutdown()
    now = get_dht_time()
    matcher = cohort_matcher(config.run.run_id, config.run.cohorts, config.run.aggregation.min_group_size)
    cohorts = matcher.cohorts(peers)
    placed = {m: (c, d) for c in cohorts for m, d in zip(c.members, c.distances, strict=True)}
    if args.json:
        for peer in peers:
            cohort, distance = placed.get(peer.peer_id, (None, None))
            row = {
                "peer_id": peer.peer_id,
                "roles": list(peer.roles),
                "round": peer.round,
                "version": peer.version,
                "run_hash": peer.run_hash,
                "device": peer.capacity.device_kind,
                "device_name": peer.capacity.device_name,
                "memory_gb": round(peer.capacity.memory_bytes / 1024**3, 2),
                "samples_per_second": peer.capacity.samples_per_second,
                "epsilon": None if peer.epsilon < 0 else peer.epsilon,
                "last_heartbeat_seconds_ago": round(now - peer.timestamp, 1),
                "cohort": None if cohort is None else cohort.cohort_id,
                "cohort_size": None if cohort is None else len(cohort),
                "distance_to_centroid": distance,
            }
            print(json.dumps(row))
        return 0
    print(f"run {config.run.run_id!r}: {len(peers)} peer(s)")
    header = f"{'peer id':54s} {'roles':10s} {'round':>5s} {'device':8s} {'mem GB':>7s} {'samples/s':>10s}"
    print(f"{header} {'epsilon':>8s} {'seen':>6s}")
    for peer in peers:
        epsilon = "-" if peer.epsilon < 0 else f"{peer.epsilon:.3f}"
        print(
            f"{peer.peer_id:54s} {','.join(peer.roles):10s} {peer.round:5d} {peer.capacity.device_kind:8s} "
            f"{peer.capacity.memory_bytes / 1024**3:7.1f} {peer.capacity.samples_per_second:10.1f} "
            f"{epsilon:>8s} {now - peer.timestamp:5.1f}s"
        )
    print(f"{len(cohorts)} cohort(s) of trainers (cosine distance threshold {matcher.threshold}):")
    for cohort in cohorts:
        print(f"cohort {cohort.cohort_id}: {len(cohort)} member(s)")
        for member, distance in zip(cohort.members, cohort.distances, strict=True):
            print(f"    {member:54s} distance to centroid {distance:.4f}")
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from pathlib import Path

    from node.ledger.listing import format_rows, read_run_ledger  # here, after the config's checks (user_errors)

    receipts = [Path(p).expanduser() for p in args.receipts]
    if missing := [p for p in receipts if not p.exists()]:
        raise ConfigError(f"--receipts {missing[0]}: no such file or folder; give a ledger.jsonl or a node's workdir")
    rows = read_run_ledger(config.swarm, config.run, receipts)
    print(format_rows(rows, config.run.run_id, "json" if args.json else "csv" if args.csv else "text"), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo  # here: it loads torch, which no other command needs

    return run_demo(args)


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from node.export.writer import export_run  # here: it loads transformers, which no other command needs

    result = export_run(Path(args.workdir).expanduser(), Path(args.out).expanduser(), args.config, args.display_name)
    summary = result.summary
    print(
        f"exported run {summary.run.run_id!r} at round {summary.round} ({summary.parameters:,} parameters) to "
        f"{result.out}: {', '.join(result.files)}",
        flush=True,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from node.generate import generate_text  # here: it loads transformers, which no other command needs

    generation = generate_text(Path(args.model).expanduser(), args.prompt, args.max_new_tokens, args.seed)
    print(generation.prompt + generation.continuation, flush=True)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "join": cmd_join,
    "serve": cmd_serve,
    "status": cmd_status,
    "demo": cmd_demo,
    "export": cmd_export,
    "generate": cmd_generate,
    "ledger": cmd_ledger,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``zen-node`` command; return the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if isinstance(e, ConfigError) or isinstance(e, user_errors()):
            print(f"zen-node: error: {' '.join(str(e).split())}", file=sys.stderr)
            return EXIT_USER_ERROR
        traceback.print_exc()
        print("zen-node: internal error (a bug, not your input); please report the traceback above", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
